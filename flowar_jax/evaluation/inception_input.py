"""How uint8 images reach the FID InceptionV3's 299x299 input: the exact resize and normalisation of each
standard suite, written as per-axis matrices (see `flowar_jax.scales.resize`).

'adm' (default): what ADM's evaluator (openai/guided-diffusion `evaluations/evaluator.py`) computes. It feeds
  float images in [0, 255] into the 2015 TF graph, whose `ResizeBilinear` op resizes to 299 with TF1's legacy
  sampling (source = dst * in / out, no half-pixel centres, the last row repeated), then `(x - 128) / 128`.
  The FID / sFID / IS / precision / recall that VAR, MAR and FlowAR report on ImageNet 256 come from this
  suite (with the reference batch VIRTUAL_imagenet256_labeled.npz). torch-fidelity also resizes this way.
'pytorch-fid': mseitzer/pytorch-fid: `x / 255`, `F.interpolate(mode='bilinear', align_corners=False)` to 299
  (half-pixel centres, source clamped at 0), then `2x - 1`. Numbers reported "with pytorch-fid" (and clean-fid's
  'legacy_pytorch' mode) come from this path.

The two differ by about half an input pixel of shift (and a 1/255 scale detail), which moves FID by a
small but reportable amount; use the one the numbers you compare with used.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flowar_jax.scales.resize import apply_axis_matrices

INPUT_SIZE = 299
RESIZE_MODES = ("adm", "pytorch-fid")


@functools.lru_cache(maxsize=None)
def tf1_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float64: TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)` along one axis.

  TensorFlow computes the scale and the source coordinate in float32; so does this, for parity.
  """
  m = np.zeros((out_size, in_size))
  scale = np.float32(in_size) / np.float32(out_size)
  for i in range(out_size):
    src = np.float32(i) * scale
    lower = int(np.floor(src))
    upper = min(int(np.ceil(src)), in_size - 1)
    lerp = float(src - np.float32(lower))
    m[i, lower] += 1.0 - lerp
    m[i, upper] += lerp
  return m


@functools.lru_cache(maxsize=None)
def torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float64: PyTorch `F.interpolate(mode='bilinear', align_corners=False)` along one axis."""
  m = np.zeros((out_size, in_size))
  scale = np.float32(in_size) / np.float32(out_size)
  for i in range(out_size):
    src = max(scale * np.float32(i + 0.5) - np.float32(0.5), np.float32(0.0))  # linear modes clamp at 0
    lower = int(src)
    upper = lower + 1 if lower < in_size - 1 else lower
    lerp = float(src - np.float32(lower))
    m[i, lower] += 1.0 - lerp
    m[i, upper] += lerp
  return m


def _resize(x: jax.Array, matrix_fn) -> jax.Array:
  if x.shape[1:3] == (INPUT_SIZE, INPUT_SIZE):
    return x  # both resizes are the identity at 299
  return apply_axis_matrices(x, matrix_fn(x.shape[1], INPUT_SIZE), matrix_fn(x.shape[2], INPUT_SIZE))


def check_resize_mode(mode: str) -> None:
  if mode not in RESIZE_MODES:
    raise ValueError(f"unknown Inception resize mode {mode!r}; expected one of {RESIZE_MODES}")


def inception_input(images: jax.Array, mode: str = "adm") -> jax.Array:
  """uint8 (or float in [0, 255]) images `[B, H, W, 3]` -> float32 `[B, 299, 299, 3]` in [-1, 1]."""
  check_resize_mode(mode)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Inception needs RGB images [B, H, W, 3], got shape {images.shape}")
  x = images.astype(jnp.float32)
  if mode == "adm":
    return (_resize(x, tf1_bilinear_matrix) - 128.0) / 128.0
  return 2.0 * _resize(x / 255.0, torch_bilinear_matrix) - 1.0
