"""Losses of VAE training: reconstruction + KL, and an optional hinge PatchGAN term. Pure and jit-friendly.

Scaling: LDM sums the reconstruction error over each sample's pixels and the KL over its latent elements,
then weighs the KL by `kl_weight` (1e-6). Here the whole objective is divided by the pixel count H * W * Cin,
so reconstruction terms read as per-pixel means while the KL keeps LDM's weight relative to them:
  loss = l1_weight * mean|x - x'| + l2_weight * mean (x - x')^2 + kl_weight * KL / (H * W * Cin)
         [+ disc_weight * adv_factor * (-mean D(x'))]
where KL is the batch mean of each sample's summed KL (reported as metric `kl`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from flowar_jax.models.discriminator import PatchDiscriminator
from flowar_jax.models.vae import AutoencoderKL, DiagonalGaussian


def reconstruct(vae: AutoencoderKL, images: jax.Array, rng: jax.Array
                ) -> tuple[jax.Array, DiagonalGaussian]:
  """Images `[B, H, W, Cin]` -> (reconstruction from a posterior sample, posterior), as `vae_loss` draws them.

  A discriminator step given the same `rng` sees exactly the generator step's fake images.
  """
  sample_rng, dropout_rng = jax.random.split(rng)
  return vae(images, sample_rng, dropout_rng=dropout_rng)


def adversarial_factor(step: jax.Array | int, start_step: int) -> jax.Array:
  """1.0 once `step >= start_step`, else 0.0, as a traced float (no recompilation when it switches on)."""
  return jnp.where(jnp.asarray(step) >= start_step, 1.0, 0.0).astype(jnp.float32)


def generator_adversarial_loss(disc: PatchDiscriminator, fake: jax.Array) -> jax.Array:
  """Hinge generator loss -mean(D(fake)) for fake images `[B, H, W, Cin]` -> scalar."""
  return -jnp.mean(disc(fake))


def discriminator_loss(disc: PatchDiscriminator, real: jax.Array, fake: jax.Array) -> tuple[jax.Array, dict]:
  """Hinge loss 0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake))) -> (scalar, metrics).

  Images are `[B, H, W, Cin]`; gradients do not flow into them (only into `disc`).
  """
  logits_real = disc(jax.lax.stop_gradient(real))
  logits_fake = disc(jax.lax.stop_gradient(fake))
  loss = 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))
  metrics = {"disc_loss": loss, "logits_real": jnp.mean(logits_real), "logits_fake": jnp.mean(logits_fake)}
  return loss, metrics


def vae_loss(vae: AutoencoderKL, images: jax.Array, rng: jax.Array, train_config: ml_collections.ConfigDict,
             *, disc: PatchDiscriminator | None = None, step: jax.Array | int | None = None
             ) -> tuple[jax.Array, dict]:
  """Generator objective for images `[B, H, W, Cin]` in [-1, 1] -> (scalar loss, scalar metrics).

  `train_config` is `config.vae.train`. With `disc_weight > 0`, `disc` and the current `step` are required and
  the adversarial term counts from `disc_start_step` on; gradients of the result w.r.t. `vae` do not update
  `disc` (differentiate w.r.t. the VAE only).
  """
  use_disc = train_config.disc_weight > 0
  if use_disc and (disc is None or step is None):
    raise ValueError("vae.train.disc_weight > 0 needs the discriminator and the current step: pass disc= and "
                     "step= to vae_loss")
  recon, posterior = reconstruct(vae, images, rng)
  error = recon - images
  l1 = jnp.mean(jnp.abs(error))
  l2 = jnp.mean(jnp.square(error))
  kl = jnp.mean(posterior.kl())
  pixels_per_sample = images.shape[1] * images.shape[2] * images.shape[3]
  loss = (train_config.l1_weight * l1 + train_config.l2_weight * l2
          + train_config.kl_weight * kl / pixels_per_sample)
  metrics = {"l1": l1, "l2": l2, "kl": kl}
  if use_disc:
    adv = generator_adversarial_loss(disc, recon)
    factor = adversarial_factor(step, train_config.disc_start_step)
    loss = loss + train_config.disc_weight * factor * adv
    metrics.update(adv=adv, adv_factor=factor)
  return loss, metrics
