"""The text-encoder seam: what text-conditional training, caching and sampling need from an encoder.

An encoder is frozen: its outputs are a function of the prompt only, so they can be computed once and cached.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import jax
import numpy as np


class TokenizedPrompts(NamedTuple):
  """Prompts as the encoder's token ids, padded to the encoder's context length."""

  ids: np.ndarray  # [B, T] int32
  mask: np.ndarray  # [B, T] bool, True at real tokens (special tokens included)


class TextEncoding(NamedTuple):
  """What a frozen encoder gives the generator for each prompt."""

  states: jax.Array  # [B, T, D] per-token states; padding positions hold zeros
  mask: jax.Array  # [B, T] bool, True at real tokens
  pooled: jax.Array  # [B, P] one vector per prompt


class TextEncoder(Protocol):
  """A frozen text encoder with its tokenizer."""

  context_length: int  # T: the longest token sequence, special tokens included
  width: int  # D of `TextEncoding.states`
  pooled_width: int  # P of `TextEncoding.pooled`

  def tokenize(self, prompts: Sequence[str]) -> TokenizedPrompts:
    """B prompts -> ids and mask `[B, T]`. A prompt longer than T is an error naming it (or is truncated,
    when the encoder was built to truncate)."""
    ...

  def __call__(self, ids: jax.Array, mask: jax.Array) -> TextEncoding:
    """ids, mask `[B, T]` -> the encoding."""
    ...
