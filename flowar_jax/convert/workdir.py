"""Writing converted official weights as a workdir that `sample` and `evaluate` read like a trained run.

WORKDIR/checkpoints/0/       {'step', 'params', 'ema_params'} of FlowAR (both the chosen weights) + the config
WORKDIR/vae/checkpoints/0/   {'step', 'params', 'ema_params'} of the VAE stage's module + the config
"""
from __future__ import annotations

import functools
import os

import ml_collections
import numpy as np
from flax import nnx

from flowar_jax.convert import names
from flowar_jax.convert.params import params_from_state_dict
from flowar_jax.convert.sizes import check_published_heads, describe_flowar
from flowar_jax.models.params import split_params
from flowar_jax.models.registry import build_model
from flowar_jax.models.vae_trainable import VAETrainable
from flowar_jax.runs.checkpointing import Checkpointer, checkpoint_exists
from flowar_jax.runs.workdir import checkpoint_dir

CONVERTED_STEP = 0
MAR_LATENT_SCALE = 0.2325  # the official code's latent normalisation for MAR's KL-16 VAE


def flowar_params(config: ml_collections.ConfigDict, state_dict: dict[str, np.ndarray], where: str = "the checkpoint"):
  """Official FlowAR state dict -> our FlowAR params (an nnx.State) for `config`; errors name misfits and the
  checkpoint's size (with the preset for a released one)."""
  _, abstract = split_params(nnx.eval_shape(functools.partial(build_model, config)))
  try:
    params = params_from_state_dict(state_dict, abstract, to_flax=names.flowar_to_flax,
                                    to_torch=names.flowar_to_torch, skipped=names.flowar_skipped, where=where)
  except ValueError as e:
    raise ValueError(f"{e}. {describe_flowar(state_dict)}") from None
  check_published_heads(state_dict, config.model.num_heads, config.model.head.head_dim)
  return params


def vae_params(config: ml_collections.ConfigDict, state_dict: dict[str, np.ndarray], where: str = "the checkpoint"):
  """Official VAE state dict -> the params of the VAE stage's module (`VAETrainable`) for `config`.

  A discriminator (only when config.vae.train.disc_weight > 0) is not in the official file and keeps its init.
  """
  factory = functools.partial(VAETrainable, config)
  _, abstract = split_params(nnx.eval_shape(factory))
  vae = params_from_state_dict(state_dict, abstract["vae"], to_flax=names.vae_to_flax, to_torch=names.vae_to_torch,
                               skipped=names.vae_skipped, where=where)
  if "disc" in abstract:
    _, abstract = split_params(factory())
  abstract["vae"] = vae
  return abstract


def _save(directory: str, params, config: ml_collections.ConfigDict) -> None:
  if checkpoint_exists(directory):
    raise ValueError(f"{directory!r} already holds checkpoints: convert into a new workdir")
  state = {"step": np.asarray(CONVERTED_STEP, np.int32), "params": params, "ema_params": params}
  with Checkpointer(directory, keep=None, async_save=False) as checkpointer:
    checkpointer.save(CONVERTED_STEP, state, config=config)


def converted_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config stored with converted weights: `config` with MAR's latent scale and the VAE in WORKDIR/vae."""
  config = config.copy_and_resolve_references()
  config.vae.latent_scale = MAR_LATENT_SCALE
  config.vae_checkpoint = ""
  return config


def write_workdir(config: ml_collections.ConfigDict, workdir: str, flowar_state_dict: dict[str, np.ndarray] | None,
                  vae_state_dict: dict[str, np.ndarray] | None = None) -> list[str]:
  """Converts and saves the given state dicts into `workdir`; returns the checkpoint directories written.

  Every state dict is converted (and checked) before anything is written.
  """
  config = converted_config(config)
  todo = []
  if flowar_state_dict is not None:
    todo.append((checkpoint_dir(workdir), flowar_params(config, flowar_state_dict, "the FlowAR checkpoint")))
  if vae_state_dict is not None:
    todo.append((checkpoint_dir(os.path.join(workdir, "vae")),
                 vae_params(config, vae_state_dict, "the VAE checkpoint")))
  for directory, params in todo:
    _save(directory, params, config)
  return [directory for directory, _ in todo]
