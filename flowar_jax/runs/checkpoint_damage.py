"""Telling a damaged checkpoint from a storage that failed to read it.

Restoring falls back to an older checkpoint only when the newest one is damaged; a storage failure (GCS
503/429, a timeout, a connection reset, a refused permission) must not roll a run back. An error counts
as damage only with evidence of damage:

  - a file the error names as missing is absent (checked again, not taken from the message);
  - a read past the end of a file (TensorStore OUT_OF_RANGE) of a file that is in fact that short;
  - stored bytes that do not decode: invalid JSON, a TensorStore DATA_LOSS ("Error decoding ...");
  - TensorStore NOT_FOUND for an OCDBT key whose database has no manifest, or that names no file.

Any error that shows a storage problem (Python's ConnectionError / TimeoutError and other OSErrors, an HTTP
429 or 5xx, TensorStore UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED / ABORTED, a reset) is never
damage, even beside a damage-like code; neither is an error the evidence contradicts (a file named missing
that exists) nor any other error. The caller retries those (`RetryPolicy`) and then stops.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from typing import Iterator

from etils import epath

# TensorStore puts the absl status code first in its messages: "NOT_FOUND: Error opening ...".
_STATUS = re.compile(r"^\s*([A-Z_]+):")
_STORAGE_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED",
                  "UNAUTHENTICATED", "PERMISSION_DENIED", "INTERNAL", "UNKNOWN"}
# What gcsfs, aiohttp, curl (TensorStore's HTTP client) and the OS say about a failing connection or server.
_STORAGE_WORDS = re.compile(
    r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED)\b|HTTP response code: (429|5\d\d)\b"
    r"|\b(429|50[0-4]) (Too Many Requests|Internal Server Error|Bad Gateway|Service Unavailable|Gateway Time-?out)"
    r"|connection (reset|refused|aborted|closed)|broken pipe|timed? ?out|CURL error", re.IGNORECASE)
_BYTE_RANGE = re.compile(r"[Bb]yte range \[(\d+), (\d+)\) of [^\"]*\"([^\"]+)\"")
_PATH_TAIL = r"/[^\s\"'\[\],;\\]*"  # the rest of a path inside a message: up to a quote, space or bracket
_OCDBT_MANIFEST = "manifest.ocdbt"  # the root file of a TensorStore OCDBT database (Orbax's array store)
_STORAGE_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                   errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN, errno.EPIPE, errno.EIO, errno.ESTALE}


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """How a checkpoint read that failed for a storage reason is retried: `attempts` reads in all, waiting
  `first_delay_s` after the first failure and twice as long after each next one, at most `max_delay_s`."""

  attempts: int = 5
  first_delay_s: float = 2.0
  max_delay_s: float = 30.0

  def __post_init__(self):
    if self.attempts < 1 or self.first_delay_s < 0 or self.max_delay_s < 0:
      raise ValueError(f"RetryPolicy needs attempts >= 1 and non-negative delays, got {self}")

  def delays(self) -> Iterator[float]:
    """The waits between the attempts (`attempts - 1` of them)."""
    delay = self.first_delay_s
    for _ in range(self.attempts - 1):
      yield min(delay, self.max_delay_s)
      delay *= 2


def _chain(error: BaseException) -> list[BaseException]:
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def _is_storage_failure(error: BaseException) -> bool:
  """True when `error` itself says the storage, not the data, failed."""
  if isinstance(error, (ConnectionError, TimeoutError)):
    return True
  if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
    return True
  code = getattr(error, "code", None)  # gcsfs.retry.HttpError
  status = getattr(error, "status", None)  # aiohttp.ClientResponseError
  for value in (code, status):
    if isinstance(value, int) and (value in (408, 429) or 500 <= value < 600):
      return True
  if type(error).__module__.startswith(("aiohttp", "google.auth")):
    return True  # gcsfs's transport and credentials: about the connection, the server or the login
  message = _without_spec(str(error))
  match = _STATUS.match(message)
  if match and match.group(1) in _STORAGE_CODES:
    return True
  return bool(_STORAGE_WORDS.search(message))


def _without_spec(text: str) -> str:
  # TensorStore appends the store's JSON spec (context options and all); only the message says what failed.
  return text.split(" [tensorstore_spec=")[0]


def absent(path: str) -> bool:
  """True when nothing is at `path`; an error other than "no such file" (EIO, EACCES, a 503) raises.

  `os.path.exists` and `epath.Path.exists` answer False on any error, which would read a failing disk as
  a deleted file.
  """
  if "://" in path:
    return not epath.Path(path).exists()  # gcsfs: False only on 404, other errors raise
  try:
    os.stat(path)
  except OSError as error:
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
      return True
    raise
  return False


def _size(path: str) -> int:
  return epath.Path(path).stat().length if "://" in path else os.stat(path).st_size


def _named_paths(error: BaseException, step_dir: str) -> list[str]:
  """The paths inside `step_dir` that `error`'s message (or its filename) names."""
  found = [name for name in (getattr(error, "filename", None), getattr(error, "filename2", None))
           if isinstance(name, str)]
  text = str(error)
  found += [m.group(0).rstrip(".") for m in re.finditer(re.escape(step_dir) + _PATH_TAIL, text)]
  scheme, _, bare = step_dir.rpartition("://")
  if scheme:  # gcsfs names objects without the scheme: "bucket/run/3/data/..."
    found += [f"{scheme}://{m.group(1).rstrip('.')}" for m in re.finditer(
        r"(?<![\w:/])(" + re.escape(bare) + _PATH_TAIL + ")", text)]
  inside = step_dir + "/"
  return list(dict.fromkeys(p for p in found if p.startswith(inside) or p == step_dir))


