"""One of two JAX processes on localhost building the latent cache of the digits together; prints one JSON report.

Started by tests/test_latent_cache.py with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID and 2 fake
CPU devices each:

  python tests/latent_cache_multiprocess.py WORKDIR

The VAE's parameters live on the global 4-device mesh (as `load_vae` places them); each process encodes its
own shards on its own devices, waits for the other, then reads its first training batches.
"""
from __future__ import annotations

import json
import os
import sys

from flowar_jax.parallel.distributed import initialize_from_environment

initialize_from_environment()  # before anything touches a device

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # noqa: E402

from flowar_jax import data  # noqa: E402
from flowar_jax.parallel.plan import ShardingPlan  # noqa: E402
from flowar_jax.training import latent_cache  # noqa: E402
from flowar_jax.models.registry import build_vae  # noqa: E402

SHARD_SIZE, BATCH, SEED, STEPS = 256, 16, 5, 3


def main(workdir: str) -> None:
  config = tiny_config()
  vae = build_vae(config)
  nnx.update(vae, ShardingPlan.from_config(config).place(nnx.state(vae)))
  source = data.build_source(config.data, "train")
  manifest = latent_cache.expected_manifest(config, vae.stride, len(source), SHARD_SIZE)
  cache, encoded = latent_cache.build(latent_cache.cache_dir(workdir), manifest,
                                      lambda: latent_cache.LocalEncoder(vae), source, config.data,
                                      shard_index=jax.process_index(), shard_count=jax.process_count())
  iterator = cache.train_iterator(BATCH, SEED, jax.process_index(), jax.process_count())
  batches = [next(iterator) for _ in range(STEPS)]
  print("REPORT " + json.dumps({
      "process": jax.process_index(), "encoded": encoded, "count": len(cache),
      "moments": [b["moments"].tolist() for b in batches], "labels": [b["label"].tolist() for b in batches]}),
        flush=True)
  multihost_utils.sync_global_devices("report printed")  # neither process leaves the job while the other works
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1])
