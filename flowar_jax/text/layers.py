"""Transformer pieces shared by the text encoders (BERT and CLIP), laid out like their PyTorch checkpoints.

Matmuls run at HIGHEST precision: the encoders are frozen and their outputs cached once, so the cost is small,
and the outputs keep float32 accuracy where a backend's default would not (bfloat16 passes on TPU, TF32 on GPU).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

HIGHEST = jax.lax.Precision.HIGHEST
INIT = nnx.initializers.normal(0.02)  # the random init of BERT and CLIP alike


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
  """A linear layer with kernel `[in, out]` (PyTorch's weight transposed)."""
  return nnx.Linear(in_features, out_features, use_bias=bias, kernel_init=INIT, precision=HIGHEST, rngs=rngs)


def layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
  """The exact (erf) GELU of BERT and of PyTorch's `gelu`."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"gelu": gelu, "quick_gelu": quick_gelu}


class SelfAttention(nnx.Module):
  """Multi-head self-attention with biased query/key/value/output projections."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.query = linear(width, width, rngs=rngs)
    self.key = linear(width, width, rngs=rngs)
    self.value = linear(width, width, rngs=rngs)
    self.out = linear(width, width, rngs=rngs)

  def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
    """x `[B, T, D]`, allowed `[B, 1, T, T]` bool (query may attend to key) -> `[B, T, D]`."""
    b, t, d = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) * (d // self.num_heads) ** -0.5
    # The references add the dtype's minimum at disallowed keys; a row always keeps at least one real key.
    logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=HIGHEST).reshape(b, t, d))


class Mlp(nnx.Module):
  """Two linear layers with an activation between them."""

  def __init__(self, width: int, hidden: int, activation: str, *, rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {activation!r}: expected one of {sorted(ACTIVATIONS)}")
    self.activation = activation
    self.fc1 = linear(width, hidden, rngs=rngs)
    self.fc2 = linear(hidden, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, T, D]` -> `[B, T, D]`."""
    return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


def padding_allowed(mask: jax.Array) -> jax.Array:
  """mask `[B, T]` (True at real tokens) -> `[B, 1, T, T]`: every query may attend to every real key."""
  return jnp.broadcast_to(mask[:, None, None, :], (mask.shape[0], 1, mask.shape[1], mask.shape[1]))


def causal_allowed(mask: jax.Array) -> jax.Array:
  """mask `[B, T]` -> `[B, 1, T, T]`: a query attends to real keys at or before it."""
  t = mask.shape[1]
  return padding_allowed(mask) & jnp.tril(jnp.ones((t, t), bool))[None, None]
