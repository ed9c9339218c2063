"""Generators by name: `config.model.name` picks the builder that training, sampling, conversion, `summary` and
`compile` all construct their model with; `build_vae` builds the frozen autoencoder the generators work on."""
from __future__ import annotations

from typing import Callable

import ml_collections
from flax import nnx

from flowar_jax.models.flowar import FlowAR
from flowar_jax.models.vae import AutoencoderKL

# A builder: (config, seed) -> the model, its parameters initialised from `seed`.
ModelBuilder = Callable[[ml_collections.ConfigDict, int], nnx.Module]


def _build_flowar(config: ml_collections.ConfigDict, seed: int) -> FlowAR:
  return FlowAR(config.model, config.vae.latent_channels, rngs=nnx.Rngs(seed))


MODELS: dict[str, ModelBuilder] = {"flowar": _build_flowar}


def check_model_name(name: str) -> None:
  """A clear error for a `config.model.name` the registry does not know, listing the names it does."""
  if name not in MODELS:
    raise ValueError(f"config.model.name {name!r} is not a known model; known models: {', '.join(sorted(MODELS))}")


def build_model(config: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
  """The generator `config.model.name` names, built for `config`."""
  check_model_name(config.model.name)
  return MODELS[config.model.name](config, seed)


def build_vae(config: ml_collections.ConfigDict, seed: int = 0) -> AutoencoderKL:
  return AutoencoderKL(config.vae, rngs=nnx.Rngs(seed))
