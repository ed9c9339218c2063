"""scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes): the bundled dataset.

Pixels 0..16 map linearly to 0..255 (ink stays bright, as stored), the gray channel is replicated to
RGB, and each image is upscaled to `image_size` with PIL bicubic when it is read.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from flowar_jax.data import splits

NUM_CLASSES = 10
CLASS_NAMES = [str(d) for d in range(NUM_CLASSES)]
_MAX_VALUE = 16.0


@functools.cache
def _load() -> tuple[np.ndarray, np.ndarray]:
  """All digits: float64 `[1797, 8, 8]` in 0..16 and int64 `[1797]` labels (read-only)."""
  from sklearn.datasets import load_digits  # Imported here: sklearn is slow to import.
  digits = load_digits()
  images, labels = digits.images, digits.target
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Digit pixels 0..16 (any shape) -> uint8 0..255 via round(v * 255 / 16)."""
  return np.rint(np.asarray(images, np.float64) * (255.0 / _MAX_VALUE)).astype(np.uint8)


def split_indices(split: str, eval_fraction: float = 0.1) -> np.ndarray:
  """Indices into `load_digits()` of 'train' or 'eval' (stratified, fixed seed, disjoint)."""
  return splits.split_indices(_load()[1], split, eval_fraction)


def load_digits_split(split: str, eval_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Raw digits of one split: float32 `[N, 8, 8]` in 0..16 and int32 labels `[N]`.

  Uses the same held-out set as `DigitsSource` with the same `eval_fraction`.
  """
  images, labels = _load()
  index = split_indices(split, eval_fraction)
  return images[index].astype(np.float32), labels[index].astype(np.int32)


class DigitsSource:
  """Random access to one split as `{'image': uint8 [S, S, 3], 'label': int32 scalar}`."""

  num_classes = NUM_CLASSES
  class_names = CLASS_NAMES

  def __init__(self, split: str, image_size: int, eval_fraction: float):
    images, labels = _load()
    self.indices = split_indices(split, eval_fraction)
    if self.indices.size == 0:
      raise ValueError(f"digits split {split!r} is empty with eval_fraction={eval_fraction}.")
    self._images = to_uint8(images[self.indices])
    self._labels = labels[self.indices].astype(np.int32)
    self._image_size = image_size

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    gray = Image.fromarray(self._images[index])
    if gray.size != (self._image_size, self._image_size):
      gray = gray.resize((self._image_size, self._image_size), Image.Resampling.BICUBIC)
    image = np.repeat(np.asarray(gray)[:, :, None], 3, axis=2)
    return {"image": image, "label": self._labels[index]}

  def __repr__(self) -> str:
    return f"DigitsSource(len={len(self)}, image_size={self._image_size})"
