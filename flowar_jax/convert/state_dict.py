"""Reading a state dict from an official checkpoint file (torch pickle, safetensors) or an .npz.

Official FlowAR checkpoints are `torch.save` dicts with 'model' and 'model_ema' (each a state dict; the
training script also stores 'optimizer', 'epoch', 'scaler' and 'args'); MAR's VAE checkpoint is a dict
with 'model'. An .npz holds either one flat state dict, or several under 'model/NAME', 'model_ema/NAME'.
torch is imported only for torch files (the `torch` extra).
"""
from __future__ import annotations

import argparse
import os
import zipfile

import numpy as np

StateDict = dict[str, np.ndarray]
_WEIGHT_KEYS = ("model", "model_ema", "state_dict")
_TORCH_HINT = "reading a PyTorch checkpoint needs torch: pip install flowar_jax[torch]"


def _is_state_dict(obj) -> bool:
  return isinstance(obj, dict) and bool(obj) and all(
      isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items())


def _torch_to_numpy(obj):
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(obj, torch.Tensor):
    return obj.detach().to(torch.float32 if obj.is_floating_point() else obj.dtype).cpu().numpy()
  if isinstance(obj, dict):
    return {k: _torch_to_numpy(v) for k, v in obj.items()}
  return obj


def _load_torch(path: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(_TORCH_HINT) from e
  try:
    # The training script pickles its argparse.Namespace next to the weights; allow only that class.
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path!r} is not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from e
  return _torch_to_numpy(obj)


def _load_safetensors(path: str):
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading .safetensors needs safetensors: pip install flowar_jax[torch]") from e
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


def read_checkpoint(path: str):
  """The file's contents as nested dicts of numpy arrays (float tensors as float32)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path!r}")
  if path.endswith(".npz"):
    return _load_npz(path)
  if path.endswith(".safetensors"):
    return _load_safetensors(path)
  return _load_torch(path)


def select_weights(contents, *, use_ema: bool | None, path: str = "the checkpoint") -> tuple[StateDict, str]:
  """Picks the state dict out of a checkpoint's contents -> (state dict, which one: 'model', 'model_ema', ...).

  use_ema: True requires 'model_ema', False takes 'model', None takes 'model_ema' when it holds weights
  (the official training script may store None there), else 'model'. A bare state dict is taken as is.
  """
  if _is_state_dict(contents):
    if use_ema:
      raise ValueError(f"{path} is a bare state dict without EMA weights; convert it with --nouse_ema")
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


def load_state_dict(path: str, *, use_ema: bool | None = None) -> tuple[StateDict, str]:
  """A checkpoint file -> (state dict of numpy arrays, which weights were taken). See `select_weights`."""
  return select_weights(read_checkpoint(path), use_ema=use_ema, path=repr(path))
