"""The sharding plan of a run: its mesh and rules, the shardings of whole state pytrees, and jitting under it.

Pytrees of `nnx.Variable`s (model params, the TrainState's params, EMA and the optimizer moments, which
optax builds by mapping over the params and so keep their metadata) are sharded by their logical axis
names; every other leaf (step counters, PRNG keys, scalars) is replicated. Typical use:

  plan = ShardingPlan.from_config(config)
  abstract = plan.abstract(jax.eval_shape(init))          # ShapeDtypeStructs with .sharding, nothing allocated
  state = plan.jit(init, out_shardings=plan.shardings(abstract))()   # created sharded, on every device
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flowar_jax.models.params import path_name
from flowar_jax.parallel import logical
from flowar_jax.parallel.mesh import MESH_AXES, data_parallel_size, make_mesh


_REPORTED_FALLBACKS: set[tuple] = set()


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """A mesh with axes ('data', 'fsdp', 'tensor') and the logical-name rules (`logical.parse_rules`)."""

  mesh: jax.sharding.Mesh
  rules: logical.Rules

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
                  ) -> ShardingPlan:
    """The mesh of `config.mesh` over `devices` (default: every device of the job) and `config.sharding.rules`."""
    return cls(make_mesh(config.mesh, devices), logical.parse_rules(config.sharding.rules))

  @classmethod
  def single_device(cls, rules: logical.Rules | None = None, device: jax.Device | None = None) -> ShardingPlan:
    """A 1 x 1 x 1 mesh on `device` (default: this process's first): everything whole on one device."""
    device = device or jax.local_devices()[0]
    mesh = jax.sharding.Mesh(np.array([device]).reshape(1, 1, 1), MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    return cls(mesh, rules or {})

  @property
  def data_parallel_size(self) -> int:
    """Devices the batch is split over (mesh data * fsdp)."""
    return data_parallel_size(self.mesh)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def sharding(self, names: logical.AxisNames, shape: Sequence[int]) -> NamedSharding:
    """The sharding that logical `names` give an array of `shape` (fallbacks replicate silently)."""
    spec, _ = logical.partition_spec(names, shape, self.mesh.shape, self.rules)
    return NamedSharding(self.mesh, spec)

  def batch_sharding(self) -> NamedSharding:
    """Leading (batch) dimension split by the 'batch' rule, the rest replicated; a prefix for any rank."""
    axes = self.rules.get("batch", ())
    return NamedSharding(self.mesh, PartitionSpec(axes if len(axes) != 1 else axes[0]) if axes
                         else PartitionSpec())

  def abstract(self, tree: Any) -> Any:
    """`tree` (arrays or ShapeDtypeStructs, possibly inside nnx Variables) -> ShapeDtypeStructs with shardings.

    Variables with logical axis names are sharded by the rules, the rest replicated. Dimensions that the
    mesh does not divide are replicated, and one log line per kind of fallback says so.
    """
    fallbacks: dict[tuple, list[str]] = {}

    def leaf_abstract(leaf, sharding):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    def place(path, node):
      if _is_variable(node):
        names = node.get_metadata().get("out_sharding")
        value = node.get_value()
        if names and hasattr(value, "shape"):
          spec, falls = logical.partition_spec(names, value.shape, self.mesh.shape, self.rules)
          for fall in falls:
            fallbacks.setdefault((fall.name, fall.size, fall.wanted, fall.kept), []).append(path_name(path))
          return node.replace(leaf_abstract(value, NamedSharding(self.mesh, spec)))
        return jax.tree.map(lambda leaf: leaf_abstract(leaf, self.replicated), node)
      return leaf_abstract(node, self.replicated)

    out = jax.tree_util.tree_map_with_path(place, tree, is_leaf=_is_variable)
    for (name, size, wanted, kept), paths in fallbacks.items():
      key = (tuple(self.mesh.shape.items()), name, size, wanted, kept)
      if key in _REPORTED_FALLBACKS:  # the same model is placed several times (state, EMA, sampler)
        continue
      _REPORTED_FALLBACKS.add(key)
      sizes = " x ".join(f"{a}={self.mesh.shape[a]}" for a in wanted)
      logging.warning("sharding: %d parameter(s) keep logical axis %r of size %d %s: it is not divisible by "
                      "mesh %s (e.g. %s)", len(paths), name, size,
                      f"on {'+'.join(kept)} only" if kept else "replicated", sizes, paths[0])
    return out

  def shardings(self, tree: Any) -> Any:
    """The NamedSharding of every leaf of `tree` (as `abstract` places it); same structure as `tree`."""
    return jax.tree.map(lambda leaf: leaf.sharding, self.abstract(tree))

  def place(self, tree: Any) -> Any:
    """Moves the arrays of `tree` onto their shardings; ShapeDtypeStruct leaves just get the sharding."""
    abstract = self.abstract(tree)

    def move(leaf, target):
      if isinstance(leaf, jax.ShapeDtypeStruct):
        return target
      return jax.device_put(leaf, target.sharding)

    return jax.tree.map(move, tree, abstract)

  def activate(self):
    """Context: the mesh as context mesh and these rules for activation constraints (for tracing)."""
    return logical.activate(self.mesh, self.rules)

  def jit(self, fn: Callable, *, in_shardings: Any = None, out_shardings: Any = None,
          donate_argnums: int | Sequence[int] = ()) -> MeshJitted:
    """`jax.jit` whose calls and lowerings trace under this plan (`activate`)."""
    kwargs = {"donate_argnums": donate_argnums}
    if in_shardings is not None:
      kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
      kwargs["out_shardings"] = out_shardings
    return MeshJitted(jax.jit(fn, **kwargs), self)


class MeshJitted:
  """A jitted function that is traced, lowered and run under its plan's mesh and rules."""

  def __init__(self, jitted: Any, plan: ShardingPlan):
    self._jitted, self.plan = jitted, plan

  def __call__(self, *args):
    with self.plan.activate():
      return self._jitted(*args)

  def lower(self, *args) -> jax.stages.Lowered:
    with self.plan.activate():
      return self._jitted.lower(*args)
