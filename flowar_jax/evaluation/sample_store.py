"""Samples of one evaluation, saved shard by shard as they are produced, so an interrupted run resumes.

A shard `shard_<first index>.npz` holds `images` uint8 `[n, H, W, 3]` and `labels` `[n]` for sample indices
first .. first + n - 1; it is written whole or not at all (`fs.save_npz`), so a shard found is always whole.
The directory may be local or on gs://.
Because sample i depends only on (seed, i), resuming continues at the first index no shard covers, with any
batch size, and produces exactly the samples an uninterrupted run would have.

`export_adm_npz` writes the finished set in the layout ADM's evaluator reads: `arr_0` uint8 `[N, H, W, 3]`,
`arr_1` int labels `[N]`, in a file named `samples_<N>x<H>x<W>x3.npz`.
"""
from __future__ import annotations

import re

import numpy as np

from flowar_jax.runs import fs

_SHARD = re.compile(r"^shard_(\d{8})\.npz$")


def atomic_savez(path: str, **arrays: np.ndarray) -> None:
  """`np.savez` to a local or gs:// path, whole-or-nothing."""
  fs.save_npz(path, **arrays)


class SampleStore:
  """The shards under `directory` (created on first write)."""

  def __init__(self, directory: str):
    self.directory = directory

  def _shards(self) -> list[tuple[int, str]]:
    found = [(int(m.group(1)), name) for name in fs.listdir(self.directory) if (m := _SHARD.match(name))]
    return sorted(found)

  def contiguous(self) -> list[tuple[str, int]]:
    """(path, samples) of the shards that cover indices 0 .. done - 1 without a gap, in order."""
    out, expected = [], 0
    for first, name in self._shards():
      if first != expected:
        break
      path = fs.join(self.directory, name)
      with fs.as_path(path).open("rb") as f, np.load(f) as shard:  # reads the labels, not the images
        size = len(shard["labels"])
      out.append((path, size))
      expected += size
    return out

  def count(self) -> int:
    """How many samples, from index 0 on, are already saved."""
    return sum(size for _, size in self.contiguous())

  def write(self, first: int, images: np.ndarray, labels: np.ndarray) -> None:
    if len(images) != len(labels):
      raise ValueError(f"a shard needs one label per image, got {len(images)} images and {len(labels)} labels")
    atomic_savez(fs.join(self.directory, f"shard_{first:08d}.npz"), images=np.asarray(images, np.uint8),
                 labels=np.asarray(labels, np.int64))

  def load(self, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `num_samples` samples: uint8 images `[N, H, W, 3]`, labels `[N]`."""
    images, labels = [], []
    for path, _ in self.contiguous():
      shard = fs.load_npz(path)
      images.append(shard["images"])
      labels.append(shard["labels"])
    have = sum(len(x) for x in labels)
    if have < num_samples:
      raise ValueError(f"{self.directory} holds {have} samples, fewer than the {num_samples} asked for")
    return np.concatenate(images)[:num_samples], np.concatenate(labels)[:num_samples]


def adm_npz_name(images: np.ndarray) -> str:
  return "samples_" + "x".join(str(d) for d in images.shape) + ".npz"


def export_adm_npz(directory: str, images: np.ndarray, labels: np.ndarray) -> str:
  """Writes `samples_<N>x<H>x<W>x3.npz` (arr_0 images, arr_1 labels) in `directory`; returns its path."""
  path = fs.join(directory, adm_npz_name(images))
  atomic_savez(path, arr_0=np.asarray(images, np.uint8), arr_1=np.asarray(labels, np.int64))
  return path
