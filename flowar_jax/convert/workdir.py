"""Writing converted official weights as a workdir that `sample` and `evaluate` read like a trained run.

WORKDIR/checkpoints/0/       {'step', 'params', 'ema_params'} of the generator (both the chosen weights) + the config
WORKDIR/vae/checkpoints/0/   {'step', 'params', 'ema_params'} of the tokenizer stage's module + the config

`config.model.name` says which official code the files come from: FlowAR with MAR's KL-16 VAE, VAR with its
multi-scale VQVAE, or HART's hybrid tokenizer. HART's official transformer (`HARTForT2I`) is text-conditional and
the generator here is class-conditional (class embedding and start tokens in place of the context projection), so
only HART's tokenizer converts; the generator stage then trains on it (`--config.stage=hart`).
"""
from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from flowar_jax.convert import names
from flowar_jax.convert.params import params_from_state_dict
from flowar_jax.convert import var as var_names
from flowar_jax.convert.hart import tokenizer_state_dict_unwrapped
from flowar_jax.convert.sizes import check_published_heads, describe_flowar
from flowar_jax.models.params import split_params
from flowar_jax.models.registry import build_model, build_tokenizer_trainable
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
  factory = functools.partial(build_tokenizer_trainable, config)
  _, abstract = split_params(nnx.eval_shape(factory))
  vae = params_from_state_dict(state_dict, abstract["vae"], to_flax=names.vae_to_flax, to_torch=names.vae_to_torch,
                               skipped=names.vae_skipped, where=where)
  if "disc" in abstract:
    _, abstract = split_params(factory())
  abstract["vae"] = vae
  return abstract


def var_params(config: ml_collections.ConfigDict, state_dict: dict[str, np.ndarray], where: str = "the checkpoint"):
  """Official VAR state dict -> our VAR's params for `config`."""
  _, abstract = split_params(nnx.eval_shape(functools.partial(build_model, config)))
  return params_from_state_dict(state_dict, abstract, to_flax=var_names.var_to_flax, to_torch=var_names.var_to_torch,
                                skipped=var_names.var_skipped, where=where)


def vqvae_params(config: ml_collections.ConfigDict, state_dict: dict[str, np.ndarray], where: str = "the checkpoint"):
  """Official VQVAE state dict -> the params of VAR's tokenizer stage module for `config`."""
  _, abstract = split_params(nnx.eval_shape(functools.partial(build_tokenizer_trainable, config)))
  abstract["vae"] = params_from_state_dict(
      state_dict, abstract["vae"], to_flax=var_names.vqvae_to_flax,
      to_torch=var_names.vqvae_to_torch_for(config.vae.share_quant_resi), skipped=var_names.vqvae_skipped,
      where=where)
  # Codebook usage is training bookkeeping the official file does not hold: it starts from zero, as training's.
  abstract["codebook_stats"] = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract["codebook_stats"])
  return abstract


HART_TRANSFORMER_ERROR = (
    "HART's official transformer (HARTForT2I) is text-conditional: it has a context projection and no class "
    "embedding or start tokens, so it cannot be converted into this framework's class-conditional HART. Convert "
    "the tokenizer alone (--vae_torch, no --from_torch) and train the generator stage on it "
    "(train --config.stage=hart)")


def hart_params(config: ml_collections.ConfigDict, state_dict: dict[str, np.ndarray], where: str = "the checkpoint"):
  """Always an error: see `HART_TRANSFORMER_ERROR`."""
  raise ValueError(f"{where}: {HART_TRANSFORMER_ERROR}")


def hybrid_params(config: ml_collections.ConfigDict, state_dict: dict[str, np.ndarray],
                  where: str = "the checkpoint"):
  """Official HART tokenizer state dict (bare, or the released autoencoder-with-discriminator wrapper: `vae.*`
  read, `disc.*` not) -> the params of HART's tokenizer stage module for `config`. Its names are VAR's VQVAE's."""
  return vqvae_params(config, tokenizer_state_dict_unwrapped(state_dict), where)


def _save(directory: str, params, config: ml_collections.ConfigDict) -> None:
  if checkpoint_exists(directory):
    raise ValueError(f"{directory!r} already holds checkpoints: convert into a new workdir")
  state = {"step": np.asarray(CONVERTED_STEP, np.int32), "params": params, "ema_params": params}
  with Checkpointer(directory, keep=None, async_save=False) as checkpointer:
    checkpointer.save(CONVERTED_STEP, state, config=config)


def converted_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config stored with converted weights: `config` with the tokenizer in WORKDIR/vae (and for FlowAR,
  MAR's latent scale)."""
  config = config.copy_and_resolve_references()
  if config.model.name == "flowar":
    config.vae.latent_scale = MAR_LATENT_SCALE
  config.vae_checkpoint = ""
  return config


_CONVERTERS = {"flowar": (flowar_params, vae_params), "var": (var_params, vqvae_params),
               "hart": (hart_params, hybrid_params)}


def write_workdir(config: ml_collections.ConfigDict, workdir: str, flowar_state_dict: dict[str, np.ndarray] | None,
                  vae_state_dict: dict[str, np.ndarray] | None = None) -> list[str]:
  """Converts and saves the given state dicts into `workdir`; returns the checkpoint directories written.

  Every state dict is converted (and checked) before anything is written.
  """
  config = converted_config(config)
  model, tokenizer = _CONVERTERS[config.model.name]
  todo = []
  if flowar_state_dict is not None:
    todo.append((checkpoint_dir(workdir), model(config, flowar_state_dict, f"the {config.model.name} checkpoint")))
  if vae_state_dict is not None:
    todo.append((checkpoint_dir(os.path.join(workdir, "vae")),
                 tokenizer(config, vae_state_dict, "the VAE checkpoint")))
  for directory, params in todo:
    _save(directory, params, config)
  return [directory for directory, _ in todo]
