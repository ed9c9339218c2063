"""Tile math shared by the TPU and GPU kernels: matmuls with float32 accumulation, masked scores, dropout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flowar_jax.kernels.dropout import keep_mask
from flowar_jax.kernels.flash import MASK_VALUE, FlashConfig

NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a.T @ b
# Strongly typed select operands: Pallas Triton gives a weakly typed literal in a select the predicate's type.
MASKED, ZERO = np.float32(MASK_VALUE), np.float32(0.0)


def dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def scores(a: jax.Array, b: jax.Array, rows: jax.Array, cols: jax.Array, config: FlashConfig,
           masked: bool) -> jax.Array:
  """a @ b.T times the softmax scale, in float32; where `masked`, entries whose key index `cols` lies past
  its query `rows`' visible prefix get MASK_VALUE. rows/cols broadcast to the tile (either orientation)."""
  s = dot(a, b, NT) * config.sm_scale
  return jnp.where(cols < config.mask.kv_end(rows), s, MASKED) if masked else s


def dropout_keep(rows: jax.Array, cols: jax.Array, seed, batch_head, config: FlashConfig) -> jax.Array:
  return keep_mask(rows, cols, seed, batch_head, config.mask.kv_len, config.dropout_rate)


def dropped(x: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout of a tile with a precomputed keep mask."""
  return jnp.where(keep, x * (1.0 / (1.0 - rate)), ZERO)