def _relative(path: str, step_dir: str) -> str:
  return path[len(step_dir) + 1:] or "."


def _damage_in(error: BaseException, step_dir: str) -> str | None:
  """The evidence in one error (not its causes) that the checkpoint in `step_dir` is damaged, or None."""
  if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
    return f"it holds undecodable JSON ({error})"
  text = str(error)
  match = _STATUS.match(text)
  code = match.group(1) if match else None
  named = _named_paths(error, step_dir)
  if code == "OUT_OF_RANGE":
    for start, end, path in _BYTE_RANGE.findall(text):  # pylint: disable=unused-variable
      if path.startswith(step_dir + "/") and not absent(path):
        size = _size(path)
        if size < int(end):
          return f"{_relative(path, step_dir)} is truncated ({size} bytes, a read needs {end})"
    return None  # no named file is short: not shown to be truncated
  if code == "DATA_LOSS" or (code == "FAILED_PRECONDITION" and "JSON" in text):
    return f"its data does not decode ({_first_line(text)})"
  if isinstance(error, FileNotFoundError) or code == "NOT_FOUND" or "does not exist" in text:
    files = [p for p in named if not p.endswith("/")]
    missing = [p for p in files if absent(p)]
    if missing:
      return f"{_relative(missing[0], step_dir)} is missing"
    if files:
      return None  # a file said to be missing is there: a storage glitch, not damage
    databases = [p for p in named if p.endswith("/") and "OCDBT database" in text]
    for database in databases:
      if absent(database + _OCDBT_MANIFEST):
        return f"{_relative(database + _OCDBT_MANIFEST, step_dir)} is missing"
    if code == "NOT_FOUND" and not databases:
      return f"a part of it is missing ({_first_line(text)})"
  return None


def _first_line(text: str, limit: int = 300) -> str:
  line = _without_spec((text.strip().splitlines() or [""])[0])
  return line[:limit]


def describe(error: BaseException) -> str:
  """`Type: first line of the message`, short enough for a log line."""
  return f"{type(error).__name__}: {_first_line(str(error))}"


def damage_shown_by(error: BaseException, step_dir: str) -> str | None:
  """Why `error`, raised reading the checkpoint in `step_dir`, shows that checkpoint damaged; None when it
  does not (a storage failure, or nothing proves damage: the caller retries, then stops).

  Raises whatever checking the evidence raises (a file's existence or size cannot be read): the storage
  is failing then, so the caller treats it like the error itself.
  """
  step_dir = str(step_dir).rstrip("/")
  chain = _chain(error)
  if any(_is_storage_failure(e) for e in chain):
    return None
  for e in chain:
    problem = _damage_in(e, step_dir)
    if problem is not None:
      return problem
  return None
