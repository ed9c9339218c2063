"""One file-system layer for every path a run reads or writes: local paths and `gs://` alike.

Paths are etils `epath.Path`s: local paths go through `os`, `gs://` paths through gcsfs (fsspec). Nothing
under `flowar_jax` calls `os.path` / `open` / `np.save` on a run path; it calls these instead.

Writes are whole-or-nothing: a local file is written under a temporary name and renamed, and a GCS object
only appears once its upload completes. A reader therefore never sees half a file.

A file that grows (metrics.jsonl, TensorBoard event files, logs) is an `AppendFile`: appended to locally, and
on GCS, where an object cannot be appended to, kept in memory and uploaded whole from time to time.

gcsfs's listing cache is off: Orbax writes checkpoints through TensorStore, other processes write to the
same run, and a cached listing would not see their files.

`STORAGE_EMULATOR_HOST` (the variable Google's client libraries read) points every part at a GCS emulator:
gcsfs reads it itself, and `use_storage_emulator` forwards it to TensorStore, which Orbax writes through.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from typing import Any, Sequence

import fsspec
import numpy as np
from etils import epath

PathLike = str | os.PathLike

fsspec.config.conf.setdefault("gs", {})["use_listings_cache"] = False


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


def find(path: PathLike) -> list[tuple[str, int, str]]:
  """Every file below `path`, recursively and in no set order, as (path, size in bytes, version): each path
  starts with `path` as given, and the version changes whenever the file is rewritten (local: its mtime in
  ns; GCS: the object's generation). [] when there is none. On GCS this is one listing, not a request per
  file."""
  text = os.fspath(path)
  if is_remote(text):
    scheme = text.split("://", 1)[0]
    found = fsspec.filesystem(scheme).find(text.rstrip("/"), detail=True)
    return [(f"{scheme}://{name}", int(info["size"]), str(info.get("generation", info.get("mtime"))))
            for name, info in found.items() if info.get("type") != "directory"]
  out, base = [], os.path.expanduser(text)
  for parent, _, files in os.walk(base):
    for name in files:
      file = os.path.join(parent, name)
      stat = os.stat(file)
      out.append((os.path.join(text, os.path.relpath(file, base)), stat.st_size, str(stat.st_mtime_ns)))
  return out


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


class AppendFile:
  """A file that only grows, on any path (metrics.jsonl, event files, logs); it continues what `path` holds.

  Locally each `write` is appended and flushed at once. A GCS object cannot be appended to: the contents are
  kept here and the object is rewritten whole by `flush`, and by `write` when `upload_every` seconds have
  passed since the last upload (0: at every write; the first write is always uploaded). So on GCS a crash
  loses at most the last `upload_every` seconds, and each upload sends the whole file: keep such files
  small (roll over to a new file) or upload rarely.
  """

  def __init__(self, path: PathLike, upload_every: float = 0.0):
    self.path = os.fspath(path)
    self._upload_every = upload_every
    self._remote = is_remote(self.path)
    target = as_path(self.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if self._remote:
      self._contents = bytearray(target.read_bytes() if target.exists() else b"")
      self._uploaded = -float("inf")  # the first write is uploaded at once: the file shows up
      self._dirty = False
    else:
      self._file = open(target, "ab")  # pylint: disable=consider-using-with

  @property
  def size(self) -> int:
    """Bytes in the file, including writes not uploaded yet."""
    return len(self._contents) if self._remote else self._file.tell()

  def write(self, data: bytes | str) -> None:
    data = data.encode() if isinstance(data, str) else data
    if not self._remote:
      self._file.write(data)
      self._file.flush()
      return
    self._contents.extend(data)
    self._dirty = True
    if time.monotonic() - self._uploaded >= self._upload_every:
      self.flush()

  def flush(self) -> None:
    if not self._remote:
      self._file.flush()
    elif self._dirty:
      write_bytes(self.path, bytes(self._contents))
      self._uploaded, self._dirty = time.monotonic(), False

  def close(self) -> None:
    """Uploads what is left (GCS) and closes; closing again does nothing."""
    if self._remote:
      self.flush()
    elif not self._file.closed:
      self._file.close()


class _DropBucketTypeWarning(logging.Filter):
  """gcsfs asks GCS's storage-control API for a bucket's layout before each operation and warns on every
  failure; an emulator has no such API."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Could not determine bucket type" not in record.getMessage()


_BUCKET_TYPE_FILTER = _DropBucketTypeWarning()


def use_storage_emulator() -> None:
  """When `$STORAGE_EMULATOR_HOST` is set, points TensorStore (Orbax's storage) and gcsfs at that emulator.

  gcsfs reads the variable itself; this also keeps it from asking for bucket layouts (an API emulators lack,
  tried before every operation). TensorStore gets the emulator's URL and a fixed access token: without a
  token it would look for Google credentials, and on a machine with none try the GCE metadata server.
  Variables already set are kept. Call it before the first gs:// access (the command line does, at start).
  """
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if not host:
    return
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
  os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read when gcsfs is imported
  logging.getLogger("gcsfs").addFilter(_BUCKET_TYPE_FILTER)  # in case gcsfs was imported before
