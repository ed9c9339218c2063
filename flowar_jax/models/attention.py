"""Multi-head attention with 2D RoPE, used by the backbone (scale-causal, KV-cached) and the flow head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flowar_jax.models.layers import dropout, linear, split_rng
from flowar_jax.precision import dot_general
from flowar_jax.models.rope import apply_rope
from flowar_jax.parallel.logical import constrain

HEADS = ("batch", "length", "heads", "kv")  # logical names of q, k, v and attention outputs [B, N, H, Dh]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                          dropout_rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
  """Reference softmax attention. q `[B, Nq, H, Dh]`, k/v `[B, Nk, H, Dh]`, mask `[Nq, Nk]` (or per example
  `[B, Nq, Nk]`) bool -> `[B, Nq, H, Dh]`.

  Scores and softmax run in float32; dropout acts on the attention probabilities, as PyTorch's SDPA does.
  """
  scale = q.shape[-1] ** -0.5
  # [B, Nq, H, Dh] x [B, Nk, H, Dh] -> [B, H, Nq, Nk]
  logits = dot_general(q, k, (((3,), (3,)), ((0, 2), (0, 2))), preferred_element_type=jnp.float32) * scale
  if mask is not None:
    mask = mask[None, None] if mask.ndim == 2 else mask[:, None]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = dropout(probs, dropout_rate, rng)
  out = dot_general(probs.astype(v.dtype), v, (((3,), (1,)), ((0, 1), (0, 2))))  # [B, H, Nq, Dh]
  return jnp.transpose(out, (0, 2, 1, 3))


def per_head_projection(x: jax.Array, projection: nnx.Linear, groups: int, num_heads: int) -> jax.Array:
  """x `[B, N, Din]` through a fused projection (output laid out as groups x heads x head_dim) ->
  `[B, N, groups, H, Dh]`.

  The kernel `[Din, groups * H * Dh]` is regrouped per head before the matmul, so that tensor parallelism
  splits heads (each device computes its heads' q, k and v) rather than slices of the fused output.
  """
  kernel = projection.kernel[...]
  kernel = constrain(kernel.reshape(kernel.shape[0], groups, num_heads, -1), ("embed", None, "heads", "kv"))
  out = dot_general(x, kernel, (((2,), (0,)), ((), ())))  # -> [B, N, groups, H, Dh]
  if projection.bias is not None:
    out = out + projection.bias[...].reshape(kernel.shape[1:])
  return out


class SelfAttention(nnx.Module):
  """qkv projection, RoPE on q and k, attention, output projection."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, qkv_bias: bool,
               attn_dropout: float = 0.0, proj_dropout: float = 0.0):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.qkv = linear(dim, 3 * dim, rngs=rngs, bias=qkv_bias, axes=("embed", "qkv"))
    self.proj = linear(dim, dim, rngs=rngs, axes=("heads", "embed"))
    self.attn_dropout = attn_dropout
    self.proj_dropout = proj_dropout

  def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B, N, D] -> q, k, v `[B, N, H, Dh]` with RoPE applied to q and k."""
    qkv = per_head_projection(x, self.qkv, 3, self.num_heads)
    q, k, v = (constrain(qkv[:, :, i], HEADS) for i in range(3))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def output(self, attended: jax.Array, rng: jax.Array | None) -> jax.Array:
    """[B, N, H, Dh] -> [B, N, D]."""
    b, n = attended.shape[:2]
    attended = constrain(attended, HEADS)
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
    self.q = linear(dim, dim, rngs=rngs, bias=False, axes=("embed", "heads"))
    self.kv = linear(cond_dim, 2 * dim, rngs=rngs, bias=False, axes=("embed", "qkv"))
    self.proj = linear(dim, dim, rngs=rngs, axes=("heads", "embed"))

  def __call__(self, x: jax.Array, cond: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[B, N, D]`, cond `[B, N, Dc]` -> `[B, N, D]`."""
    b, n, _ = x.shape
    q = apply_rope(constrain(self.q(x).reshape(b, n, self.num_heads, self.head_dim), HEADS), cos, sin)
    kv = per_head_projection(cond, self.kv, 2, self.num_heads)
    k = apply_rope(constrain(kv[:, :, 0], HEADS), cos, sin)
    out = constrain(dot_product_attention(q, k, constrain(kv[:, :, 1], HEADS)), HEADS)
    return self.proj(out.reshape(b, n, -1))


class TextCrossAttention(nnx.Module):
  """Queries from the image tokens, keys and values from a prompt's token states; no RoPE (the prompt has no
  image position), padding tokens masked out."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.q = linear(dim, dim, rngs=rngs, bias=False, axes=("embed", "heads"))
    self.kv = linear(dim, 2 * dim, rngs=rngs, bias=False, axes=("embed", "qkv"))
    self.proj = linear(dim, dim, rngs=rngs, axes=("heads", "embed"))

  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array) -> jax.Array:
    """x `[B, N, D]`, context `[B, T, D]`, context_mask `[B, T]` bool -> `[B, N, D]`."""
    b, n, _ = x.shape
    q = constrain(self.q(x).reshape(b, n, self.num_heads, self.head_dim), HEADS)
    kv = per_head_projection(context, self.kv, 2, self.num_heads)
    k, v = constrain(kv[:, :, 0], HEADS), constrain(kv[:, :, 1], HEADS)
    mask = jnp.broadcast_to(context_mask[:, None, :], (b, n, context_mask.shape[1]))
    out = constrain(dot_product_attention(q, k, v, mask), HEADS)
    return self.proj(out.reshape(b, n, -1))
