"""What the VQ tokenizer stage trains and checkpoints: VAR's multi-scale VQVAE and its codebook statistics.

The trained tokenizer is `VQTrainable(config).vqvae`, a plain `MultiScaleVQVAE`; restore a checkpoint's
params into `VQTrainable` (e.g. `runs.loaders.load_params(functools.partial(VQTrainable, config), directory,
use_ema=False).vqvae`).
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from flowar_jax.tokenizers.msvq import MultiScaleVQVAE


def vqvae_kwargs(tokenizer_config: ml_collections.ConfigDict) -> dict:
  """`config.vae` of a VAR config -> the `MultiScaleVQVAE` keyword arguments (all its keys but `train`)."""
  return {k: v for k, v in tokenizer_config.to_dict().items() if k != "train"}


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
  """The multi-scale VQVAE of `config.vae` (its `MultiScaleVQVAE` keyword arguments) and its codebook's usage."""

  def __init__(self, config: ml_collections.ConfigDict, seed: int = 0):
    self.vqvae = MultiScaleVQVAE(**vqvae_kwargs(config.vae), rngs=nnx.Rngs(seed))
    self.codebook_stats = CodebookStats(self.vqvae.vocab_size)
