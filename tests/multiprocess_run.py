"""One of several JAX processes on localhost (jax.distributed) training together; prints one JSON report.

Started by tests/test_multiprocess.py, each process with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID and 2 fake CPU devices, and once more without them (the one-device reference):

  python tests/multiprocess_run.py WORKDIR

1. The library path: FlowAR steps on the global mesh, each process feeding its rows of the batches; the
   sampler (every process gets every sample); a multi-host Orbax checkpoint, restored onto another mesh.
2. The command path: `train` of the VAE stage as the launch scripts run it (per-process data shards,
   metrics from process 0, multi-host checkpoints).
"""
from __future__ import annotations

import json
import os
import sys

from flowar_jax.parallel.distributed import initialize_from_environment

initialize_from_environment()  # before anything touches a device

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # noqa: E402
from sharded_run import STEPS, Run, batches, host_leaves, make_config  # noqa: E402

from flowar_jax.commands import train  # noqa: E402


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


if __name__ == "__main__":
  main(sys.argv[1])
