"""Where each stage keeps its files inside a workdir, and how the VAE checkpoint is found.

WORKDIR/vae/{checkpoints,metrics.jsonl}   the VAE stage
WORKDIR/{checkpoints,metrics.jsonl}       the FlowAR stage
WORKDIR/samples/                          sample grids and samples.npz
WORKDIR/report.json                       written when `train` completes (e.g. the digits accuracy)

WORKDIR and `config.vae_checkpoint` may be local or gs:// paths.
"""
from __future__ import annotations

import ml_collections

from flowar_jax.runs import fs

REPORT_FILE = "report.json"  # sweeps read it, and take it to mean the run is finished


def checkpoint_dir(stage_dir: str) -> str:
  return fs.join(stage_dir, "checkpoints")


def vae_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The VAE stage directory: `config.vae_checkpoint` if set, else WORKDIR/vae."""
  return config.vae_checkpoint or fs.join(workdir, "vae")


def find_vae_checkpoints(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The directory holding the VAE's Orbax checkpoints; a clear error when there is none."""
  root = vae_dir(config, workdir)
  for candidate in (checkpoint_dir(root), root):
    if any(name.isdigit() for name in fs.listdir(candidate)):
      return candidate
  raise FileNotFoundError(
      f"no VAE checkpoint found at {root!r}: train one first (--config.stage=vae or both), or point "
      f"--config.vae_checkpoint at a VAE workdir or checkpoint directory")
