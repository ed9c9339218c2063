"""Attention dropout from a stateless counter-based hash, identical in the reference and every kernel.

The keep decision for one attention probability is a pure function of (seed, batch index, head index,
query index, key index), so the backward kernels recompute exactly the forward's mask without storing it,
any tiling or sharding gives the same mask, and the jnp reference reproduces the kernels bit for bit.
All arithmetic is int32 with wrap-around (multiplication, xor, logical shifts), which XLA, Mosaic and
Triton implement identically.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Keep iff the top 24 bits of the hash are >= rate * 2**24.
_THRESHOLD_BITS = 24


def _i32(value: int) -> np.int32:
  """A 32-bit constant as int32 (the bit pattern of the unsigned value)."""
  return np.uint32(value).view(np.int32)


_MUL_A, _MUL_B, _GOLDEN = _i32(0x7FEB352D), _i32(0x846CA68B), _i32(0x9E3779B9)


def _mix(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer finaliser (xor-shift-multiply, "lowbias32"); int32 in, int32 out."""
  x = x ^ jax.lax.shift_right_logical(x, jnp.int32(16))
  x = x * _MUL_A
  x = x ^ jax.lax.shift_right_logical(x, jnp.int32(15))
  x = x * _MUL_B
  return x ^ jax.lax.shift_right_logical(x, jnp.int32(16))


def keep_threshold(rate: float) -> int:
  return int(round(rate * (1 << _THRESHOLD_BITS)))


def keep_mask(rows: jax.Array, cols: jax.Array, seed, batch_head, kv_len: int, rate: float) -> jax.Array:
  """Which attention probabilities survive dropout. rows/cols: int32 query/key indices (broadcastable);
  seed, batch_head: int32 scalars or arrays broadcastable with them (batch_head = batch * num_heads + head,
  global over shards); kv_len: the unpadded key count. -> bool of the broadcast shape."""
  counter = rows * jnp.int32(kv_len) + cols
  h = _mix(counter ^ seed)
  h = _mix(h + batch_head * _GOLDEN)
  bits = jax.lax.shift_right_logical(h, jnp.int32(32 - _THRESHOLD_BITS))
  return bits >= jnp.int32(keep_threshold(rate))


def seed_from_rng(rng: jax.Array) -> jax.Array:
  """A PRNG key (typed or raw) -> int32 scalar seed for `keep_mask`."""
  return jax.lax.bitcast_convert_type(jax.random.bits(rng, (), jnp.uint32), jnp.int32)
