"""The config stored with a run's latest FlowAR checkpoint, and what is read from it."""
from __future__ import annotations

import ml_collections

from flowar_jax.config import config_from_dict
from flowar_jax.runs import fs
from flowar_jax.runs.checkpointing import Checkpointer, checkpoint_exists
from flowar_jax.runs.workdir import checkpoint_dir


def stored_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved with the latest FlowAR checkpoint in WORKDIR."""
  fs.use_storage_emulator()  # Orbax's TensorStore needs it for gs:// under an emulator
  directory = checkpoint_dir(workdir)
  checkpointer = Checkpointer(directory)
  try:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"no FlowAR checkpoint in {directory!r}: train one first, or give --config")
    config = checkpointer.restore_config()
  finally:
    checkpointer.close()
  if config is None:
    raise FileNotFoundError(f"the checkpoint in {directory!r} stores no config: pass --config")
  return config_from_dict(config.to_dict())


def stored_latent_scale(workdir: str) -> float | None:
  """The latent scale in the config of WORKDIR's latest FlowAR checkpoint, if there is one."""
  directory = checkpoint_dir(workdir)
  if not checkpoint_exists(directory):
    return None
  with Checkpointer(directory) as checkpointer:
    stored = checkpointer.restore_config()
  return None if stored is None else float(stored.vae.latent_scale)
