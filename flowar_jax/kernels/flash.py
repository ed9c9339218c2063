"""Flash attention with a scale-causal block mask: the `custom_vjp` that joins each backend's forward and
backward kernels, and the settings they share.

Forward: one pass over the visible kv blocks of each q block with an online softmax; it returns the output
and the per-row log-sum-exp. Backward (FlashAttention-2): delta = rowsum(dO * O) in XLA, then one kernel
for dq (looping over kv blocks) and one for dk and dv (looping over q blocks), both recomputing the
probabilities and the dropout mask from the saved log-sum-exp and the dropout hash.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from flowar_jax.kernels.mask import ScaleCausalMask

# Scores outside the mask: finite, so fully masked tiles never produce inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: forward and dq kernels use (q, kv); the dk/dv kernel uses (q_bwd, kv_bwd)."""

  q: int
  kv: int
  q_bwd: int
  kv_bwd: int

  def clipped(self, q_len: int, kv_len: int, cap: Callable[[int], int]) -> "BlockSizes":
    """Blocks no longer than `cap(sequence length)` (the sequence rounded up to a size the backend can
    tile), so short sequences use a single block."""
    q_cap, kv_cap = cap(q_len), cap(kv_len)
    return BlockSizes(min(self.q, q_cap), min(self.kv, kv_cap), min(self.q_bwd, q_cap), min(self.kv_bwd, kv_cap))

  def padded_lengths(self, q_len: int, kv_len: int) -> tuple[int, int]:
    return (round_up(q_len, math.lcm(self.q, self.q_bwd)), round_up(kv_len, math.lcm(self.kv, self.kv_bwd)))


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Everything static about one attention call (hashable: a `custom_vjp` nondiff argument)."""

  backend: str  # 'tpu' (Pallas Mosaic) | 'gpu' (Pallas Triton)
  mask: ScaleCausalMask
  head_dim: int  # unpadded; the softmax scale is head_dim ** -0.5
  dropout_rate: float
  block_sizes: BlockSizes
  interpret: bool

  @property
  def sm_scale(self) -> float:
    return self.head_dim ** -0.5


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _kernels(backend: str):
  # Imported on use: each backend module imports its Pallas dialect, which a host may lack.
  if backend == "tpu":
    from flowar_jax.kernels import tpu  # pylint: disable=g-import-not-at-top
    return tpu
  if backend == "gpu":
    from flowar_jax.kernels import gpu  # pylint: disable=g-import-not-at-top
    return gpu
  raise ValueError(f"unknown kernel backend {backend!r}; expected 'tpu' or 'gpu'")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash_attention(config: FlashConfig, q: jax.Array, k: jax.Array, v: jax.Array, params: jax.Array) -> jax.Array:
  """q `[B, Lq, H, Dh]`, k/v `[B, Lk, H, Dh]`, params int32 `[4]` (dropout seed, batch offset, head offset,
  total heads) -> `[B, Lq, H, Dh]` in q's dtype."""
  return _kernels(config.backend).forward(config, q, k, v, params)[0]


def _flash_fwd(config, q, k, v, params):
  out, lse = _kernels(config.backend).forward(config, q, k, v, params)
  return out, (q, k, v, params, out, lse)


def _flash_bwd(config, residuals, dout):
  q, k, v, params, out, lse = residuals
  delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)  # [B, Lq, H]
  dq, dk, dv = _kernels(config.backend).backward(config, q, k, v, params, lse, delta, dout)
  return dq, dk, dv, None


flash_attention.defvjp(_flash_fwd, _flash_bwd)
