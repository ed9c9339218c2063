"""The head seam: from the backbone's condition for one scale's tokens to those tokens.

`loss` is the training objective of one scale given its targets; `draw` gives the per-sample randomness of one
scale (so a sample depends on its own key only, not on its batch); `sample` turns a condition and that
randomness into the scale's tokens, with classifier-free guidance when an unconditional condition is given.
Two implementations: `models.flow_head.FlowHead` (FlowAR: a velocity field integrated from noise, continuous
tokens) and `heads.categorical.CategoricalHead` (VAR: logits, top-k / top-p, code indices).
"""
from __future__ import annotations

from typing import Any, Protocol

import jax

Condition = Any  # the backbone's output for one scale's tokens, as the head reads it (an array or a tuple)


class Head(Protocol):

  def loss(self, cond: Condition, target: jax.Array, rng: jax.Array) -> jax.Array:
    """Scalar loss of one scale, averaged over its tokens (`target`: that scale's targets)."""

  def draw(self, keys: jax.Array, scale: int, length: int) -> Any:
    """Per-sample keys `[B]` -> the randomness `sample` needs for `length` tokens of scale `scale`."""

  def sample(self, cond: Condition, uncond: Condition | None, noise: Any, settings: Any, scale: int,
             num_scales: int) -> jax.Array:
    """-> the scale's tokens for the `B` conditional rows; `uncond` (or None) drives guidance."""
