"""Trains, checkpoints and samples the tiny config on several meshes; prints one JSON report.

Run by tests/test_sharded_training.py in a fresh process with 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8), so the rest of the suite keeps one device:

  python tests/sharded_run.py WORKDIR

tests/multiprocess_run.py reuses `Run` across processes.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # noqa: E402  pylint: disable=g-import-not-at-top

from flowar_jax.models.params import split_params  # noqa: E402
from flowar_jax.models.registry import build_model, build_vae  # noqa: E402
from flowar_jax.parallel.batch import global_batch, to_host  # noqa: E402
from flowar_jax.parallel.plan import ShardingPlan  # noqa: E402
from flowar_jax.runs.checkpointing import Checkpointer  # noqa: E402
from flowar_jax.sampling.sampler import Sampler, SamplingSettings  # noqa: E402
from flowar_jax.training import loop  # noqa: E402
from flowar_jax.training.generator_stage import generator_loss_fn  # noqa: E402
from flowar_jax.training.optimizer import flowar_optimizer  # noqa: E402
from flowar_jax.training.state import make_train_step  # noqa: E402

STEPS = 5
MESHES = {"1": None, "8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}
SAMPLED = ("1", "2x2x2")
SCANNED = (2, 4, 1)


def make_config(mesh_shape):
  config = tiny_config("v2")  # cross-attention too; dropout stays on (RNG must not depend on the mesh)
  config.model.depth, config.model.head.depth = 2, 2
  config.num_train_steps = STEPS
  if mesh_shape is not None:
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
  if mesh_shape == SCANNED:  # the same values with every stack scanned and rematerialised
    config.model.scan_blocks, config.model.remat = True, "full"
  return config


def make_plan(config, mesh_shape):
  return ShardingPlan.single_device() if mesh_shape is None else ShardingPlan.from_config(config)


def batches(config, count):
  rng = np.random.default_rng(0)
  size = config.data.image_size
  return [{"image": rng.uniform(-1, 1, (config.batch_size, size, size, 3)).astype(np.float32),
           "label": rng.integers(0, config.model.num_classes, config.batch_size).astype(np.int32)}
          for _ in range(count)]


class Run:
  """FlowAR training on one mesh, with a frozen random VAE as context, as the FlowAR stage runs it."""

  def __init__(self, mesh_shape, checkpoint_dir):
    self.config = config = make_config(mesh_shape)
    self.plan = make_plan(config, mesh_shape)
    vae_graphdef, vae_params = split_params(build_vae(config, seed=1))
    self.context = self.plan.place(vae_params)
    self.tx, schedule = flowar_optimizer(config.optimizer, config.batch_size, config.num_train_steps)
    self.checkpointer = Checkpointer(checkpoint_dir)
    self.graphdef, self.state = loop.create_or_restore(functools.partial(build_model, config, config.seed),
                                                       self.tx, config.seed, self.checkpointer, plan=self.plan)
    self.step_fn = make_train_step(self.graphdef, generator_loss_fn(vae_graphdef, config), self.tx,
                                   config.optimizer.ema_decay, schedule, plan=self.plan,
                                   state_shardings=jax.tree.map(lambda x: x.sharding, self.state),
                                   context_shardings=jax.tree.map(lambda x: x.sharding, self.context))

  def train(self, data, whole_batches=False):
    """Steps on the global batches `data`; each process passes its rows, as its data iterator would (or the
    whole batch: a single-device run inside a multi-process job)."""
    losses = []
    share = self.config.batch_size // (1 if whole_batches else jax.process_count())
    first = 0 if whole_batches else jax.process_index() * share
    rows = slice(first, first + share)
    for batch in data:
      local = {key: value[rows] for key, value in batch.items()}
      self.state, metrics = self.step_fn(self.state, global_batch(self.plan, local), self.context)
      losses.append(float(metrics["loss"]))
    return losses

  def sample_latents(self, labels, ema_params=None):
    """Samples on this run's mesh with `ema_params` (host arrays; default this run's own EMA weights)."""
    model = __import__("flax").nnx.merge(self.graphdef, self.state.ema_params if ema_params is None else ema_params)
    sampler = Sampler(model, SamplingSettings(cfg=2.0, num_steps=3), plan=self.plan)
    return sampler(labels, seed=3)


def leaf_specs(state):
  return {jax.tree_util.keystr(path): str(leaf.sharding.spec) for path, leaf in
          jax.tree_util.tree_leaves_with_path(state) if hasattr(leaf.sharding, "spec")}


def host_leaves(state):
  """Every leaf of `state` as a whole numpy array on this process (PRNG keys as their key data)."""
  def data(x):
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  return jax.tree.leaves(to_host(jax.tree.map(data, state)))


def main(workdir):
  assert jax.device_count() == 8, jax.devices()
  data = batches(make_config(None), STEPS)
  labels = np.arange(10) % 10
  report = {"losses": {}, "sample_max_diff": {}, "seconds": {}}
  samples = {}
  for name, shape in MESHES.items():
    start = time.perf_counter()
    run = Run(shape, os.path.join(workdir, name))
    report["losses"][name] = run.train(data)
    if name in SAMPLED:  # every mesh samples the one-device run's weights: only the sampler's sharding differs
      if name == "1":
        sampled_weights = jax.tree.map(np.asarray, run.state.ema_params)
      samples[name] = run.sample_latents(labels, sampled_weights)
    if name == "2x4x1":
      run.checkpointer.save(STEPS, run.state)
      saved = host_leaves(run.state)
      report["fsdp_specs"] = leaf_specs(run.state)
    run.checkpointer.close()
    report["seconds"][name] = time.perf_counter() - start
  report["sample_max_diff"] = float(np.max(np.abs(samples["2x2x2"] - samples["1"])))

  # The checkpoint of the (2, 4, 1) run, restored onto (2, 2, 2).
  start = time.perf_counter()
  run = Run(MESHES["2x2x2"], os.path.join(workdir, "2x4x1"))
  restored = host_leaves(run.state)
  report["restore"] = {
      "step": int(run.state.step),
      "max_diff": max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(restored, saved)),
      "specs": leaf_specs(run.state),
  }
  run.checkpointer.close()
  report["seconds"]["restore"] = time.perf_counter() - start
  print("REPORT " + json.dumps(report))


if __name__ == "__main__":
  main(sys.argv[1])
