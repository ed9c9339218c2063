"""Stage 2: FlowAR on the latents of a trained, frozen VAE."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from flowar_jax import data
from flowar_jax import precision
from flowar_jax.models.params import split_params
from flowar_jax.models.registry import build_model
from flowar_jax.models.vae import AutoencoderKL
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.runs.loaders import load_vae
from flowar_jax.runs.metrics import MetricWriter
from flowar_jax.runs.stored_config import stored_latent_scale
from flowar_jax.training import latent_cache, loop
from flowar_jax.training.optimizer import flowar_optimizer
from flowar_jax.training.sample_grids import SampleGrids

_SCALE_EXAMPLES = 2048


def _latents_from_batch(vae: AutoencoderKL, batch: dict, latent_scale: float, sample_posterior: bool,
                        rng: jax.Array) -> jax.Array:
  """Images `[B, H, W, 3]` or cached moments `[B, h, w, 2C]` -> latents `[B, h, w, C]` times the latent scale."""
  if "moments" in batch:
    mean, logvar = jnp.split(batch["moments"], 2, axis=-1)
  else:
    posterior = vae.encode(batch["image"])
    mean, logvar = posterior.mean, posterior.logvar
  latents = mean
  if sample_posterior:
    latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
  return jax.lax.stop_gradient(latents * latent_scale)


def resolve_latent_scale(config: ml_collections.ConfigDict, vae: AutoencoderKL, workdir: str
                         ) -> ml_collections.ConfigDict:
  """A copy of `config` whose `vae.latent_scale` is concrete: taken from WORKDIR's checkpoint when resuming,
  else 1 / std of the train set's posterior means (so FlowAR sees unit-variance latents, as 0.2325 gives
  for MAR's KL-16)."""
  stored = stored_latent_scale(workdir)
  if stored is not None:
    scale = stored
  else:
    if config.data.cache_latents:  # every latent, from the spreads stored with the shards
      cache = latent_cache.load_or_encode(vae, config, workdir)
      spread, count = cache.mean_spread(), len(cache)
    else:
      moments, _ = latent_cache.encode_train_split(vae, config, max_examples=_SCALE_EXAMPLES)
      spread, count = latent_cache.mean_spread(moments), len(moments)
    scale = 1.0 / spread.std
    if jax.process_index() == 0:
      print(f"measured vae.latent_scale = {scale:.6g} (1 / std of {count} train latents)", flush=True)
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.vae.latent_scale = scale
  resolved.lock()
  return resolved


def flowar_loss_fn(vae_graphdef: nnx.GraphDef, config: ml_collections.ConfigDict):
  def loss_fn(model, batch, rng, vae_params, step):  # pylint: disable=unused-argument
    r_post, r_model = jax.random.split(rng)
    vae = nnx.merge(vae_graphdef, vae_params)
    latents = _latents_from_batch(vae, batch, config.vae.latent_scale, config.vae.sample_posterior, r_post)
    with precision.compute_dtype(config.model.compute_dtype):
      return model.loss(latents, batch["label"], r_model)

  return loss_fn


def train_flowar(config: ml_collections.ConfigDict, workdir: str) -> tuple[nnx.GraphDef, object]:
  """Trains FlowAR in WORKDIR (resuming if a checkpoint is there); returns (graphdef, state).

  With `vae.latent_scale == 0` the scale is measured first and stored in the checkpoint's config.
  """
  plan = ShardingPlan.from_config(config)
  vae = load_vae(config, workdir, plan)
  vae_graphdef, vae_params = split_params(vae)
  if config.vae.latent_scale <= 0:
    config = resolve_latent_scale(config, vae, workdir)
  if config.data.cache_latents:
    iterator = latent_cache.make_latent_iterator(vae, config, workdir)
  else:
    iterator = data.make_train_iterator(config.data, config.batch_size, config.seed,
                                        shard_index=jax.process_index(), shard_count=jax.process_count())
  tx, schedule = flowar_optimizer(config.optimizer, config.batch_size, config.num_train_steps)
  model_factory = functools.partial(build_model, config, config.seed)
  graphdef, _ = split_params(nnx.eval_shape(model_factory))
  periodic = []
  if config.eval.every_steps > 0:
    from flowar_jax.training.periodic_evaluation import periodic_evaluation  # pylint: disable=g-import-not-at-top
    periodic.append(loop.Periodic(config.eval.every_steps, periodic_evaluation(config, workdir, graphdef, vae, plan)))
  logging.info("FlowAR: %d steps at batch %d, peak lr %.2e", config.num_train_steps, config.batch_size,
               config.optimizer.base_lr * config.batch_size / 256)
  with MetricWriter(workdir) as writer:
    if config.sample_every_steps:
      periodic.append(loop.Periodic(config.sample_every_steps, SampleGrids(config, graphdef, vae, writer, plan)))
    return loop.train(
        workdir=workdir, model_factory=model_factory,
        loss_fn=flowar_loss_fn(vae_graphdef, config), tx=tx, schedule=schedule,
        ema_decay=config.optimizer.ema_decay, data_iterator=iterator, num_steps=config.num_train_steps,
        config=config, seed=config.seed, checkpoint_every=config.checkpoint_every_steps,
        keep=config.keep_checkpoints, log_every=config.log_every_steps, context=vae_params, desc="flowar",
        batch_size=config.batch_size, tokens_per_image=sum(side * side for side in config.model.scales),
        periodic=periodic, writer=writer,
        max_consecutive_nonfinite=config.max_consecutive_nonfinite_steps, plan=plan)
