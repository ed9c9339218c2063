"""A module's parameters: split from its graph, and dotted names ('backbone.encoder_blocks.0.attn.qkv.kernel')
for counting, converting and errors."""
from __future__ import annotations

import jax
from flax import nnx


def path_name(path) -> str:
  """A pytree key path -> dotted name, without NNX's trailing '.value'."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  if parts and parts[-1] == "value":
    parts.pop()
  return ".".join(parts)


def flat_params(tree) -> dict:
  """Pytree (e.g. an nnx.State) -> {dotted name: leaf}."""
  return {path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
  """Module -> (graphdef, params). Every variable of flowar_jax's modules is a parameter."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"model holds non-parameter state, which training does not carry: {rest}")
  return graphdef, params
