"""`convert`: official PyTorch FlowAR (S, L, H) and MAR KL-16 VAE checkpoints, or VAR (d16 .. d30) and its VQVAE,
-> a flowar_jax workdir.

`python -m flowar_jax convert --from_torch FlowAR-S.pth --vae_torch kl16.ckpt --config configs/flowar_s.py
--workdir OUT` (or `--from_torch var_d16.pth --vae_torch vae_ch160v4096z32.pth --config configs/var_d16.py`), then `python -m flowar_jax sample --workdir OUT` samples with the published settings
stored in the config. Files: torch pickles (.pth, .ckpt, .pt), .safetensors, or .npz state dicts, each given
as a local path, an http(s) URL or a Hugging Face OWNER/REPO/FILE (downloaded once, `flowar_jax.convert.fetch`).
"""
from __future__ import annotations

import ml_collections

from flowar_jax.config import validate_config
from flowar_jax.convert import load_state_dict, write_workdir
from flowar_jax.convert.fetch import fetch_checkpoint


def run(config: ml_collections.ConfigDict, workdir: str, *, flowar_path: str, vae_path: str | None = None,
        use_ema: bool | None = None, trust_pickle: bool = False) -> list[str]:
  """Converts the files into WORKDIR; returns the checkpoint directories written.

  flowar_path, vae_path: local paths, http(s) URLs or Hugging Face OWNER/REPO/FILE names (`fetch_checkpoint`).
  use_ema: take the file's 'model_ema' weights (True), its 'model' weights (False), or the EMA ones when
  present (None). trust_pickle: read torch files with full unpickling (trusted files only).
  """
  validate_config(config)
  flowar, which = load_state_dict(fetch_checkpoint(flowar_path), use_ema=use_ema, trust_pickle=trust_pickle)
  vae = load_state_dict(fetch_checkpoint(vae_path), use_ema=False, trust_pickle=trust_pickle)[0] if vae_path else None
  written = write_workdir(config, workdir, flowar, vae)
  print(f"converted the {which!r} weights of {flowar_path}" + (f" and the VAE {vae_path}" if vae_path else "")
        + f" into {', '.join(written)}", flush=True)
  if not vae_path:
    print("no --vae_torch given: sampling needs a VAE in WORKDIR/vae or --config.vae_checkpoint", flush=True)
  return written
