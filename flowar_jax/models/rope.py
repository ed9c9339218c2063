"""2D rotary position embedding (EVA style), applied per scale.

For a scale of side s, token (i, j) gets coordinates (i * grid / s, j * grid / s), where `grid` is the
latent side (16 at 256 px), so every scale spans the same coordinate range. The first half of each head
dimension rotates with the row coordinate, the second half with the column; within a half, consecutive
pairs (2m, 2m + 1) rotate together at frequency 10000 ** (-2m / half).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def rope_tables(side: int, grid: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """cos, sin tables `[side * side, head_dim]` (float32) for one scale."""
  if head_dim % 4:
    raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
  half = head_dim // 2
  freqs = 1.0 / (10000.0 ** (np.arange(0, half, 2, dtype=np.float32)[: half // 2] / half))
  coords = np.arange(side, dtype=np.float32) / side * grid
  angles = np.repeat(np.einsum("i,f->if", coords, freqs), 2, axis=-1)  # [side, half], pairs interleaved
  rows = np.broadcast_to(angles[:, None, :], (side, side, half))
  cols = np.broadcast_to(angles[None, :, :], (side, side, half))
  table = np.concatenate([rows, cols], axis=-1).reshape(side * side, head_dim).astype(np.float32)
  return np.cos(table), np.sin(table)


def sequence_rope_tables(sides: tuple[int, ...], grid: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """cos, sin `[sum(side**2), head_dim]` for scales laid out one after another."""
  tabs = [rope_tables(s, grid, head_dim) for s in sides]
  return np.concatenate([t[0] for t in tabs]), np.concatenate([t[1] for t in tabs])


def rotate_pairs(x: jax.Array) -> jax.Array:
  """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last axis."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x `[B, N, H, Dh]`, cos/sin `[N, Dh]` -> rotated x, same shape and dtype."""
  cos = jnp.asarray(cos)[None, :, None, :]
  sin = jnp.asarray(sin)[None, :, None, :]
  return (x * cos + rotate_pairs(x) * sin).astype(x.dtype)
