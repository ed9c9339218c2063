"""`convert`: official PyTorch FlowAR (S, L, H) and MAR KL-16 VAE checkpoints, VAR (d16 .. d30) and its VQVAE, or
HART's hybrid tokenizer -> a flowar_jax workdir.

`python -m flowar_jax convert --from_torch FlowAR-S.pth --vae_torch kl16.ckpt --config configs/flowar_s.py
--workdir OUT` (or `--from_torch var_d16.pth --vae_torch vae_ch160v4096z32.pth --config configs/var_d16.py`), then
`python -m flowar_jax sample --workdir OUT` samples with the published settings stored in the config. HART:
`--vae_torch tokenizer.pth --config configs/hart_digits.py` (or a config of the tokenizer's sizes) writes the hybrid
tokenizer alone; HART's official transformer is text-conditional and does not convert into the class-conditional
model (`convert.workdir.HART_TRANSFORMER_ERROR`). Files: torch pickles (.pth, .ckpt, .pt), .safetensors, or .npz
state dicts, each given as a local path, an http(s) URL or a Hugging Face OWNER/REPO/FILE (downloaded once,
`flowar_jax.convert.fetch`).
"""
from __future__ import annotations

import ml_collections

from flowar_jax.config import validate_config
from flowar_jax.convert import load_state_dict, write_workdir
from flowar_jax.convert.fetch import fetch_checkpoint
from flowar_jax.convert.workdir import HART_TRANSFORMER_ERROR


def run(config: ml_collections.ConfigDict, workdir: str, *, flowar_path: str | None, vae_path: str | None = None,
        use_ema: bool | None = None, trust_pickle: bool = False) -> list[str]:
  """Converts the files into WORKDIR; returns the checkpoint directories written.

  flowar_path, vae_path: local paths, http(s) URLs or Hugging Face OWNER/REPO/FILE names (`fetch_checkpoint`).
  use_ema: take the file's 'model_ema' weights (True), its 'model' weights (False), or the EMA ones when
  present (None). trust_pickle: read torch files with full unpickling (trusted files only).
  """
  validate_config(config)
  if not flowar_path and not vae_path:
    raise ValueError("convert needs --from_torch (the generator), --vae_torch (the tokenizer), or both")
  if flowar_path and config.model.name == "hart":
    raise ValueError(f"--from_torch {flowar_path}: {HART_TRANSFORMER_ERROR}")  # before any download
  flowar, which = None, None
  if flowar_path:
    flowar, which = load_state_dict(fetch_checkpoint(flowar_path), use_ema=use_ema, trust_pickle=trust_pickle)
  vae = load_state_dict(fetch_checkpoint(vae_path), use_ema=False, trust_pickle=trust_pickle)[0] if vae_path else None
  written = write_workdir(config, workdir, flowar, vae)
  parts = ([f"the {which!r} weights of {flowar_path}"] if flowar_path else []) + (
      [f"the tokenizer {vae_path}"] if vae_path else [])
  print(f"converted {' and '.join(parts)} into {', '.join(written)}", flush=True)
  if not flowar_path:
    print("no --from_torch given: WORKDIR holds the tokenizer only; train the generator stage on it "
          f"(train --config.stage={config.model.name} --workdir WORKDIR)", flush=True)
  if not vae_path:
    print("no --vae_torch given: sampling needs a VAE in WORKDIR/vae or --config.vae_checkpoint", flush=True)
  return written
