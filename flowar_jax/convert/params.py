"""Filling a model's parameter tree from an official state dict, with errors that name what doesn't fit."""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from flowar_jax.models.params import flat_params, path_name

Mapping = Callable[[str, np.ndarray], tuple[str, np.ndarray]]
_MAX_LISTED = 8


def _listed(names: list[str]) -> str:
  more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return ", ".join(names[:_MAX_LISTED]) + more


def _official_shape(name: str, shape: tuple[int, ...], to_torch: Mapping) -> tuple[str, tuple[int, ...]]:
  """Our name and shape -> the official name and shape. A zero-strided view keeps this free for any size."""
  theirs, view = to_torch(name, np.broadcast_to(np.zeros((), np.float32), shape))
  return theirs, tuple(view.shape)


def params_from_state_dict(state_dict: dict[str, np.ndarray], abstract_params, *, to_flax: Mapping,
                           to_torch: Mapping, skipped: Callable[[str], bool], where: str):
  """An official state dict -> a pytree shaped like `abstract_params` (e.g. an nnx.State of ShapeDtypeStructs).

  Raises ValueError naming the first checkpoint parameter (in the file's order) whose shape differs from
  what the config builds, with both shapes in the official layout, and listing missing and unexpected keys
  (official names).
  """
  expected = flat_params(abstract_params)
  converted, origin = {}, {}
  for name, array in state_dict.items():
    if skipped(name):
      continue
    ours, value = to_flax(name, np.asarray(array))
    converted[ours], origin[ours] = value, name
  problems = []
  for ours, value in converted.items():
    if ours in expected and tuple(value.shape) != tuple(expected[ours].shape):
      theirs, want = _official_shape(ours, tuple(expected[ours].shape), to_torch)
      problems.append(f"parameter {origin[ours]!r} has shape {tuple(state_dict[origin[ours]].shape)} in the "
                      f"checkpoint but the config builds {want} (is the config the checkpoint's model size?)")
      break
  missing = [_official_shape(k, tuple(v.shape), to_torch)[0] for k, v in expected.items() if k not in converted]
  unexpected = [origin[k] for k in converted if k not in expected]
  if missing:
    problems.append(f"missing from the checkpoint: {_listed(missing)}")
  if unexpected:
    problems.append(f"in the checkpoint but not in the model: {_listed(unexpected)}")
  if problems:
    raise ValueError(f"{where} does not fit the config: " + "; ".join(problems))
  leaves = [np.asarray(converted[path_name(p)], dtype=leaf.dtype)
            for p, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)]
  return jax.tree.unflatten(jax.tree.structure(abstract_params), leaves)


def state_dict_from_params(params, *, to_torch: Mapping) -> dict[str, np.ndarray]:
  """Inverse: a parameter pytree -> an official-named state dict (without the config-derived buffers)."""
  out = {}
  for name, leaf in flat_params(params).items():
    theirs, value = to_torch(name, np.asarray(leaf))
    out[theirs] = value
  return out
