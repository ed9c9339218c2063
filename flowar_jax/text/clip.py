"""The CLIP text transformer (the text tower of ViT-L/14 and its siblings) in Flax NNX.

Pre-norm blocks under a causal mask, quick_gelu MLPs (OpenAI's checkpoints; LAION's H/14 uses gelu), a final
LayerNorm. states = the final-norm states (zeros at padding); pooled = the final-norm state at the end token
(the last real token), then the text projection when the checkpoint has one (`CLIPTextModelWithProjection`,
or a full `CLIPModel`; `CLIPTextModel` has none, so pooled is `[B, width]`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowar_jax.text.base import TextEncoding
from flowar_jax.text.checkpoint import Loader
from flowar_jax.text.layers import INIT, Mlp, SelfAttention, causal_allowed, layer_norm, linear

SPECIAL_TOKENS = dict(start_token="<|startoftext|>", end_token="<|endoftext|>", pad_token="<|endoftext|>")
TEXT_PREFIX = "text_model."
PROJECTION = "text_projection.weight"


@dataclasses.dataclass(frozen=True)
class ClipSize:
  """The sizes of a CLIP text tower (the defaults are ViT-L/14's)."""

  vocab_size: int = 49408
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_width: int = 3072
  context_length: int = 77
  projection_dim: int = 768
  eps: float = 1e-5
  activation: str = "quick_gelu"

  @classmethod
  def from_hf_config(cls, config: dict[str, Any]) -> ClipSize:
    """A transformers `CLIPTextConfig` or `CLIPConfig` (its `text_config`) as a dict -> sizes."""
    text = config.get("text_config") or config
    if text.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
      raise ValueError(f"config.json describes a {text['model_type']!r} model, not a CLIP text encoder")
    defaults = cls()
    return cls(vocab_size=text.get("vocab_size", defaults.vocab_size), width=text["hidden_size"],
               depth=text["num_hidden_layers"], num_heads=text["num_attention_heads"],
               mlp_width=text["intermediate_size"],
               context_length=text.get("max_position_embeddings", defaults.context_length),
               projection_dim=config.get("projection_dim", text.get("projection_dim", text["hidden_size"])),
               eps=text.get("layer_norm_eps", defaults.eps), activation=text.get("hidden_act", defaults.activation))


# The text towers of the public CLIP models (https://github.com/openai/CLIP, open_clip's H/14), and a tiny one
# for tests on a CPU.
SIZES = {
    "tiny": ClipSize(vocab_size=512, width=64, depth=2, num_heads=4, mlp_width=256, projection_dim=32),
    "B/32": ClipSize(width=512, num_heads=8, mlp_width=2048, projection_dim=512),
    "B/16": ClipSize(width=512, num_heads=8, mlp_width=2048, projection_dim=512),
    "L/14": ClipSize(),
    "H/14": ClipSize(width=1024, depth=24, num_heads=16, mlp_width=4096, projection_dim=1024, activation="gelu"),
}


class ClipLayer(nnx.Module):
  """Pre-norm block: x += attention(LN(x)); x += mlp(LN(x))."""

  def __init__(self, size: ClipSize, *, rngs: nnx.Rngs):
    self.attention_norm = layer_norm(size.width, size.eps, rngs=rngs)
    self.attention = SelfAttention(size.width, size.num_heads, rngs=rngs)
    self.mlp_norm = layer_norm(size.width, size.eps, rngs=rngs)
    self.mlp = Mlp(size.width, size.mlp_width, size.activation, rngs=rngs)

  def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x), allowed)
    return x + self.mlp(self.mlp_norm(x))


class ClipText(nnx.Module):
  """CLIP's text transformer: ids, mask `[B, T]` -> `TextEncoding`."""

  def __init__(self, size: ClipSize = ClipSize(), *, projection: bool = True, rngs: nnx.Rngs):
    self.size = size
    self.token = nnx.Embed(size.vocab_size, size.width, embedding_init=INIT, rngs=rngs)
    self.position = nnx.Embed(size.context_length, size.width, embedding_init=nnx.initializers.normal(0.01),
                              rngs=rngs)
    self.layers = nnx.List([ClipLayer(size, rngs=rngs) for _ in range(size.depth)])
    self.final_norm = layer_norm(size.width, size.eps, rngs=rngs)
    self.projection = linear(size.width, size.projection_dim, bias=False, rngs=rngs) if projection else None

  def __call__(self, ids: jax.Array, mask: jax.Array) -> TextEncoding:
    """ids, mask `[B, T]` (each row: start token, prompt, end token, padding) -> states `[B, T, D]` (zeros at
    padding), pooled `[B, P]`."""
    mask = mask.astype(bool)
    t = ids.shape[1]
    x = self.token(ids) + self.position.embedding[...][:t]
    allowed = causal_allowed(mask)
    for layer in self.layers:
      x = layer(x, allowed)
    x = self.final_norm(x)
    end = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)  # the end token is the last real one
    pooled = jnp.take_along_axis(x, end[:, None, None], axis=1)[:, 0]
    if self.projection is not None:
      pooled = self.projection(pooled)
    return TextEncoding(states=x * mask[..., None], mask=mask, pooled=pooled)


def has_projection(tensors: dict[str, np.ndarray]) -> bool:
  """Whether a checkpoint carries the text projection (CLIPTextModelWithProjection / CLIPModel)."""
  return PROJECTION in tensors


def load_clip_weights(model: ClipText, tensors: dict[str, np.ndarray], where: str) -> None:
  """Copies a transformers CLIP text checkpoint (keys `text_model.*`, `text_projection.weight`) into `model`.
  A full CLIPModel's vision tower is ignored."""
  load = Loader(tensors, where, TEXT_PREFIX)
  load.param(model.token.embedding, "embeddings.token_embedding.weight")
  load.param(model.position.embedding, "embeddings.position_embedding.weight")
  for n, layer in enumerate(model.layers):
    p = f"encoder.layers.{n}."
    load.layer_norm(layer.attention_norm, p + "layer_norm1")
    load.linear(layer.attention.query, p + "self_attn.q_proj")
    load.linear(layer.attention.key, p + "self_attn.k_proj")
    load.linear(layer.attention.value, p + "self_attn.v_proj")
    load.linear(layer.attention.out, p + "self_attn.out_proj")
    load.layer_norm(layer.mlp_norm, p + "layer_norm2")
    load.linear(layer.mlp.fc1, p + "mlp.fc1")
    load.linear(layer.mlp.fc2, p + "mlp.fc2")
  load.layer_norm(model.final_norm, "final_layer_norm")
  load.check_all_used(ignored=("embeddings.position_ids",))
  if model.projection is not None:
    Loader(tensors, where).param(model.projection.kernel, PROJECTION, transpose=True)
