"""Multi-head attention with 2D RoPE, used by the backbone (scale-causal, KV-cached) and the flow head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flowar_jax.models.layers import dropout, linear, split_rng
from flowar_jax.models.rope import apply_rope


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                          dropout_rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
  """Reference softmax attention. q `[B, Nq, H, Dh]`, k/v `[B, Nk, H, Dh]`, mask `[Nq, Nk]` bool -> `[B, Nq, H, Dh]`.

  Scores and softmax run in float32; dropout acts on the attention probabilities, as PyTorch's SDPA does.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = dropout(probs, dropout_rate, rng)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


class SelfAttention(nnx.Module):
  """qkv projection, RoPE on q and k, attention, output projection."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, qkv_bias: bool,
               attn_dropout: float = 0.0, proj_dropout: float = 0.0):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.qkv = linear(dim, 3 * dim, rngs=rngs, bias=qkv_bias)
    self.proj = linear(dim, dim, rngs=rngs)
    self.attn_dropout = attn_dropout
    self.proj_dropout = proj_dropout

  def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B, N, D] -> q, k, v `[B, N, H, Dh]` with RoPE applied to q and k."""
    b, n, _ = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def output(self, attended: jax.Array, rng: jax.Array | None) -> jax.Array:
    """[B, N, H, Dh] -> [B, N, D]."""
    b, n = attended.shape[:2]
    return dropout(self.proj(attended.reshape(b, n, -1)), self.proj_dropout, rng)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    """[B, N, D] -> [B, N, D]; mask `[N, N]` bool or None (full attention)."""
    r_attn, r_proj = split_rng(rng, 2)
    q, k, v = self.project_qkv(x, cos, sin)
    return self.output(dot_product_attention(q, k, v, mask, self.attn_dropout, r_attn), r_proj)


class CrossAttention(nnx.Module):
  """Queries from the tokens, keys and values from the condition; RoPE on both, no qkv bias."""

  def __init__(self, dim: int, cond_dim: int, num_heads: int, *, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.q = linear(dim, dim, rngs=rngs, bias=False)
    self.kv = linear(cond_dim, 2 * dim, rngs=rngs, bias=False)
    self.proj = linear(dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array, cond: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[B, N, D]`, cond `[B, N, Dc]` -> `[B, N, D]`."""
    b, n, _ = x.shape
    q = apply_rope(self.q(x).reshape(b, n, self.num_heads, self.head_dim), cos, sin)
    kv = self.kv(cond).reshape(b, cond.shape[1], 2, self.num_heads, self.head_dim)
    k = apply_rope(kv[:, :, 0], cos, sin)
    out = dot_product_attention(q, k, kv[:, :, 1])
    return self.proj(out.reshape(b, n, -1))
