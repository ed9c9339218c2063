"""Resizes that match PyTorch's `F.interpolate` exactly, written as per-axis matrices.

FlowAR moves latents between scales with 'area' (adaptive average pooling) and 'bicubic' (Keys cubic with
a = -0.75, half-pixel centres, clamped borders, as PyTorch computes it); `jax.image.resize` uses a = -0.5,
so it cannot be used where parity with official checkpoints matters. The matrices are built on the host in
float64 once per (in, out) pair; applying them is two small einsums that XLA fuses well.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

_TORCH_CUBIC_A = -0.75


@functools.lru_cache(maxsize=None)
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float64: PyTorch 'area' (adaptive_avg_pool) along one axis."""
  m = np.zeros((out_size, in_size))
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil
    m[i, start:end] = 1.0 / (end - start)
  return m


def _cubic_weights(t: float, a: float) -> np.ndarray:
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int, a: float = _TORCH_CUBIC_A) -> np.ndarray:
  """[out, in] float64: PyTorch 'bicubic' with align_corners=False along one axis."""
  m = np.zeros((out_size, in_size))
  # PyTorch computes the source coordinate in float32; doing the same keeps parity to float rounding.
  scale = np.float32(in_size) / np.float32(out_size)
  for i in range(out_size):
    # PyTorch does not clamp the cubic source index at 0 (unlike linear modes).
    src = scale * np.float32(i + 0.5) - np.float32(0.5)
    base = int(np.floor(src))
    weights = _cubic_weights(float(src - np.float32(base)), a)
    for tap, w in enumerate(weights):
      m[i, min(max(base - 1 + tap, 0), in_size - 1)] += w
  return m


def apply_axis_matrices(x: jnp.ndarray, rows: np.ndarray, cols: np.ndarray) -> jnp.ndarray:
  """[B, H, W, C] -> [B, rows.shape[0], cols.shape[0], C]."""
  rows = jnp.asarray(rows, dtype=x.dtype)
  cols = jnp.asarray(cols, dtype=x.dtype)
  return jnp.einsum("oh,bhwc,pw->bopc", rows, x, cols, precision="highest")


def area_resize(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """[B, H, W, C] -> [B, size, size, C], PyTorch `mode='area'`."""
  return apply_axis_matrices(x, area_matrix(x.shape[1], size), area_matrix(x.shape[2], size))


def bicubic_resize(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """[B, H, W, C] -> [B, size, size, C], PyTorch `mode='bicubic', align_corners=False`."""
  return apply_axis_matrices(x, bicubic_matrix(x.shape[1], size), bicubic_matrix(x.shape[2], size))
