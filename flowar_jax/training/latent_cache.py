"""Precomputed VAE posteriors: encode the train split once, then train FlowAR on the cached moments.

The cache stores the posterior's mean and log-variance (not one sample), so training still draws a fresh
posterior sample every step, exactly as when encoding on the fly without augmentation.
"""
from __future__ import annotations

import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from flowar_jax import data
from flowar_jax.models.vae import AutoencoderKL
from flowar_jax.parallel.batch import replicated_batch, round_up_to_data_parallel, to_host
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.runs.progress import Progress

_ENCODE_BATCH = 64


def cache_path(workdir: str) -> str:
  return os.path.join(workdir, "latent_cache.npz")


def encode_train_split(vae: AutoencoderKL, config: ml_collections.ConfigDict, max_examples: int | None = None,
                       plan: ShardingPlan | None = None) -> tuple[np.ndarray, np.ndarray]:
  """-> moments float32 `[N, h, w, 2C]` (mean | logvar) and labels int32 `[N]` of the centre-cropped train split
  (its first `max_examples` if given). Every process reads the whole split; with a `plan` the batches are
  encoded split over its mesh and every process gets all moments."""
  plan = plan or ShardingPlan.single_device()
  graphdef, state = nnx.split(vae)
  state = plan.place(state)

  def encode(state, images):
    posterior = nnx.merge(graphdef, state).encode(images)
    return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)

  batch_sharding = plan.batch_sharding()
  encode = plan.jit(encode, in_shardings=(jax.tree.map(lambda x: x.sharding, state), batch_sharding),
                    out_shardings=batch_sharding)
  total = len(data.build_source(config.data, "train"))
  if max_examples is not None:
    total = min(total, max_examples)
  moments, labels, done = [], [], 0
  batch_size = round_up_to_data_parallel(plan, _ENCODE_BATCH)
  with Progress(total, desc="encode latents", unit="image", every=max(1, total // 20)) as progress:
    for batch in data.make_eval_batches(config.data, batch_size, split="train"):
      keep = batch["mask"]
      moments.append(to_host(encode(state, replicated_batch(plan, batch["image"])))[keep])
      labels.append(batch["label"][keep])
      done += len(labels[-1])
      progress.update(min(done, total))
      if done >= total:
        break
  return np.concatenate(moments), np.concatenate(labels).astype(np.int32)


def load_or_encode(vae: AutoencoderKL, config: ml_collections.ConfigDict, workdir: str,
                   plan: ShardingPlan | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reuses WORKDIR/latent_cache.npz when it matches the VAE's latent shape, else (re)builds it."""
  path = cache_path(workdir)
  side = config.data.image_size // vae.stride
  expected = (side, side, 2 * config.vae.latent_channels)
  if os.path.exists(path):
    with np.load(path) as f:
      moments, labels = f["moments"], f["labels"]
    if moments.shape[1:] == expected:
      return moments, labels
    logging.warning("latent cache %s has shape %s, expected %s: re-encoding", path, moments.shape[1:], expected)
  moments, labels = encode_train_split(vae, config, plan=plan)
  if jax.process_index() == 0:
    tmp = path + ".tmp.npz"
    np.savez(tmp, moments=moments, labels=labels)
    os.replace(tmp, path)  # a half-written cache is never picked up
  logging.info("cached %d latents of shape %s in %s", len(labels), moments.shape[1:], path)
  return moments, labels


def make_latent_iterator(vae: AutoencoderKL, config: ml_collections.ConfigDict, workdir: str,
                         plan: ShardingPlan | None = None):
  """Infinite, shuffled, checkpointable iterator of `{'moments': [B, h, w, 2C], 'label': [B]}` (this process's
  share); the cache is built (encoding split over `plan`'s mesh) when missing."""
  moments, labels = load_or_encode(vae, config, workdir, plan)
  shard_count, shard_index = jax.process_count(), jax.process_index()
  if config.batch_size % shard_count:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {shard_count} processes")
  local_batch = config.batch_size // shard_count
  if len(labels) // shard_count < local_batch:
    raise ValueError(f"the train split has {len(labels)} examples, fewer than one batch of {config.batch_size}")
  per_shard = len(labels) // shard_count // local_batch * local_batch
  # One global permutation per epoch (grain reshuffles each repeat), then this process's strided share.
  dataset = (grain.MapDataset.range(len(labels)).shuffle(seed=config.seed)
             .slice(slice(shard_index, shard_count * per_shard, shard_count))
             .repeat()
             .map(lambda i: {"moments": moments[i], "label": labels[i]}))
  return iter(dataset.to_iter_dataset().batch(local_batch, drop_remainder=True))
