"""The training loop shared by the VAE and FlowAR stages: resume, step, log, checkpoint."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import optax
from absl import logging
from flax import nnx

from flowar_jax.config import flatten_config
from flowar_jax.models.params import split_params
from flowar_jax.parallel.batch import global_batch
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.runs import fs
from flowar_jax.runs.checkpointing import Checkpointer
from flowar_jax.runs.metrics import MetricWriter
from flowar_jax.runs.progress import Progress
from flowar_jax.training.nonfinite import NonFiniteMonitor
from flowar_jax.training.preemption import Preempted, PreemptionWatcher
from flowar_jax.training.state import LossFn, PostUpdate, TrainState, init_train_state, make_train_step


@dataclasses.dataclass(frozen=True)
class Periodic:
  """An action the loop runs every `every` steps and at the last step, after that step's checkpoint
  (e.g. writing sample grids, evaluating): `action(step, state)`; a non-positive `every` turns it off."""

  every: int
  action: Callable[[int, TrainState], None]

  def due(self, step: int, last_step: int) -> bool:
    return self.every > 0 and (step % self.every == 0 or step == last_step)


def create_or_restore(model_factory: Callable[[], nnx.Module], tx: optax.GradientTransformation, seed: int,
                      checkpointer: Checkpointer, data_iterator=None, plan: ShardingPlan | None = None
                      ) -> tuple[nnx.GraphDef, TrainState]:
  """Builds the state from the latest checkpoint when there is one (the iterator is restored too).

  With a `plan`, the state is created (or restored, from a checkpoint of any mesh) directly in its
  sharded layout: nothing is built whole on one device.
  """
  def init():
    return init_train_state(model_factory(), tx, seed)

  graphdef, _ = split_params(nnx.eval_shape(model_factory))
  abstract = jax.eval_shape(init)
  if plan is not None:
    abstract = plan.abstract(abstract)
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(abstract, data_iterator=data_iterator)
    logging.info("resumed from step %d in %s", int(state.step), checkpointer.directory)
    return graphdef, state
  if plan is None:
    return graphdef, jax.jit(init)()
  return graphdef, plan.jit(init, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))()


def train(*, workdir: str, model_factory: Callable[[], nnx.Module], loss_fn: LossFn,
          tx: optax.GradientTransformation, schedule: optax.Schedule, ema_decay: float,
          data_iterator: Iterator[dict], num_steps: int, config: ml_collections.ConfigDict,
          seed: int, checkpoint_every: int, keep: int, log_every: int, context: Any = None,
          batch_to_device: Callable[[dict], dict] | None = None, desc: str = "train",
          batch_size: int | None = None, tokens_per_image: int | None = None,
          periodic: Sequence[Periodic] = (), writer: MetricWriter | None = None,
          max_consecutive_nonfinite: int = 10, plan: ShardingPlan | None = None,
          post_update: PostUpdate | None = None) -> tuple[nnx.GraphDef, TrainState]:
  """Trains to `num_steps` (resuming from `workdir/checkpoints`) and returns (graphdef, final state).

  With `batch_size` (global), the logged metrics include throughput in images per second, measured
  over the steps since the previous log line (the first line after a (re)start includes compilation),
  and with `tokens_per_image` also in tokens per second. `writer` (e.g. shared with periodic actions)
  stays open for its owner; without one the loop writes WORKDIR/metrics.jsonl itself. A run starting
  from step 0 also writes its config as TensorBoard hparams.

  The state is sharded by `plan` (default: `config.mesh` and `config.sharding`); the iterator yields
  this process's share of each batch, which `batch_to_device` (default: `global_batch`) assembles; the
  `context` must already be placed (e.g. `plan.place`). `post_update` changes parameters after each
  optimizer update (see `state.make_train_step`).

  Raises:
    Preempted: a SIGTERM arrived; the current step was checkpointed first (see `preemption`).
    NonFiniteError: `max_consecutive_nonfinite` steps in a row were skipped (see `nonfinite`).
  """
  fs.use_storage_emulator()  # Orbax's TensorStore needs it for gs:// under an emulator
  fs.makedirs(workdir)
  if plan is None:  # a config without a mesh section (e.g. a bare loop) trains on one device
    plan = ShardingPlan.from_config(config) if "mesh" in config else ShardingPlan.single_device()
  if batch_to_device is None:
    batch_to_device = lambda local: global_batch(plan, local)
  checkpointer = Checkpointer(fs.join(workdir, "checkpoints"), keep=keep)
  graphdef, state = create_or_restore(model_factory, tx, seed, checkpointer, data_iterator, plan)
  start = int(state.step)
  if start >= num_steps:
    logging.info("%s: already trained to step %d", desc, start)
    checkpointer.close()
    return graphdef, state
  step_fn = make_train_step(graphdef, loss_fn, tx, ema_decay, schedule, plan=plan,
                            state_shardings=jax.tree.map(lambda x: x.sharding, state),
                            context_shardings=jax.tree.map(lambda x: x.sharding, context),
                            post_update=post_update)
  owns_writer = writer is None
  if owns_writer:
    writer = MetricWriter(workdir)
  if start == 0:
    writer.write_hparams(flatten_config(config))
  progress = Progress(num_steps, initial=start, desc=desc)
  last_log = (start, time.perf_counter())
  monitor = NonFiniteMonitor(max_consecutive_nonfinite, desc=desc, checkpoint_dir=checkpointer.directory)
  preemption = PreemptionWatcher().start()
  try:
    for step in range(start + 1, num_steps + 1):
      batch = batch_to_device(next(data_iterator))
      state, metrics = step_fn(state, batch, context)
      monitor.observe(step, metrics)
      if step % log_every == 0 or step == num_steps:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        if batch_size:
          scalars["images_per_s"] = batch_size * (step - last_log[0]) / max(now - last_log[1], 1e-9)
          if tokens_per_image:
            scalars["tokens_per_s"] = scalars["images_per_s"] * tokens_per_image
        last_log = (step, now)
        writer.write_scalars(step, scalars)
        progress.update(step, scalars)
      if step % checkpoint_every == 0 or step == num_steps:
        checkpointer.save(step, state, data_iterator=data_iterator, config=config)
      if preemption.reached(step):
        checkpointer.save(step, state, data_iterator=data_iterator, config=config)  # no-op if just saved
        checkpointer.wait()
        raise Preempted(step, checkpointer.directory)
      actions_start = time.perf_counter()
      for action in periodic:
        if action.due(step, num_steps):
          action.action(step, state)
      # Throughput counts training (and checkpoints), not the time periodic actions take.
      last_log = (last_log[0], last_log[1] + time.perf_counter() - actions_start)
    monitor.finish()
  finally:
    preemption.stop()
    progress.close()
    if owns_writer:
      writer.close()
    else:
      writer.flush()
    checkpointer.wait()
    checkpointer.close()
  return graphdef, state
