"""What VAR's tokenizer stage trains and checkpoints: the multi-scale VQVAE, under the attribute name the KL
VAE's stage uses (`vae`), so both families' tokenizer checkpoints have one layout, and its codebook's usage.

The trained tokenizer is `.vae`, a plain `MultiScaleVQVAE`: restore a checkpoint's params into
`VQTrainable(MultiScaleVQVAE(**vqvae_kwargs(config.vae), rngs=...))` and take `.vae`.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from flowar_jax.tokenizers.msvq import MultiScaleVQVAE


def vqvae_kwargs(vae: ml_collections.ConfigDict) -> dict:
  """`config.vae` of a VAR config -> `MultiScaleVQVAE`'s keyword arguments (its `train` subsection left out)."""
  kwargs = {k: v for k, v in vae.to_dict().items() if k != "train"}
  for key in ("ch_mult", "patch_nums"):
    if key in kwargs:
      kwargs[key] = tuple(kwargs[key])
  return kwargs


class CodebookStats(nnx.Module):
  """Per-code usage, kept as parameters so that checkpoints carry it; no loss reads it, so no gradient
  reaches it (training's `codebook.codebook_update` writes it after each step).

  rate: `[V]` EMA of each code's hits relative to the uniform rate, from 0 (at creation and restart).
  weight: `[V]` the same EMA of a constant 1 (1 - decay^steps), which debiases `rate` as Adam debiases its
    moments: rate / weight estimates the recent relative hit rate even for a young code.
  restarted: `[]` how many codes have been restarted so far (float32: parameters must be differentiable).
  """

  def __init__(self, vocab_size: int):
    self.rate = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))
    self.weight = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))
    self.restarted = nnx.Param(jnp.zeros((), jnp.float32))


class VQTrainable(nnx.Module):
  """The multi-scale VQVAE (`.vae`) and its codebook's usage statistics (`.codebook_stats`)."""

  def __init__(self, vqvae: MultiScaleVQVAE):
    self.vae = vqvae
    self.codebook_stats = CodebookStats(vqvae.vocab_size)
