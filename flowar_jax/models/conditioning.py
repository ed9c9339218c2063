"""What the generator is conditioned on: a class label or a frozen text encoder's prompt encoding.

`Condition` is the one form the backbone reads, whichever the source: a vector per example (token 0's input
and the adaLN condition) and, for text, per-token states the blocks cross-attend to. Text: the pooled vector,
through a small MLP, takes the class embedding's place; the token states, projected to the backbone width, are
the cross-attention context. The null condition (condition dropout's and CFG's) is the empty prompt's encoding,
so it is a function of the encoder alone.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flowar_jax.models.layers import RMSNorm, linear
from flowar_jax.text.base import TextEncoding


class Condition(NamedTuple):
  """One condition per example. A class label gives only `vector`; a prompt gives all three."""

  vector: jax.Array  # [B, D]: token 0's input and the adaLN condition of every block
  context: jax.Array | None = None  # [B, T, D]: token states the blocks cross-attend to
  context_mask: jax.Array | None = None  # [B, T] bool: True at real tokens


def as_condition(cond: Condition | jax.Array) -> Condition:
  """A bare `[B, D]` vector (the class embedding) -> `Condition(vector)`; a `Condition` as it is."""
  return cond if isinstance(cond, Condition) else Condition(cond)


def concat_conditions(a: Condition, b: Condition) -> Condition:
  """Two conditions -> one, batch `a` then batch `b` (CFG's conditional and unconditional branches)."""
  if (a.context is None) != (b.context is None):
    raise ValueError("cannot concatenate a condition with token states and one without")
  if a.context is None:
    return Condition(jnp.concatenate([a.vector, b.vector]))
  return Condition(*(jnp.concatenate([x, y]) for x, y in zip(a, b)))


class TextConditioner(nnx.Module):
  """pooled `[B, P]` -> vector `[B, D]`; states `[B, T, Dt]` -> context `[B, T, D]` (zeros at padding)."""

  def __init__(self, states_width: int, pooled_width: int, dim: int, *, rngs: nnx.Rngs):
    self.pooled_in = linear(pooled_width, dim, rngs=rngs, axes=("text", "embed"))
    self.pooled_out = linear(dim, dim, rngs=rngs, axes=("embed", "embed"))
    self.states_proj = linear(states_width, dim, rngs=rngs, axes=("text", "embed"))
    self.states_norm = RMSNorm(dim)

  def __call__(self, encoding: TextEncoding) -> Condition:
    vector = self.pooled_out(jax.nn.silu(self.pooled_in(encoding.pooled)))
    mask = encoding.mask.astype(bool)
    context = self.states_norm(self.states_proj(encoding.states))
    return Condition(vector, context * mask[..., None].astype(context.dtype), mask)


def null_like(null: TextEncoding, batch: int) -> TextEncoding:
  """The empty prompt's encoding (batch 1) repeated to `batch` rows."""
  return TextEncoding(*(jnp.broadcast_to(x, (batch, *x.shape[1:])) for x in null))


def drop_text(encoding: TextEncoding, null: TextEncoding, rate: float, rng: jax.Array) -> TextEncoding:
  """Each example's encoding replaced by the empty prompt's (`null`, batch 1) with probability `rate`."""
  if null.states.shape[1:] != encoding.states.shape[1:]:
    raise ValueError(f"the empty prompt's encoding has states {null.states.shape[1:]} but the batch's are "
                     f"{encoding.states.shape[1:]}: encode both with the same encoder and text.max_length")
  b = encoding.pooled.shape[0]
  dropped = jax.random.bernoulli(rng, rate, (b,))
  pick = lambda x, n: jnp.where(dropped.reshape((b,) + (1,) * (x.ndim - 1)), n.astype(x.dtype), x)
  return TextEncoding(*(pick(x, n) for x, n in zip(encoding, null_like(null, b))))
