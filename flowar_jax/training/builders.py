"""Building the models of a config."""
from __future__ import annotations

import ml_collections
from flax import nnx

from flowar_jax.models.flowar import FlowAR
from flowar_jax.models.vae import AutoencoderKL


def build_vae(config: ml_collections.ConfigDict, seed: int = 0) -> AutoencoderKL:
  return AutoencoderKL(config.vae, rngs=nnx.Rngs(seed))


def build_flowar(config: ml_collections.ConfigDict, seed: int = 0) -> FlowAR:
  return FlowAR(config.model, config.vae.latent_channels, rngs=nnx.Rngs(seed))
