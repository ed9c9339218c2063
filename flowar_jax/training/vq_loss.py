"""The loss of VQ tokenizer training: reconstruction (L1 + L2) and the multi-scale VQ terms. Pure, jit-friendly.

  loss = l1_weight * mean|x - x'| + l2_weight * mean (x - x')^2 + codebook + commitment_weight * commitment

with x' decoded (unclipped) from the straight-through f_hat, and the codebook / commitment terms of
`VectorQuantizer.quantize_for_training` (each a mean over the scales of a per-element mean).

HART's hybrid tokenizer trains with the same loss, but each step decodes one of two latents (`hybrid_vq_loss`):
the discrete sum (VAR's f_hat) or, on the continuous path, the full continuous latent f. The VQ terms are the
same on both paths.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from flowar_jax.tokenizers.hybrid import HybridTokenizer
from flowar_jax.tokenizers.msvq import MultiScaleVQVAE, TrainingQuantization


def reconstruct_for_training(vqvae: MultiScaleVQVAE, images: jax.Array
                             ) -> tuple[jax.Array, TrainingQuantization]:
  """Images `[B, H, W, 3]` in [-1, 1] -> (reconstruction `[B, H, W, 3]`, not clipped so every pixel has a
  gradient; the quantisation it came from)."""
  quantized = vqvae.quantize.quantize_for_training(vqvae.features(images))
  return vqvae.decoder(vqvae.post_quant_conv(quantized.f_hat)), quantized


def _objective(recon: jax.Array, images: jax.Array, quantized: TrainingQuantization,
               train_config: ml_collections.ConfigDict) -> tuple[jax.Array, dict]:
  """The weighted loss above and its metrics `l1`, `l2`, `vq_mse`."""
  error = recon - images
  l1 = jnp.mean(jnp.abs(error))
  l2 = jnp.mean(jnp.square(error))
  loss = (train_config.l1_weight * l1 + train_config.l2_weight * l2 + quantized.codebook_loss
          + train_config.commitment_weight * quantized.commitment_loss)
  return loss, {"l1": l1, "l2": l2, "vq_mse": quantized.codebook_loss}


def vq_loss(vqvae: MultiScaleVQVAE, images: jax.Array, train_config: ml_collections.ConfigDict
            ) -> tuple[jax.Array, dict, TrainingQuantization]:
  """Objective for images `[B, H, W, 3]` in [-1, 1] and `config.vae.train` -> (scalar loss, scalar metrics, the
  quantisation). Metrics: `l1`, `l2`, and `vq_mse`, the codebook term's value (the commitment term has the
  same value; the two differ only in where their gradients go)."""
  recon, quantized = reconstruct_for_training(vqvae, images)
  loss, metrics = _objective(recon, images, quantized, train_config)
  return loss, metrics, quantized


def residual_statistics(tokenizer: HybridTokenizer, quantized: TrainingQuantization, f: jax.Array) -> dict:
  """Scalar statistics of the continuous residual, gradient-free, from the training walk over features
  f `[B, h, h, Cvae]`: `residual_abs`, mean |residual| per element, and `residual_energy_share`,
  sum residual^2 / sum f^2 (the share of the latent's energy the discrete tokens miss). The residual is the
  one HART's head generates (`HybridTokenizer.residual`)."""
  residual = jax.lax.stop_gradient(tokenizer.training_residual(quantized))
  f = jax.lax.stop_gradient(f)
  energy = jnp.sum(jnp.square(residual)) / jnp.maximum(jnp.sum(jnp.square(f)), 1e-12)
  return {"residual_abs": jnp.mean(jnp.abs(residual)), "residual_energy_share": energy}


def hybrid_vq_loss(tokenizer: HybridTokenizer, images: jax.Array, train_config: ml_collections.ConfigDict,
                   continuous: jax.Array | bool) -> tuple[jax.Array, dict, TrainingQuantization]:
  """HART's training objective for images `[B, H, W, 3]` in [-1, 1]: `vq_loss` with the decoder fed the
  discrete sum (straight-through, as VAR's) or, when `continuous` (a bool or traced bool scalar), the full
  continuous latent f, as `HybridTokenizer.training_forward` does. -> (scalar loss, scalar metrics, the
  quantisation). Metrics: `vq_loss`'s, `residual_statistics`' and `continuous` (1.0 on the continuous path)."""
  f = tokenizer.features(images)
  quantized = tokenizer.quantize.quantize_for_training(f)
  # f itself, not a straight-through f_hat: the continuous path's decoder sees (and trains the encoder on) f.
  latent = jnp.where(continuous, f, quantized.f_hat)
  recon = tokenizer.decoder(tokenizer.post_quant_conv(latent))
  loss, metrics = _objective(recon, images, quantized, train_config)
  metrics.update(residual_statistics(tokenizer, quantized, f),
                 continuous=jnp.asarray(continuous, jnp.float32))
  return loss, metrics, quantized
