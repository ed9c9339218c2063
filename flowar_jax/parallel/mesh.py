"""Device meshes with the axes ('data', 'fsdp', 'tensor'), sized from `config.mesh`.

  data    data parallelism: the batch is split, parameters are replicated.
  fsdp    fully sharded data parallelism: the batch is split, and so are parameters, EMA and optimizer
          state (along the dimensions the sharding rules map to 'fsdp'); XLA gathers weights per layer.
  tensor  tensor parallelism: attention heads and MLP hidden units are split; the batch is not.

Any of the three sizes may be -1 (all devices left over), at most once. For multi-slice TPU training (or
several GPU nodes), `dcn_data`, `dcn_fsdp`, `dcn_tensor` split the same axes across slices, over the
slower data-centre network, and the plain sizes split the devices of one slice (ICI); each mesh axis
then has size ici * dcn. The usual multi-slice layout is `dcn_data = number of slices`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils

MESH_AXES = ("data", "fsdp", "tensor")
_AUTO = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)


def _fill(sizes: Sequence[int], total: int, fields: Sequence[str], what: str) -> tuple[int, ...]:
  """Replaces a single -1 in `sizes` so that their product is `total`; errors name the config fields."""
  if any(s == 0 or s < -1 for s in sizes):
    bad = next(f for f, s in zip(fields, sizes) if s == 0 or s < -1)
    raise ValueError(f"config.{bad} must be a positive size or -1 (fill), got {sizes[fields.index(bad)]}")
  fills = [f for f, s in zip(fields, sizes) if s == -1]
  if len(fills) > 1:
    raise ValueError(f"only one of {', '.join('config.' + f for f in fields)} may be -1, got -1 for "
                     f"{', '.join(fills)}")
  known = math.prod(s for s in sizes if s != -1)
  described = " x ".join(f"config.{f}={s}" for f, s in zip(fields, sizes))
  if fills:
    if total % known:
      raise ValueError(f"the {total} {what} cannot be split as {described}: {known} does not divide {total}")
    return tuple(total // known if s == -1 else s for s in sizes)
  if known != total:
    raise ValueError(f"the mesh sizes {described} multiply to {known}, but there are {total} {what}")
  return tuple(sizes)


def resolve_mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int,
                       num_slices: int | None = None) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
  """-> (ici sizes, dcn sizes) for ('data', 'fsdp', 'tensor'), with the -1 entries filled.

  Args:
    mesh_config: `config.mesh`.
    num_devices: all devices of the job (every process, every slice).
    num_slices: slices (or other DCN-connected groups) the devices form; None means the product of the
      dcn sizes, which then must not contain -1.

  Raises:
    ValueError naming the config field when the sizes cannot describe `num_devices`.
  """
  dcn_fields = tuple(f"mesh.dcn_{a}" for a in MESH_AXES)
  dcn = [int(mesh_config[f"dcn_{a}"]) for a in MESH_AXES]
  if num_slices is None:
    if -1 in dcn:
      raise ValueError("config.mesh.dcn_* contains -1, which needs the number of slices; give the sizes")
    num_slices = math.prod(dcn)
  dcn = _fill(dcn, num_slices, dcn_fields, "slices")
  if num_devices % num_slices:
    raise ValueError(f"the {num_devices} devices do not split into {num_slices} equal slices "
                     f"(config.mesh.dcn_* = {dcn})")
  ici = _fill([int(mesh_config[a]) for a in MESH_AXES], num_devices // num_slices,
              tuple(f"mesh.{a}" for a in MESH_AXES), "devices per slice" if num_slices > 1 else "devices")
  return ici, dcn


def count_slices(devices: Sequence[jax.Device]) -> int:
  """Slices of a multi-slice TPU job (devices carry `slice_index`); 1 for anything else."""
  indices = {getattr(d, "slice_index", 0) for d in devices}
  return len(indices)


def job_slices(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> int:
  """DCN-connected groups the mesh spans: 1 unless config.mesh.dcn_* ask for more; then the TPU slices, or
  (without TPU slices, e.g. GPU nodes) the processes."""
  if all(int(mesh_config[f"dcn_{a}"]) == 1 for a in MESH_AXES):
    return 1
  slices = count_slices(devices)
  return slices if slices > 1 else len({d.process_index for d in devices})


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes).

  Within a slice, devices are laid out along the physical ICI topology (`mesh_utils`); with dcn sizes > 1
  the slices (TPU `slice_index`, else one process per group) are placed along the dcn axes. Axes are
  `AxisType.Auto`, so XLA's partitioner propagates shardings from the annotations.
  """
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = resolve_mesh_shape(mesh_config, len(devices), job_slices(mesh_config, devices))
  if math.prod(dcn) > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=count_slices(devices) == 1,
                                                allow_split_physical_axes=True)
  else:
    grid = _device_grid(ici, devices)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=_AUTO)


def _device_grid(shape: Sequence[int], devices: list[jax.Device]) -> np.ndarray:
  """Devices in the physical order `mesh_utils` picks; plain id order where it knows no topology (CPU)."""
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    return np.array(sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(shape)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """Devices the batch is split over: data * fsdp."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh) -> Iterator[None]:
  """Makes `mesh` the context mesh (what `jax.shard_map` and sharding constraints without a mesh see)."""
  setter = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh")
  with setter(mesh):
    yield
