"""The tokenizer seam: images <-> the per-scale tokens a next-scale generator predicts.

A generator trains on `encode`'s tokens and `teacher_forcing`'s (targets, inputs); it samples scale by scale,
handing each sampled scale to `next_input`, which accumulates it and returns the next scale's inputs; `decode`
turns the accumulated state into images. Two implementations:

- `tokenizers.kl_vae.KLTokenizer` (FlowAR): a KL VAE's latent; scale k's target is the latent area-resized to
  its side, continuous `[B, s, s, C]`; the state is the last sampled scale.
- `tokenizers.msvq.MultiScaleVQVAE` (VAR): a multi-scale residual VQ; scale k's target is its code indices
  `[B, s * s]`; the state is the running reconstruction f_hat.
"""
from __future__ import annotations

from typing import Any, Protocol

import jax

Tokens = Any  # what `encode` gives: a latent `[B, S, S, C]`, or per-scale indices [[B, s * s], ...]
State = Any  # what `next_input` accumulates while sampling


class Tokenizer(Protocol):

  def encode(self, images: jax.Array, rng: jax.Array | None) -> Tokens:
    """Images `[B, H, W, 3]` in [-1, 1] -> the generator's training tokens (`rng`: posterior sampling, if any)."""

  def teacher_forcing(self, tokens: Tokens) -> tuple[list[jax.Array], jax.Array]:
    """-> (per-scale targets, coarse to fine; the inputs of scales 1.. `[B, L - l_0, C]`, row-major)."""

  def empty_state(self, batch: int) -> State:
    """The state before the first scale is sampled."""

  def next_input(self, scale: int, state: State, sampled: jax.Array) -> tuple[State, jax.Array]:
    """Adds scale `scale`'s sampled tokens -> (new state, the next scale's inputs `[B, s', s', C]`; at the last
    scale, the final state's inputs are not used)."""

  def decode(self, state: State) -> jax.Array:
    """The state after the last scale -> images `[B, H, W, 3]` in [-1, 1]."""
