"""Captioned images in the Hugging Face imagefolder convention: `metadata.jsonl` files of
`{"file_name": ..., "text": ...}` rows, each file_name relative to the folder of its metadata file
(subfolders included), e.g.

  root/metadata.jsonl         {"file_name": "cats/1.png", "text": "a cat on a mat"}
  root/more/metadata.jsonl    {"file_name": "2.jpg", "text": "a dog"}   (the image is root/more/2.jpg)

The folder may be local or on gs:// (read through `runs.fs`). Every metadata.jsonl below `root` counts, in
path order, rows in file order; hidden files and folders are ignored. Building a source checks every row up
front, as `image_folder` does for images, so the example list (and so the shuffled order and a checkpointed
iterator position) stays fixed for the run. Bad rows:

  a line that is not a JSON object with string 'file_name' and 'text'   named by file and line number
  a file_name that names no file under the folder (or leaves it)        "missing file"
  an empty (or all-blank) caption                                        "empty caption"
  an image PIL cannot decode (as `image_folder` checks them)             "unreadable image (...)"

are skipped with one warning giving their count and the first few, or, with `on_bad_row='error'`, refused
with a ValueError naming them. A caption longer than the text encoder's context is caught when the text
cache encodes it (`data.text_cache`), where `config.text.truncate` decides: an error naming its rows, or
truncation. Labels are -1; `eval_fraction` of the rows (fixed seed) form the eval split.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import posixpath

from absl import logging
import numpy as np

from flowar_jax.data import image_folder
from flowar_jax.data import preprocess
from flowar_jax.data import splits
from flowar_jax.runs import fs

METADATA = "metadata.jsonl"
BAD_ROW_POLICIES = ("skip", "error")
_SCAN_THREADS = 16
_NAMED = 5  # bad rows named in a warning or error
_SCANS: dict[str, tuple[str, tuple]] = {}  # root -> (digest of the files' stats, scan result)


def _relative(root: str, path: str) -> str:
  return path[len(root):].strip("/")


def _hidden(relative: str) -> bool:
  return any(part.startswith(".") for part in relative.split("/"))


def _rows_of(root: str, metadata: str, files: set[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
  """(image path, caption, 'where') of the good rows of one metadata file, and the bad rows as 'where: why'."""
  folder = metadata[:-len(METADATA)].rstrip("/")
  rows, bad = [], []
  for number, line in enumerate(fs.read_text(metadata).splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{_relative(root, metadata)}:{number}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as error:
      bad.append(f"{where}: not JSON ({error.msg})")
      continue
    if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"), str):
      bad.append(f"{where}: needs a JSON object with string 'file_name' and 'text'")
      continue
    name = posixpath.normpath(row["file_name"])
    where = f"{where} ({row['file_name']})"
    path = fs.join(folder, name)
    if name.startswith("..") or name.startswith("/") or path not in files:
      bad.append(f"{where}: missing file")
    elif not row["text"].strip():
      bad.append(f"{where}: empty caption")
    else:
      rows.append((path, row["text"], where))
  return rows, bad


def _report(root: str, bad: list[str], total: int, on_bad_row: str) -> None:
  if not bad:
    return
  named = "; ".join(bad[:_NAMED]) + (f"; and {len(bad) - _NAMED} more" if len(bad) > _NAMED else "")
  message = f"{len(bad)} bad row(s) of {total} in the metadata under {root!r}: {named}"
  if on_bad_row == "error":
    raise ValueError(message)
  logging.warning("Skipped %s", message)


def scan(root: str, on_bad_row: str = "skip") -> tuple[list[str], list[str], list[str], list[str]]:
  """Reads and checks every metadata row under `root` (cached while the files stay the same).

  Returns:
    (image paths, captions, where each row is ('metadata.jsonl:3 (cats/1.png)'), bad rows as 'where: why').

  Raises:
    ValueError when `root` has no metadata.jsonl or no good row, or (on_bad_row='error') any bad row.
  """
  if on_bad_row not in BAD_ROW_POLICIES:
    raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
  if not root:
    raise ValueError("config.data.data_dir must name the captioned folder for data.name='captioned_folder'.")
  if not fs.is_dir(root):
    raise FileNotFoundError(f"Captioned folder {root!r} does not exist or is not a directory.")
  found = sorted(f for f in fs.find(root) if not _hidden(_relative(root, f[0])))
  digest = hashlib.sha1("".join(f"{p}\0{s}\0{v}\n" for p, s, v in found).encode()).hexdigest()
  cached = _SCANS.get(root)
  if cached is None or cached[0] != digest:
    files = {path for path, _, _ in found}
    metadata = [p for p in files if posixpath.basename(p) == METADATA]
    if not metadata:
      raise ValueError(f"Captioned folder {root!r} has no {METADATA} (rows of {{\"file_name\": ..., \"text\": ...}}).")
    rows, bad = [], []
    for path in sorted(metadata):
      good, wrong = _rows_of(root, path, files)
      rows.extend(good)
      bad.extend(wrong)
    images = sorted({path for path, _, _ in rows})
    with concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:  # the same check image_folder makes
      problems = dict(zip(images, pool.map(image_folder._read_problem, images)))
    bad.extend(f"{where}: unreadable image ({problems[p]})" for p, _, where in rows if problems[p])
    rows = [row for row in rows if not problems[row[0]]]
    _SCANS[root] = (digest, (tuple(rows), tuple(bad)))
  rows, bad = _SCANS[root][1]
  _report(root, list(bad), len(rows) + len(bad), on_bad_row)
  if not rows:
    raise ValueError(f"Captioned folder {root!r} has no usable row ({len(bad)} bad).")
  return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], list(bad)


class CaptionedFolderSource:
  """Random access to one split as `{'image': uint8 [H0, W0, 3], 'label': int32 -1, 'text': str}`.

  `captions[i]` and `origins[i]` (its metadata file, line and file_name) describe example i without
  decoding it. `min_side` as in `image_folder.ImageFolderSource`.
  """

  num_classes = 0
  class_names: list[str] = []

  def __init__(self, root: str, split: str, eval_fraction: float, min_side: int = 0, on_bad_row: str = "skip"):
    splits.check_split(split)
    paths, captions, origins, bad = scan(root, on_bad_row)
    index = splits.split_indices(np.zeros(len(paths), np.int64), split, eval_fraction)  # one stratum
    if index.size == 0:
      raise ValueError(f"Captioned folder {root!r}: split {split!r} is empty with eval_fraction={eval_fraction} "
                       f"({len(paths)} usable rows).")
    self.root = root
    self.paths = [paths[i] for i in index]
    self.captions = [captions[i] for i in index]
    self.origins = [origins[i] for i in index]
    self.num_bad_rows = len(bad)
    self._min_side = min_side

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    path = self.paths[index]
    try:
      image = preprocess.decode_image(image_folder._encoded(path), self._min_side)
    except Exception as e:  # The file passed the scan, so it changed since.
      raise OSError(f"Cannot decode {path!r} ({self.origins[index]}), which was readable when the source was "
                    f"built.") from e
    return {"image": image, "label": np.int32(-1), "text": self.captions[index]}

  def __repr__(self) -> str:
    return f"CaptionedFolderSource(root={self.root!r}, len={len(self)})"
