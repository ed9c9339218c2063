"""Images in `root/<class_name>/...`, one subfolder per class; labels follow the sorted class names.

The folder may be local or on gs://. Every non-hidden file below a class folder (nested folders included)
is a candidate; hidden files (`.DS_Store`, `._x.jpg`) and folders are not. Building a source decodes each
candidate once, in a thread pool, so unreadable files (not an image, empty, corrupt, truncated, beyond
PIL's size guard) are dropped up front and reported in one warning with the first few and why, instead of
failing a step hours into training. Doing it up front keeps the example list, and so the shuffled order
and a checkpointed iterator position, fixed for the run. The scan is cached per process (keyed by every
candidate's path, size and version), so the train split, the eval split and the latent cache share one
scan. Both splits come from the same readable set, `eval_fraction` per class held out with a fixed seed
(`splits.eval_mask`).
"""
from __future__ import annotations

import concurrent.futures
import hashlib

from absl import logging
import numpy as np

from flowar_jax.data import preprocess
from flowar_jax.data import splits
from flowar_jax.runs import fs

_SCAN_THREADS = 16
_NAMED_SKIPS = 5  # unreadable files named in the warning
_SCANS: dict[str, tuple[str, tuple]] = {}  # root -> (digest of the candidates' stats, scan result)


def class_names(root: str) -> list[str]:
  """Sorted names of the non-hidden subfolders of `root`; raises if there are none."""
  if not root:
    raise ValueError("config.data.data_dir must name the image folder for data.name='image_folder'.")
  if not fs.exists(root):
    raise FileNotFoundError(f"Image folder {root!r} does not exist.")
  if not fs.is_dir(root):
    raise NotADirectoryError(f"Image folder {root!r} is not a directory.")
  names = [name for name in fs.listdir(root) if not name.startswith(".") and fs.is_dir(fs.join(root, name))]
  if not names:
    raise ValueError(
        f"Image folder {root!r} is empty: it needs one subfolder per class, e.g. {root}/cat/1.png."
    )
  return names


def _walk_order(parts: list[str]) -> list[tuple[int, str]]:
  """Sort key of a file's path parts below its class folder: a folder's files (by name) before its
  subfolders (by name), the order a sorted top-down walk visits them."""
  return [(1, part) for part in parts[:-1]] + [(0, parts[-1])]


def _candidate_files(class_dir: str) -> list[tuple[str, int, str]]:
  """(path, size, version) of the non-hidden files below `class_dir`, in walk order."""
  found = []
  for path, size, version in fs.find(class_dir):
    parts = path[len(class_dir):].strip("/").split("/")
    if not any(part.startswith(".") for part in parts):
      found.append((_walk_order(parts), path, size, version))
  return [entry[1:] for entry in sorted(found)]


def _encoded(path: str) -> str | bytes:
  """What `preprocess.decode_image` reads: a local path as it is, a gs:// object's bytes."""
  return fs.read_bytes(path) if fs.is_remote(path) else path


def _read_problem(path: str) -> str | None:
  """Why `path` can't be decoded as an image ('ErrorType: message'), or None when it can."""
  try:
    preprocess.decode_image(_encoded(path), min_side=1)  # Smallest JPEG scale still reads every byte.
  except Exception as error:  # PIL raises many types for bad data; any of them means "skip this file".
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"
  return None


def _digest(files: list[tuple[str, int, str]]) -> str:
  """Changes when any candidate is added, removed, rewritten or touched."""
  hasher = hashlib.sha1()
  for path, size, version in files:
    hasher.update(f"{path}\0{size}\0{version}\n".encode())
  return hasher.hexdigest()


def scan(root: str) -> tuple[list[str], np.ndarray, list[str], list[str]]:
  """Lists and checks every candidate image under `root` (cached while the files stay the same).

  Returns:
    (paths of readable images, their int32 labels `[N]`, class names, paths of skipped files).

  Raises:
    ValueError naming `root` when no file under it is a readable image.
  """
  names = class_names(root)
  files, candidate_labels = [], []
  for label, name in enumerate(names):
    found = _candidate_files(fs.join(root, name))
    files.extend(found)
    candidate_labels.extend([label] * len(found))
  candidates = [path for path, _, _ in files]
  digest = _digest(files)
  cached = _SCANS.get(root)
  if cached is not None and cached[0] == digest:
    paths, labels, skipped = cached[1]
    return list(paths), labels.copy(), names, list(skipped)
  with concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:
    problems = list(pool.map(_read_problem, candidates))
  paths = [p for p, problem in zip(candidates, problems) if problem is None]
  labels = np.array([l for l, problem in zip(candidate_labels, problems) if problem is None], dtype=np.int32)
  skipped = [(p, problem) for p, problem in zip(candidates, problems) if problem is not None]
  if skipped:
    named = "; ".join(f"{p[len(root):].strip('/')} ({problem})" for p, problem in skipped[:_NAMED_SKIPS])
    more = f"; and {len(skipped) - _NAMED_SKIPS} more" if len(skipped) > _NAMED_SKIPS else ""
    logging.warning("Skipped %d unreadable file(s) of %d under %r: %s%s", len(skipped), len(candidates), root,
                    named, more)
  if not paths:
    raise ValueError(
        f"Image folder {root!r} has no readable images ({len(candidates)} file(s) found, "
        f"{len(skipped)} unreadable)."
    )
  empty = [name for label, name in enumerate(names) if not np.any(labels == label)]
  if empty:
    logging.warning("Class folder(s) under %r without a readable image: %s. Their labels stay in the label "
                    "space but never occur in training.", root, ", ".join(empty))
  skipped_paths = [p for p, _ in skipped]
  _SCANS[root] = (digest, (tuple(paths), labels, tuple(skipped_paths)))
  return paths, labels.copy(), names, skipped_paths


class ImageFolderSource:
  """Random access to one split as `{'image': uint8 [H0, W0, 3], 'label': int32 scalar}`.

  `min_side` lets JPEGs decode at a reduced scale whose sides stay >= min_side (the later resize
  target), which is exact enough for training and several times faster for large photos.
  """

  def __init__(self, root: str, split: str, eval_fraction: float, min_side: int = 0):
    splits.check_split(split)
    paths, labels, names, skipped = scan(root)
    index = splits.split_indices(labels, split, eval_fraction)
    if index.size == 0:
      raise ValueError(
          f"Image folder {root!r}: split {split!r} is empty with eval_fraction={eval_fraction} "
          f"({len(paths)} readable images)."
      )
    self.root = root
    self.paths = [paths[i] for i in index]
    self.labels = labels[index]
    self.class_names = names
    self.num_classes = len(names)
    self.num_skipped = len(skipped)
    self._min_side = min_side

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    path = self.paths[index]
    try:
      image = preprocess.decode_image(_encoded(path), self._min_side)
    except Exception as e:  # The file passed the scan, so it changed on disk since.
      raise OSError(f"Cannot decode {path!r}, which was readable when the source was built.") from e
    return {"image": image, "label": self.labels[index]}

  def __repr__(self) -> str:
    return f"ImageFolderSource(root={self.root!r}, len={len(self)}, classes={self.num_classes})"
