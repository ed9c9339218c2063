"""One file-system layer for every path a run reads or writes: local paths and `gs://` alike.

Paths are etils `epath.Path`s: local paths go through `os`, `gs://` paths through gcsfs (fsspec). Nothing
under `flowar_jax` calls `os.path` / `open` / `np.save` on a run path; it calls these instead.

Writes are whole-or-nothing: a local file is written under a temporary name and renamed, and a GCS object
only appears once its upload completes. A reader therefore never sees half a file.

`STORAGE_EMULATOR_HOST` (the variable Google's client libraries read) points every part at a GCS emulator:
gcsfs reads it itself, and `use_storage_emulator` forwards it to TensorStore, which Orbax writes through.
"""
from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any, Sequence

import fsspec
import numpy as np
from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """True for a path with a URL scheme (`gs://...`), False for a local path."""
  return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """An `epath.Path` for `path`; a local one has `~` expanded and is made absolute."""
  text = os.fspath(path)
  if is_remote(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def join(path: PathLike, *parts: str) -> str:
  """`path/part/...` as a string, keeping a `gs://` scheme intact."""
  text = os.fspath(path)
  if is_remote(text):
    return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(text, *parts)


def basename(path: PathLike) -> str:
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def is_file(path: PathLike) -> bool:
  return as_path(path).is_file()


def is_dir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def listdir(path: PathLike) -> list[str]:
  """The names (not paths) directly under `path`, sorted; [] when `path` is not a directory."""
  directory = as_path(path)
  if not directory.is_dir():
    return []
  return sorted(child.name for child in directory.iterdir())


def makedirs(path: PathLike) -> None:
  """Creates `path` and its parents (on GCS, where folders are implicit, this writes nothing)."""
  as_path(path).mkdir(parents=True, exist_ok=True)


def remove(path: PathLike) -> None:
  """Deletes a file if present."""
  target = as_path(path)
  if target.exists():
    target.unlink()


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` whole-or-nothing, creating the parent folder."""
  target = as_path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    target.write_bytes(data)  # a GCS object becomes visible only when its upload completes
    return
  tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
  tmp.write_bytes(data)
  os.replace(tmp, target)


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def read_ranges(requests: Sequence[tuple[PathLike, int, int]]) -> list[bytes]:
  """The bytes `[start, stop)` of each `(path, start, stop)`, in order, reading nothing else of the files.

  On GCS all ranges go out as concurrent ranged requests (a plain `open` would read ahead megabytes per
  seek); locally each file is opened once and read with `pread`. A range past a file's end is an error.
  """
  requests = [(os.fspath(path), int(start), int(stop)) for path, start, stop in requests]
  if not requests:
    return []
  if is_remote(requests[0][0]):
    filesystem, _ = fsspec.core.url_to_fs(requests[0][0])
    chunks = filesystem.cat_ranges(*map(list, zip(*requests)), on_error="raise")
  else:
    chunks, handles = [], {}
    try:
      for path, start, stop in requests:
        if path not in handles:
          handles[path] = os.open(os.path.abspath(os.path.expanduser(path)), os.O_RDONLY)  # str: no Path per read
        chunks.append(os.pread(handles[path], stop - start, start))
    finally:
      for handle in handles.values():
        os.close(handle)
  for (path, start, stop), chunk in zip(requests, chunks):
    if len(chunk) != stop - start:
      raise EOFError(f"{path} holds {len(chunk)} of the bytes [{start}, {stop}) asked for: it is truncated")
  return chunks


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode())


def read_text(path: PathLike) -> str:
  return as_path(path).read_text()


def write_json(path: PathLike, value: Any) -> None:
  write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: PathLike) -> Any:
  return json.loads(read_text(path))


def save_npz(path: PathLike, **arrays: np.ndarray) -> None:
  """`np.savez` to any path, whole-or-nothing."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue())


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
  """Every array of an `.npz` file on any path, read into memory."""
  with np.load(io.BytesIO(read_bytes(path))) as archive:
    return {name: archive[name] for name in archive.files}


def use_storage_emulator() -> None:
  """Points TensorStore (Orbax's storage) at `$STORAGE_EMULATOR_HOST` when it is set; gcsfs reads it itself."""
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if host:
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
