"""Images in `root/<class_name>/...`, one subfolder per class; labels follow the sorted class names.

Every non-hidden file below a class folder (nested folders included) is a candidate; hidden files
(`.DS_Store`, `._x.jpg`) and folders are not. Building a source decodes each candidate once, in a thread
pool, so unreadable files (not an image, empty, corrupt, truncated, beyond PIL's size guard) are dropped
up front and reported in one warning with the first few and why, instead of failing a step hours into
training. Doing it up front keeps the example list, and so the shuffled order and a checkpointed
iterator position, fixed for the run. The scan is cached per process (keyed by every candidate's path,
size and modification time), so the train split, the eval split and the latent cache share one scan.
Both splits come from the same readable set, `eval_fraction` per class held out with a fixed seed
(`splits.eval_mask`).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os

from absl import logging
import numpy as np

from flowar_jax.data import preprocess
from flowar_jax.data import splits

_SCAN_THREADS = 16
_NAMED_SKIPS = 5  # unreadable files named in the warning
_SCANS: dict[str, tuple[str, tuple]] = {}  # root -> (digest of the candidates' stats, scan result)


def class_names(root: str) -> list[str]:
  """Sorted names of the non-hidden subfolders of `root`; raises if there are none."""
  if not root:
    raise ValueError("config.data.data_dir must name the image folder for data.name='image_folder'.")
  if not os.path.exists(root):
    raise FileNotFoundError(f"Image folder {root!r} does not exist.")
  if not os.path.isdir(root):
    raise NotADirectoryError(f"Image folder {root!r} is not a directory.")
  names = sorted(
      entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")
  )
  if not names:
    raise ValueError(
        f"Image folder {root!r} is empty: it needs one subfolder per class, e.g. {root}/cat/1.png."
    )
  return names


def _candidate_files(class_dir: str) -> list[str]:
  found = []
  for parent, dirs, files in os.walk(class_dir):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found.extend(os.path.join(parent, f) for f in sorted(files) if not f.startswith("."))
  return found


def _read_problem(path: str) -> str | None:
  """Why `path` can't be decoded as an image ('ErrorType: message'), or None when it can."""
  try:
    preprocess.decode_image(path, min_side=1)  # Smallest JPEG scale still reads every byte.
  except Exception as error:  # PIL raises many types for bad data; any of them means "skip this file".
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"
  return None


def _digest(paths: list[str]) -> str:
  """Changes when any candidate is added, removed, rewritten or touched."""
  hasher = hashlib.sha1()
  for path in paths:
    stat = os.stat(path)
    hasher.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return hasher.hexdigest()


def scan(root: str) -> tuple[list[str], np.ndarray, list[str], list[str]]:
  """Lists and checks every candidate image under `root` (cached while the files stay the same).

  Returns:
    (paths of readable images, their int32 labels `[N]`, class names, paths of skipped files).

  Raises:
    ValueError naming `root` when no file under it is a readable image.
  """
  names = class_names(root)
  candidates, candidate_labels = [], []
  for label, name in enumerate(names):
    files = _candidate_files(os.path.join(root, name))
    candidates.extend(files)
    candidate_labels.extend([label] * len(files))
  digest = _digest(candidates)
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
    named = "; ".join(f"{os.path.relpath(p, root)} ({problem})" for p, problem in skipped[:_NAMED_SKIPS])
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
      image = preprocess.decode_image(path, self._min_side)
    except Exception as e:  # The file passed the scan, so it changed on disk since.
      raise OSError(f"Cannot decode {path!r}, which was readable when the source was built.") from e
    return {"image": image, "label": self.labels[index]}

  def __repr__(self) -> str:
    return f"ImageFolderSource(root={self.root!r}, len={len(self)}, classes={self.num_classes})"
