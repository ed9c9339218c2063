"""A frozen text encoder: a Flax module whose parameters are constants of one jitted call, and its tokenizer."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
from flax import nnx

from flowar_jax.text.base import TextEncoding, TokenizedPrompts
from flowar_jax.text.tokenization import PromptTokenizer


class FrozenTextEncoder:
  """Implements `flowar_jax.text.base.TextEncoder` around a module `(ids, mask) -> TextEncoding`.

  The parameters are held as plain arrays outside any trainable model and pass through `stop_gradient`:
  nothing can train them. `__call__` is jitted (one compilation per batch shape).
  """

  def __init__(self, name: str, module: nnx.Module, tokenizer: PromptTokenizer, *, width: int,
               pooled_width: int):
    self.name = name
    self.tokenizer = tokenizer
    self.context_length = tokenizer.max_length
    self.width, self.pooled_width = width, pooled_width
    graphdef, state = nnx.split(module)
    unset = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(state)
             if isinstance(leaf, jax.ShapeDtypeStruct)]
    if unset:
      raise ValueError(f"the {name} encoder's checkpoint left {len(unset)} parameters unset, e.g. {unset[:3]}")
    self.params = jax.tree.map(jax.numpy.asarray, state)

    def encode(params, ids, mask):
      return nnx.merge(graphdef, jax.lax.stop_gradient(params))(ids, mask)

    self._encode: Callable[..., TextEncoding] = jax.jit(encode)

  def tokenize(self, prompts: Sequence[str]) -> TokenizedPrompts:
    """B prompts -> ids, mask `[B, T]` (see `PromptTokenizer`)."""
    return self.tokenizer(prompts)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> TextEncoding:
    """ids, mask `[B, T]` -> states `[B, T, D]`, mask `[B, T]`, pooled `[B, P]`."""
    if ids.ndim != 2 or ids.shape != mask.shape:
      raise ValueError(f"ids {ids.shape} and mask {mask.shape} must both be [B, T]")
    if ids.shape[1] > self.context_length:
      raise ValueError(f"{ids.shape[1]} tokens exceed the {self.name} encoder's context of "
                       f"{self.context_length}")
    return self._encode(self.params, ids, mask)

  def encode_prompts(self, prompts: Sequence[str]) -> TextEncoding:
    """Tokenizes and encodes B prompts."""
    tokens = self.tokenize(prompts)
    return self(tokens.ids, tokens.mask)
