"""Trained weights from a run's checkpoints, read straight into the models' (optionally sharded) layout."""
from __future__ import annotations

import functools

import ml_collections
from flax import nnx

from flowar_jax.models.params import split_params
from flowar_jax.models.registry import build_tokenizer_trainable
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.runs.checkpointing import restore_params_only
from flowar_jax.runs.workdir import find_vae_checkpoints


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


def load_vae(config: ml_collections.ConfigDict, workdir: str, plan: ShardingPlan | None = None) -> nnx.Module:
  """The trained tokenizer (its latest raw parameters) for a run in WORKDIR, sharded by `plan` if given: FlowAR's
  KL VAE or VAR's VQVAE."""
  directory = find_vae_checkpoints(config, workdir)
  return load_params(functools.partial(build_tokenizer_trainable, config), directory, use_ema=False, plan=plan).vae
