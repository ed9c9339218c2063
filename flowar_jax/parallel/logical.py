"""Logical axis names: how model code says what each dimension is, and how the rules map names to mesh axes.

Model code never names mesh axes. Every parameter carries one logical name per dimension (its
`out_sharding` metadata, set through `param_axes` / `with_axes`), and the key activations are constrained
by logical names (`constrain`). `config.sharding.rules` maps each name to mesh axes; a name mapped to ''
stays replicated. The names:

  batch       examples of a batch (activations)
  length      tokens of a sequence (activations, learned position tables)
  embed       the residual width of the backbone or the flow head
  heads       attention heads; in projection kernels the flattened heads * head_dim dimension
  kv          the per-head dimension
  qkv         a fused q|k|v (or k|v) projection output; attention regroups the kernel per head
  mlp         hidden units of the gated MLP
  modulation  adaLN modulation outputs (k * width)
  vocab       class-embedding rows
  text        a text encoder's state and pooled widths (inputs of the prompt projections)
  latent      VAE latent channels (inputs and outputs of the latent projections)
  time        timestep frequency features
  norm        1-D scales and biases of normalisation layers
  conv_in     input channels of a convolution
  conv_out    output channels of a convolution (and its bias)

Mapping a spec: dimensions are taken left to right; each takes the mesh axes its rule lists, skipping
axes an earlier dimension already uses (so a [D, D] kernel named ('embed', 'embed') shards only its
first dimension, and activations named ('batch', 'length', 'embed') keep 'embed' whole because the
batch already uses 'fsdp'). When a dimension's size is not divisible by the mesh axes, it keeps the
longest dividing prefix of them (often none: replicated); `partition_spec` reports that fallback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator, Mapping, Sequence

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flowar_jax.parallel.mesh import MESH_AXES, use_mesh

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "qkv", "mlp", "modulation", "vocab", "text", "latent", "time",
                "norm", "conv_in", "conv_out")

Rules = Mapping[str, tuple[str, ...]]  # logical name -> mesh axes, in order
AxisNames = Sequence[str | None]


def param_axes(*names: str | None) -> dict:
  """Metadata naming a parameter's dimensions, for flax's `kernel_metadata=` / `bias_metadata=` arguments.

  Eager sharding stays off: parameters are placed by `ShardingPlan`, which maps the names through the
  rules (flax would read them as mesh axes).
  """
  _check_names(names)
  return {"out_sharding": tuple(names), "eager_sharding": False}


def with_axes(init, *names: str | None):
  """An initializer whose parameter carries the logical `names` (see `param_axes`)."""
  _check_names(names)
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def _check_names(names: Sequence[str | None]) -> None:
  unknown = [n for n in names if n is not None and n not in LOGICAL_AXES]
  if unknown:
    raise ValueError(f"unknown logical axis name(s) {unknown}; known: {', '.join(LOGICAL_AXES)}")


def parse_rules(rules_config: ml_collections.ConfigDict | Mapping[str, str]) -> dict[str, tuple[str, ...]]:
  """`config.sharding.rules` ({logical name: 'mesh_axis,mesh_axis' or ''}) -> {name: (mesh axes, ...)}.

  Raises ValueError naming the rule when a name or a mesh axis is unknown or an axis is listed twice.
  """
  items = rules_config.items() if hasattr(rules_config, "items") else rules_config
  rules = {}
  for name, value in items:
    if name not in LOGICAL_AXES:
      raise ValueError(f"config.sharding.rules.{name}: unknown logical axis; known: {', '.join(LOGICAL_AXES)}")
    if isinstance(value, str):
      axes = tuple(a.strip() for a in value.split(",") if a.strip())
    else:
      axes = tuple(value or ())
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f"config.sharding.rules.{name} = {value!r}: unknown mesh axis {bad[0]!r}; the mesh "
                       f"axes are {', '.join(MESH_AXES)}")
    if len(set(axes)) != len(axes):
      raise ValueError(f"config.sharding.rules.{name} = {value!r} lists a mesh axis twice")
    rules[name] = axes
  return rules


@dataclasses.dataclass(frozen=True)
class Fallback:
  """A dimension that could not take (all of) the mesh axes its rule names, because of its size."""
  dim: int
  name: str
  size: int
  wanted: tuple[str, ...]
  kept: tuple[str, ...]


def partition_spec(names: AxisNames, shape: Sequence[int], axis_sizes: Mapping[str, int], rules: Rules
                   ) -> tuple[PartitionSpec, list[Fallback]]:
  """Logical `names` of an array of `shape` -> its PartitionSpec on a mesh with `axis_sizes`, and fallbacks.

  A rank mismatch between `names` and `shape` is a ValueError naming both.
  """
  if len(names) != len(shape):
    raise ValueError(f"logical axes {tuple(names)} do not match the array's shape {tuple(shape)}")
  used: set[str] = set()
  entries, fallbacks = [], []
  for dim, (name, size) in enumerate(zip(names, shape)):
    wanted = tuple(a for a in rules.get(name, ()) if a not in used) if name else ()
    kept: list[str] = []
    for axis in wanted:
      if size % (axis_sizes[axis] * _product(axis_sizes, kept)):
        break
      kept.append(axis)
    if len(kept) < len(wanted) and _product(axis_sizes, wanted) > _product(axis_sizes, kept):
      fallbacks.append(Fallback(dim, name, size, wanted, tuple(kept)))
    used.update(kept)
    entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*entries), fallbacks


def _product(axis_sizes: Mapping[str, int], axes: Sequence[str]) -> int:
  out = 1
  for axis in axes:
    out *= axis_sizes[axis]
  return out


class _Active(threading.local):
  mesh: jax.sharding.Mesh | None = None
  rules: Rules | None = None


_ACTIVE = _Active()


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
  """Traces under `mesh` (the context mesh) with `rules` for `constrain`; nests and restores."""
  previous = (_ACTIVE.mesh, _ACTIVE.rules)
  _ACTIVE.mesh, _ACTIVE.rules = mesh, rules
  try:
    with use_mesh(mesh):
      yield
  finally:
    _ACTIVE.mesh, _ACTIVE.rules = previous


def constrain(x: jax.Array, names: AxisNames) -> jax.Array:
  """Constrains activation `x` to the sharding its logical `names` map to under the active rules.

  Outside `activate` (single-device use, tests, notebooks) it returns `x` unchanged.
  """
  mesh, rules = _ACTIVE.mesh, _ACTIVE.rules
  if mesh is None or mesh.size == 1:
    return x
  spec, _ = partition_spec(names, x.shape, mesh.shape, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
