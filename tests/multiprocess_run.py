"""One of several JAX processes on localhost (jax.distributed) training together; prints one JSON report.

Started by tests/test_multiprocess.py, each process with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID and 2 fake CPU devices, and once more without them (the one-device reference):

  python tests/multiprocess_run.py WORKDIR

1. The library path: FlowAR steps on the global mesh, each process feeding its rows of the batches; the
   sampler (every process gets every sample); a multi-host Orbax checkpoint, restored onto another mesh.
2. The command path: `train` of the VAE stage as the launch scripts run it (per-process data shards,
   metrics from process 0, multi-host checkpoints).

  python tests/multiprocess_run.py WORKDIR preemptible REFERENCE_CHECKPOINTS

3. The same FlowAR training through the training loop, as the FlowAR stage runs it, until preempted: it exits
   with the preemption exit code after saving, and the same command resumes and finishes it; the finished
   run compares its state with REFERENCE_CHECKPOINTS (the library path's checkpoint, never interrupted).
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

from flowar_jax.parallel.distributed import initialize_from_environment

initialize_from_environment()  # before anything touches a device

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # noqa: E402
from sharded_run import STEPS, Run, batches, host_leaves, make_config  # noqa: E402

from flowar_jax.commands import train  # noqa: E402
from flowar_jax.training import loop  # noqa: E402
from flowar_jax.training.preemption import EXIT_CODE, Preempted  # noqa: E402

# The interrupted run stops here until every process has told JAX's preemption service its step, so the step
# the processes agree on does not depend on how fast the service learns of the signal.
READY_FILE = "waiting_for_sigterm"
_COUNTERS_KEY = "PREEMPTION_CURRENT_COUNTER/"  # where the service's processes publish their steps


def main(workdir):
  data = batches(make_config(None), STEPS)
  labels = np.arange(10) % 10
  if jax.process_count() == 1:  # the reference: one device, whole batches
    run = Run(None, os.path.join(workdir, "one_device"))
    losses = run.train(data)
    print("REPORT " + json.dumps({"losses": losses, "samples": run.sample_latents(labels).tolist()}), flush=True)
    return
  report = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count()}
  run = Run((jax.device_count(), 1, 1), os.path.join(workdir, "library"))
  report["losses"] = run.train(data)
  report["samples"] = run.sample_latents(labels).tolist()  # every process gets every sample
  run.checkpointer.save(STEPS, run.state)
  saved = host_leaves(run.state)
  run.checkpointer.close()
  restored = Run((2, jax.device_count() // 2, 1), os.path.join(workdir, "library"))  # data=2, fsdp=2
  report["restore_max_diff"] = max(float(np.max(np.abs(a.astype(np.float64) - b)))
                                   for a, b in zip(host_leaves(restored.state), saved))
  restored.checkpointer.close()

  config = tiny_config()  # the command path: the VAE stage as the launch scripts run it
  config.stage = "vae"
  config.vae.train.num_train_steps = 2
  train.run(config, os.path.join(workdir, "command"))
  print("REPORT " + json.dumps(report), flush=True)


def _wait_for_the_preemption_sync(workdir, timeout_s=120.0):
  """Process 0, after its second step: announces it may be signalled (READY_FILE), then waits until every
  process has entered the service's sync protocol (its step is published); the others wait in the step."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  with open(os.path.join(workdir, READY_FILE), "w") as f:
    f.write("ready\n")
  deadline = time.monotonic() + timeout_s
  while len(client.key_value_dir_get(_COUNTERS_KEY)) < jax.process_count():
    if time.monotonic() > deadline:
      raise TimeoutError(f"no preemption sync {timeout_s:.0f} s after {READY_FILE}: was SIGTERM sent?")
    time.sleep(0.01)


def preemptible(workdir, reference_dir):
  """FlowAR training of the library path, through `loop.train`; a SIGTERM makes it save and exit."""
  from flowar_jax.models.params import split_params  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.registry import build_model, build_vae  # pylint: disable=g-import-not-at-top
  from flowar_jax.parallel.plan import ShardingPlan  # pylint: disable=g-import-not-at-top
  from flowar_jax.runs.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top
  from flowar_jax.training.generator_stage import generator_loss_fn  # pylint: disable=g-import-not-at-top
  from flowar_jax.training.optimizer import flowar_optimizer  # pylint: disable=g-import-not-at-top
  import grain  # pylint: disable=g-import-not-at-top
  config = make_config((jax.device_count(), 1, 1))
  plan = ShardingPlan.from_config(config)
  vae_graphdef, vae_params = split_params(build_vae(config, seed=1))
  tx, schedule = flowar_optimizer(config.optimizer, config.batch_size, config.num_train_steps)
  share = config.batch_size // jax.process_count()
  rows = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
  local = [{key: value[rows] for key, value in batch.items()} for batch in batches(make_config(None), STEPS)]
  data = iter(grain.MapDataset.source(local).to_iter_dataset())  # checkpointable, so the resumed run goes on
  run_dir = os.path.join(workdir, "preemptible")
  first_run = not os.path.exists(os.path.join(run_dir, "checkpoints"))
  periodic = []
  if first_run and jax.process_index() == 0:
    periodic.append(loop.Periodic(1, lambda step, state: step == 2 and _wait_for_the_preemption_sync(workdir)))
  report = {"process": jax.process_index(), "first_run": first_run}
  try:
    _, state = loop.train(workdir=run_dir, model_factory=functools.partial(build_model, config, config.seed),
                          loss_fn=generator_loss_fn(vae_graphdef, config), tx=tx, schedule=schedule,
                          ema_decay=config.optimizer.ema_decay, data_iterator=data, num_steps=STEPS, config=config,
                          seed=config.seed, checkpoint_every=100, keep=3, log_every=1, context=plan.place(vae_params),
                          periodic=periodic, plan=plan)
  except Preempted as preempted:
    report["preempted_at"] = preempted.step
    print("REPORT " + json.dumps(report), flush=True)
    sys.exit(EXIT_CODE)
  report["step"] = int(state.step)
  with Checkpointer(reference_dir) as checkpointer:  # the uninterrupted run, on the same mesh
    reference = checkpointer.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                                  state))
  report["differing_leaves"] = sum(not np.array_equal(a, b) for a, b in zip(host_leaves(state), host_leaves(reference)))
  report["leaves"] = len(jax.tree.leaves(state))
  print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
  if sys.argv[2:3] == ["preemptible"]:
    preemptible(sys.argv[1], sys.argv[3])
  else:
    main(sys.argv[1])
