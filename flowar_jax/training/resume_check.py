"""Before any compute: does the config still describe the runs whose checkpoints are in the workdir?

Each checkpoint stores the config it was trained with. A setting that decides the shapes of a stage's
train state (its architecture) must match, or resuming would fail after the other stage has trained, deep
in a restore; the error names every such key with both values. Settings that only change how training
goes on (seed, batch size, schedule, data) are allowed, with a warning: the resumed run is then no
longer the run it would have been.
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections
from absl import logging

from flowar_jax.config import trains_generator, trains_tokenizer
from flowar_jax.runs import fs
from flowar_jax.runs.checkpointing import Checkpointer, checkpoint_exists
from flowar_jax.runs.workdir import checkpoint_dir, vae_dir

_Key = str | tuple[str, Callable[[dict], Any]]  # a dotted key, or a name and how to derive it

FLOWAR_ARCHITECTURE: tuple[_Key, ...] = (
    "model.name", "model.scales", "model.width", "model.depth", "model.num_heads", "model.mlp_ratio", "model.num_classes",
    "model.head.variant", "model.head.depth", "model.head.width", "model.head.head_dim", "model.head.mlp_ratio",
    "vae.latent_channels",
    ("optimizer.grad_clip > 0", lambda flat: flat["optimizer.grad_clip"] > 0),  # adds a clipping stage
    # Text conditioning: the encoder's widths shape the projections, and another encoder (or its weights, or
    # context length) gives the model different conditions than it was trained on.
    "model.conditioning", "text.encoder", "text.weights", "text.tokenizer", "text.max_length", "text.clip_size",
)
VAE_ARCHITECTURE: tuple[_Key, ...] = (
    "vae.in_channels", "vae.base_channels", "vae.channel_multipliers", "vae.encoder_blocks", "vae.decoder_blocks",
    "vae.latent_channels", "vae.norm_groups",
    ("vae.train.disc_weight > 0", lambda flat: flat["vae.train.disc_weight"] > 0),  # adds the discriminator
)
VAR_ARCHITECTURE: tuple[_Key, ...] = (
    "model.name", "model.depth", "model.width", "model.num_heads", "model.mlp_ratio", "model.num_classes",
    "model.shared_aln", "model.attn_l2_norm", "vae.vocab_size", "vae.z_channels", "vae.patch_nums",
    ("optimizer.grad_clip > 0", lambda flat: flat["optimizer.grad_clip"] > 0),
)
HART_ARCHITECTURE: tuple[_Key, ...] = (
    "model.name", "model.depth", "model.width", "model.num_heads", "model.mlp_ratio", "model.num_classes",
    "model.mlp", "model.adaln", "model.timestep_level", "model.attn_l2_norm", "model.residual.width",
    "model.residual.depth", "model.residual.kind", "vae.vocab_size", "vae.z_channels", "vae.patch_nums",
    ("optimizer.grad_clip > 0", lambda flat: flat["optimizer.grad_clip"] > 0),
)
VQVAE_ARCHITECTURE: tuple[_Key, ...] = (
    "model.name", "vae.vocab_size", "vae.z_channels", "vae.ch", "vae.ch_mult", "vae.num_res_blocks",
    "vae.share_quant_resi", "vae.quant_conv_ks", "vae.patch_nums",
)
_DATA = ("data.name", "data.data_dir", "data.image_size", "data.resize_size", "data.random_crop", "data.random_flip",
         "data.eval_fraction")
FLOWAR_TRAJECTORY: tuple[_Key, ...] = (
    "seed", "batch_size", "num_train_steps", *_DATA, "data.cache_latents", "model.label_drop_prob",
    "model.attn_dropout", "model.proj_dropout", "vae.sample_posterior", "optimizer.base_lr", "optimizer.min_lr",
    "optimizer.warmup_steps", "optimizer.b1", "optimizer.b2", "optimizer.weight_decay", "optimizer.grad_clip",
    "optimizer.ema_decay", "text.drop_prob",
    # A measured scale (0 in the config) is taken from the checkpoint; a given one must agree with it.
    ("vae.latent_scale", lambda flat: flat["vae.latent_scale"] or None),
)
VAE_TRAJECTORY: tuple[_Key, ...] = (
    "seed", *_DATA, "vae.dropout", "vae.train.batch_size", "vae.train.num_train_steps", "vae.train.learning_rate",
    "vae.train.warmup_steps", "vae.train.kl_weight", "vae.train.l1_weight", "vae.train.l2_weight",
    "vae.train.disc_weight", "vae.train.disc_start_step", "vae.train.disc_channels", "vae.train.disc_layers",
)

VAR_TRAJECTORY: tuple[_Key, ...] = (
    "seed", "batch_size", "num_train_steps", *_DATA, "model.cond_drop_rate", "model.drop_path_rate",
    "optimizer.base_lr", "optimizer.min_lr", "optimizer.warmup_steps", "optimizer.b1", "optimizer.b2",
    "optimizer.weight_decay", "optimizer.grad_clip", "optimizer.ema_decay",
)
HART_TRAJECTORY: tuple[_Key, ...] = VAR_TRAJECTORY + ("model.residual.batch_mul",)
VQVAE_TRAJECTORY: tuple[_Key, ...] = (
    "seed", *_DATA, "vae.quant_resi", "vae.using_znorm", "vae.train.batch_size", "vae.train.num_train_steps",
    "vae.train.learning_rate", "vae.train.warmup_steps", "vae.train.l1_weight", "vae.train.l2_weight",
    "vae.train.commitment_weight", "vae.train.usage_decay", "vae.train.restart_every_steps",
    "vae.train.dead_code_threshold",
)
HYBRID_TRAJECTORY: tuple[_Key, ...] = VQVAE_TRAJECTORY + ("vae.train.skip_continuous_prob",)


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in values.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return flat


def _value(flat: dict, key: _Key) -> tuple[str, Any]:
  if isinstance(key, tuple):
    name, derive = key
    try:
      return name, derive(flat)
    except KeyError:  # a checkpoint from a config schema without that key
      return name, None
  return key, flat.get(key)


def differences(stored: dict, current: ml_collections.ConfigDict, keys: tuple[_Key, ...]) -> list[str]:
  """`'config.KEY is A in the checkpoint but B now'` for each key whose value differs (keys the stored
  config lacks, or derived as None on either side, are not compared)."""
  stored_flat, current_flat = _flatten(stored), _flatten(current.to_dict())
  found = []
  for key in keys:
    name, before = _value(stored_flat, key)
    _, now = _value(current_flat, key)
    if before is not None and now is not None and before != now:
      found.append(f"config.{name} is {before!r} in the checkpoint but {now!r} now")
  return found


def _stored(directory: str) -> tuple[int, dict] | None:
  if not checkpoint_exists(directory):
    return None
  with Checkpointer(directory) as checkpointer:
    step = checkpointer.latest_step()
    config = checkpointer.restore_config()
  return None if config is None else (step, config.to_dict())


def _vae_checkpoints(config: ml_collections.ConfigDict, workdir: str) -> str:
  root = vae_dir(config, workdir)
  return checkpoint_dir(root) if fs.is_dir(checkpoint_dir(root)) else root


# Per model: (tokenizer architecture, tokenizer trajectory, generator architecture, generator trajectory).
_KEYS = {
    "flowar": (VAE_ARCHITECTURE, VAE_TRAJECTORY, FLOWAR_ARCHITECTURE, FLOWAR_TRAJECTORY),
    "var": (VQVAE_ARCHITECTURE, VQVAE_TRAJECTORY, VAR_ARCHITECTURE, VAR_TRAJECTORY),
    "hart": (VQVAE_ARCHITECTURE, HYBRID_TRAJECTORY, HART_ARCHITECTURE, HART_TRAJECTORY),
}


def check_config_matches_checkpoints(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError naming each architecture key that differs from the stored config of a stage that
  this run resumes or uses (the VAE under `vae_dir`, FlowAR in WORKDIR); warns about changed settings."""
  tokenizer_architecture, tokenizer_trajectory, architecture, trajectory = _KEYS[config.model.name]
  checks = [("VAE", _vae_checkpoints(config, workdir), tokenizer_architecture,
             tokenizer_trajectory if trains_tokenizer(config) else ())]
  if trains_generator(config):
    checks.append((config.model.name, checkpoint_dir(workdir), architecture, trajectory))
  for stage, directory, architecture, trajectory in checks:
    stored = _stored(directory)
    if stored is None:
      continue
    step, values = stored
    mismatched = differences(values, config, architecture)
    if mismatched:
      raise ValueError(f"{directory} holds a {stage} (checkpoint {step}) of another architecture: "
                       + "; ".join(mismatched) + ". Set these back to resume it, or use another --workdir")
    changed = differences(values, config, trajectory)
    if changed:
      logging.warning("resuming the %s in %s (checkpoint %d) with changed settings, so it goes on differently "
                      "from the original run: %s", stage, directory, step, "; ".join(changed))
