"""The jnp reference of scale-causal attention; it is also the XLA implementation the dispatch falls back to.

It materialises the `[B, H, Lq, Lk]` scores (that is what the kernels avoid) and applies exactly the
kernels' semantics: float32 scores and softmax, the scale-causal mask from `ScaleCausalMask`, and dropout on
the probabilities from the shared counter-based hash.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flowar_jax.kernels.dropout import keep_mask
from flowar_jax.kernels.mask import ScaleCausalMask
from flowar_jax.precision import dot_general


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: ScaleCausalMask, *,
                        dropout_rate: float = 0.0, seed: jax.Array | None = None,
                        batch_offset=0, head_offset=0, total_heads: int | None = None) -> jax.Array:
  """q `[B, Lq, H, Dh]`, k/v `[B, Lk, H, Dh]` -> `[B, Lq, H, Dh]` in v's dtype.

  Dropout is on when `seed` (int32 scalar) is given and `dropout_rate > 0`; batch_offset, head_offset and
  total_heads place this call's batch and heads in the global ones the dropout hash is keyed by.
  """
  b, _, h, head_dim = q.shape
  # [B, Lq, H, Dh] x [B, Lk, H, Dh] -> [B, H, Lq, Lk], in the active compute dtype (`flowar_jax.precision`)
  logits = dot_general(q, k, (((3,), (3,)), ((0, 2), (0, 2))), preferred_element_type=jnp.float32)
  logits = logits * head_dim ** -0.5
  logits = jnp.where(mask.dense()[None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if seed is not None and dropout_rate > 0.0:
    total_heads = h if total_heads is None else total_heads
    batch_head = ((jnp.arange(b, dtype=jnp.int32)[:, None] + batch_offset) * total_heads
                  + jnp.arange(h, dtype=jnp.int32)[None, :] + head_offset)
    keep = keep_mask(jnp.arange(mask.q_len, dtype=jnp.int32)[:, None],
                     jnp.arange(mask.kv_len, dtype=jnp.int32)[None, :],
                     seed, batch_head[:, :, None, None], mask.kv_len, dropout_rate)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  out = dot_general(probs.astype(v.dtype), v, (((3,), (1,)), ((0, 1), (0, 2))))  # [B, H, Lq, Dh]
  return jnp.transpose(out, (0, 2, 1, 3))
