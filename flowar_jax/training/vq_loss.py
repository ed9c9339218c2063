"""The loss of VQ tokenizer training: reconstruction (L1 + L2) and the multi-scale VQ terms. Pure, jit-friendly.

  loss = l1_weight * mean|x - x'| + l2_weight * mean (x - x')^2 + codebook + commitment_weight * commitment

with x' decoded (unclipped) from the straight-through f_hat, and the codebook / commitment terms of
`VectorQuantizer.quantize_for_training` (each a mean over the scales of a per-element mean).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from flowar_jax.tokenizers.msvq import MultiScaleVQVAE, TrainingQuantization


def reconstruct_for_training(vqvae: MultiScaleVQVAE, images: jax.Array
                             ) -> tuple[jax.Array, TrainingQuantization]:
  """Images `[B, H, W, 3]` in [-1, 1] -> (reconstruction `[B, H, W, 3]`, not clipped so every pixel has a
  gradient; the quantisation it came from)."""
  quantized = vqvae.quantize.quantize_for_training(vqvae.features(images))
  return vqvae.decoder(vqvae.post_quant_conv(quantized.f_hat)), quantized


def vq_loss(vqvae: MultiScaleVQVAE, images: jax.Array, train_config: ml_collections.ConfigDict
            ) -> tuple[jax.Array, dict, TrainingQuantization]:
  """Objective for images `[B, H, W, 3]` in [-1, 1] and `config.vae.train` -> (scalar loss, scalar metrics, the
  quantisation). Metrics: `l1`, `l2`, and `vq_mse`, the codebook term's value (the commitment term has the
  same value; the two differ only in where their gradients go)."""
  recon, quantized = reconstruct_for_training(vqvae, images)
  error = recon - images
  l1 = jnp.mean(jnp.abs(error))
  l2 = jnp.mean(jnp.square(error))
  loss = (train_config.l1_weight * l1 + train_config.l2_weight * l2 + quantized.codebook_loss
          + train_config.commitment_weight * quantized.commitment_loss)
  metrics = {"l1": l1, "l2": l2, "vq_mse": quantized.codebook_loss}
  return loss, metrics, quantized
