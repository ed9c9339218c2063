"""Building the models of a config, and loading trained ones from checkpoints."""
from __future__ import annotations

import ml_collections
from flax import nnx

from flowar_jax.models.flowar import FlowAR
from flowar_jax.models.vae import AutoencoderKL
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.training.checkpointing import restore_params_only
from flowar_jax.training.state import split_params


def build_vae(config: ml_collections.ConfigDict, seed: int = 0) -> AutoencoderKL:
  return AutoencoderKL(config.vae, rngs=nnx.Rngs(seed))


def build_flowar(config: ml_collections.ConfigDict, seed: int = 0) -> FlowAR:
  return FlowAR(config.model, config.vae.latent_channels, rngs=nnx.Rngs(seed))


def load_params(model_factory, directory: str, *, use_ema: bool, step: int | None = None,
                plan: ShardingPlan | None = None) -> nnx.Module:
  """Builds the model's structure without allocating, then fills it from a checkpoint's params or EMA.

  With a `plan`, each parameter is read straight into its sharded layout; else onto the first device.
  """
  abstract = nnx.eval_shape(model_factory)
  graphdef, abstract_params = split_params(abstract)
  if plan is not None:
    abstract_params = plan.abstract(abstract_params)
  params = restore_params_only(directory, abstract_params, step=step, use_ema=use_ema)
  return nnx.merge(graphdef, params)
