"""Inception features of many images, with each batch sharded over the devices of a 1-D 'data' mesh.

Every process computes the features of all the images it is given on its own devices (sampling hands each
process every image), so no array spans hosts; `data_mesh` is the one place that picks the devices.
"""
from __future__ import annotations

import functools
from typing import Iterable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flowar_jax.evaluation.inception import InceptionV3, spatial_features
from flowar_jax.evaluation.inception_input import check_resize_mode, inception_input
from flowar_jax.runs.progress import Progress

FEATURE_NAMES = ("pool", "spatial", "logits_unbiased")


def data_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: this process's local devices)."""
  return Mesh(np.asarray(devices if devices is not None else jax.local_devices()), ("data",))


@functools.lru_cache(maxsize=4)
def _compiled_forward(graphdef: nnx.GraphDef, resize: str):
  """One jitted program per (network structure, resize mode), shared by every extractor."""
  def forward(state, images):
    out = nnx.merge(graphdef, state)(inception_input(images, resize))
    return {"pool": out["pool"], "spatial": spatial_features(out["mixed_6_conv"]),
            "logits_unbiased": out["logits_unbiased"]}
  return jax.jit(forward)


class InceptionFeatures:
  """`features(images)` -> {'pool' [N, 2048], 'spatial' [N, 2023], 'logits_unbiased' [N, 1008]} float32."""

  def __init__(self, model: InceptionV3, *, resize: str = "adm", batch_size: int = 200, mesh: Mesh | None = None):
    check_resize_mode(resize)
    self.mesh = mesh if mesh is not None else data_mesh()
    if batch_size < 1:
      raise ValueError(f"the Inception batch size must be >= 1, got {batch_size}")
    self.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size  # whole rows per device
    self.resize = resize
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))
    self._images = NamedSharding(self.mesh, PartitionSpec("data"))
    self._forward = _compiled_forward(graphdef, resize)

  def batches(self, images: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(images), self.batch_size):
      yield images[start:start + self.batch_size]

  def extract(self, batches: Iterable[np.ndarray], total: int | None = None, desc: str = "inception"
              ) -> dict[str, np.ndarray]:
    """uint8 batches `[b <= batch_size, H, W, 3]` (one size throughout) -> the features of every row."""
    out = {name: [] for name in FEATURE_NAMES}
    progress = Progress(total, desc=desc, unit="image") if total else None
    done = 0
    for batch in batches:
      batch = np.asarray(batch)
      if batch.ndim != 4 or batch.shape[-1] != 3 or len(batch) > self.batch_size:
        raise ValueError(f"expected uint8 image batches [b <= {self.batch_size}, H, W, 3], got {batch.shape}")
      real = len(batch)
      if real < self.batch_size:  # one program for every batch: pad the last one
        batch = np.concatenate([batch, np.zeros((self.batch_size - real,) + batch.shape[1:], batch.dtype)])
      features = self._forward(self._state, jax.device_put(batch, self._images))
      for name in FEATURE_NAMES:
        out[name].append(np.asarray(features[name])[:real])
      done += real
      if progress:
        progress.update(done)
    if progress:
      progress.close()
    if not done:
      raise ValueError("no images to compute Inception features of")
    return {name: np.concatenate(parts) for name, parts in out.items()}

  def __call__(self, images: np.ndarray, desc: str = "inception") -> dict[str, np.ndarray]:
    """uint8 images `[N, H, W, 3]` -> features (see the class docstring)."""
    return self.extract(self.batches(np.asarray(images)), total=len(images), desc=desc)
