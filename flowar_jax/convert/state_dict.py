"""Reading a state dict from an official checkpoint file (torch pickle, safetensors) or an .npz.

Official FlowAR training checkpoints are `torch.save` dicts with 'model' and 'model_ema' (each a full state
dict; the training script also stores 'optimizer', 'epoch', 'scaler' and its argparse 'args'); the released
FlowAR-S/L/H files are bare state dicts (the evaluation script loads them straight into the model); MAR's
VAE checkpoint is a dict with 'model'. An .npz holds either one flat state dict, or several under
'model/NAME', 'model_ema/NAME'. The format is read from the file's first bytes, not its name; torch is
imported only for torch files (the `torch` extra).
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile

import numpy as np

StateDict = dict[str, np.ndarray]
_WEIGHT_KEYS = ("model", "model_ema", "state_dict")
_TORCH_HINT = "reading a PyTorch checkpoint needs torch: pip install flowar_jax[torch]"
_NOT_A_CHECKPOINT = "is not a checkpoint: neither a PyTorch file (zip or pickle), nor .safetensors, nor .npz"


def _is_state_dict(obj) -> bool:
  return isinstance(obj, dict) and bool(obj) and all(
      isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items())


def file_format(path: str) -> str | None:
  """'torch', 'npz', 'safetensors' or None (none of these), from the file's first bytes."""
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(b"PK"):
    try:
      with zipfile.ZipFile(path) as z:
        members = z.namelist()
    except zipfile.BadZipFile:
      return None
    if any(m == "data.pkl" or m.endswith("/data.pkl") for m in members):
      return "torch"  # torch.save's zip layout: ARCHIVE/data.pkl + ARCHIVE/data/N
    if members and all(m.endswith(".npy") for m in members):
      return "npz"
    return None
  if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
    return "torch"  # the legacy (pre-1.6) torch.save format is a bare pickle stream
  if len(head) >= 9 and head[8:9] == b"{":
    header_len = int.from_bytes(head[:8], "little")
    if 0 < header_len <= os.path.getsize(path) - 8:
      return "safetensors"
  return None


def _torch_to_numpy(obj):
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(obj, torch.Tensor):
    return obj.detach().to(torch.float32 if obj.is_floating_point() else obj.dtype).cpu().numpy()
  if isinstance(obj, dict):
    return {k: _torch_to_numpy(v) for k, v in obj.items()}
  return obj


def _load_torch(path: str, trust_pickle: bool):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{path!r} is a PyTorch checkpoint; {_TORCH_HINT}") from e
  try:
    if trust_pickle:
      obj = torch.load(path, map_location="cpu", weights_only=False)
    else:
      # The training script pickles its argparse.Namespace next to the weights; allow only that class.
      with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    if unsupported and not trust_pickle:
      raise ValueError(
          f"{path!r} pickles Python objects besides tensors (first: {unsupported.group(1)}), which the safe "
          "loader refuses; if you trust the file's source, convert it with --trust_pickle (unpickling can run "
          "arbitrary code)") from e
    raise ValueError(f"{path!r} is not a readable PyTorch checkpoint: {e}") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path!r} is not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from e
  return _torch_to_numpy(obj)


def _load_safetensors(path: str):
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{path!r} is a .safetensors file; reading it needs safetensors: "
                      "pip install flowar_jax[torch]") from e
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from e


def _load_npz(path: str):
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path!r} is not a readable .npz checkpoint: {e}") from e
  nested: dict = {}
  for key, value in flat.items():
    group, _, name = key.partition("/")
    if name and group in _WEIGHT_KEYS:
      nested.setdefault(group, {})[name] = value
    else:
      nested.setdefault(None, {})[key] = value
  if None in nested and len(nested) > 1:
    raise ValueError(f"{path!r} mixes plain keys with {sorted(k for k in nested if k)} groups")
  return nested.get(None, nested)


def read_checkpoint(path: str, *, trust_pickle: bool = False):
  """The file's contents as nested dicts of numpy arrays (float tensors as float32).

  trust_pickle: load torch files with full unpickling (only for files from a trusted source); by default
  only tensors, containers, numbers, strings and the training script's argparse.Namespace are accepted.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path!r}")
  fmt = file_format(path)
  if fmt == "npz":
    return _load_npz(path)
  if fmt == "safetensors":
    return _load_safetensors(path)
  if fmt == "torch":
    return _load_torch(path, trust_pickle)
  raise ValueError(f"{path!r} {_NOT_A_CHECKPOINT}")


def select_weights(contents, *, use_ema: bool | None, path: str = "the checkpoint") -> tuple[StateDict, str]:
  """Picks the state dict out of a checkpoint's contents -> (state dict, which one: 'model', 'model_ema', ...).

  use_ema: True requires 'model_ema', False takes 'model', None takes 'model_ema' when it holds weights
  (the official training script may store None there), else 'model'. A bare state dict is taken as is.
  """
  if _is_state_dict(contents):
    if use_ema:
      raise ValueError(f"{path} is a bare state dict without separate EMA weights (the released FlowAR files are "
                       "such); convert it without --use_ema")
    return contents, "state dict"
  if not isinstance(contents, dict):
    raise ValueError(f"{path} is not a checkpoint: it holds a {type(contents).__name__}, not a state dict")
  present = [k for k in _WEIGHT_KEYS if _is_state_dict(contents.get(k))]
  if not present:
    raise ValueError(f"{path} is not a model checkpoint: no state dict under {list(_WEIGHT_KEYS)} "
                     f"(its keys: {sorted(map(str, contents))[:10]})")
  if use_ema is None:
    key = "model_ema" if "model_ema" in present else present[0]
  else:
    key = "model_ema" if use_ema else ("model" if "model" in present else "state_dict")
    if key not in present:
      raise ValueError(f"{path} holds no {key!r} weights (it has {present})")
  return contents[key], key


def load_state_dict(path: str, *, use_ema: bool | None = None, trust_pickle: bool = False
                    ) -> tuple[StateDict, str]:
  """A checkpoint file -> (state dict of numpy arrays, which weights were taken). See `select_weights`."""
  return select_weights(read_checkpoint(path, trust_pickle=trust_pickle), use_ema=use_ema, path=repr(path))
