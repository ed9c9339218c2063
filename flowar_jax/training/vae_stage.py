"""Stage 1: the KL autoencoder (optionally with a patch discriminator), trained by the shared loop."""
from __future__ import annotations

import functools

import jax
import ml_collections
import optax
from flax import nnx

from flowar_jax import data
from flowar_jax.models.vae_trainable import VAETrainable
from flowar_jax.training import loop
from flowar_jax.training.optimizer import adamw, warmup_cosine
from flowar_jax.training.vae_loss import discriminator_loss, reconstruct, vae_loss

VAE_EMA_DECAY = 0.999


def vae_stage_loss(train_config: ml_collections.ConfigDict):
  """One objective for both players: the generator term sees a gradient-stopped copy of the discriminator,
  and the discriminator term sees gradient-stopped images, so one gradient step updates each on its own loss."""

  def loss_fn(model: VAETrainable, batch, rng, context, step):
    images = batch["image"]
    if model.disc is None:
      return vae_loss(model.vae, images, rng, train_config)
    disc_graph, disc_params = nnx.split(model.disc)
    frozen_disc = nnx.merge(disc_graph, jax.lax.stop_gradient(disc_params))
    loss, metrics = vae_loss(model.vae, images, rng, train_config, disc=frozen_disc, step=step)
    fake, _ = reconstruct(model.vae, images, rng)
    d_loss, d_metrics = discriminator_loss(model.disc, images, fake)
    factor = (step >= train_config.disc_start_step).astype(loss.dtype)
    return loss + factor * d_loss, dict(metrics, **d_metrics)

  return loss_fn


def vae_optimizer(train_config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW for `config.vae.train`: GAN betas (0.5, 0.9) with a discriminator, else (0.9, 0.999)."""
  schedule = warmup_cosine(train_config.learning_rate, train_config.warmup_steps, train_config.num_train_steps,
                           train_config.learning_rate * 0.1)
  tx = adamw(schedule, b1=0.5 if train_config.disc_weight > 0 else 0.9, b2=0.9 if train_config.disc_weight > 0
             else 0.999, weight_decay=0.0, grad_clip=1.0)
  return tx, schedule


def _without_captions(batch: dict) -> dict:
  """The VAE trains on images alone; a captioned dataset's 'text' (strings) never reaches the device."""
  return {key: value for key, value in batch.items() if key != "text"}


def train_vae(config: ml_collections.ConfigDict, workdir: str):
  """Trains the VAE in `workdir` (resuming if a checkpoint is there)."""
  train_config = config.vae.train
  iterator = data.make_train_iterator(config.data, train_config.batch_size, config.seed,
                                      shard_index=jax.process_index(), shard_count=jax.process_count(),
                                      batch_map=_without_captions)
  tx, schedule = vae_optimizer(train_config)
  return loop.train(
      workdir=workdir, model_factory=functools.partial(VAETrainable, config, config.seed),
      loss_fn=vae_stage_loss(train_config), tx=tx, schedule=schedule, ema_decay=VAE_EMA_DECAY,
      data_iterator=iterator, num_steps=train_config.num_train_steps, config=config, seed=config.seed,
      checkpoint_every=config.checkpoint_every_steps, keep=config.keep_checkpoints,
      log_every=config.log_every_steps, desc="vae",
      batch_size=train_config.batch_size, max_consecutive_nonfinite=config.max_consecutive_nonfinite_steps)
