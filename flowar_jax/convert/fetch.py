"""Official checkpoints given as a local path, an http(s) URL or a Hugging Face `OWNER/REPO/FILE`, as a local file.

  path = fetch_checkpoint("OliverRen/FlowAR/FlowAR-S.pth")      # hf_hub_download, cached by huggingface_hub
  path = fetch_checkpoint("https://host/kl16.ckpt#sha256=HEX")  # cached under cache_root()/downloads
  path = fetch_checkpoint("weights/FlowAR-S.pth")               # an existing local file, unchanged

A URL is downloaded once into `cache_root()/downloads/` (a temporary name, renamed when complete and checked,
so an interrupted or short transfer is never taken for the file), with retries and backoff on transient
errors (connection errors, timeouts, HTTP 408/429/5xx). `#sha256=HEX` after a URL (pip's convention), or the
`sha256` argument, also checks the content. A Hugging Face file goes through huggingface_hub, which honours
HF_ENDPOINT (read here at each call), HF_HOME and HF_TOKEN. Nothing is fetched unless asked for.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

# Where the official files are published: FlowAR's README links the Hugging Face repository OliverRen/FlowAR
# and its evaluation commands name the files FlowAR-S/L/H.pth; MAR's README (util/download.py) publishes
# kl16.ckpt as a Dropbox link, given here with dl=1 (Dropbox's direct-download form of the same link).
PUBLISHED = {
    "flowar_s": "OliverRen/FlowAR/FlowAR-S.pth",
    "flowar_l": "OliverRen/FlowAR/FlowAR-L.pth",
    "flowar_h": "OliverRen/FlowAR/FlowAR-H.pth",
    "kl16": "https://www.dropbox.com/scl/fi/hhmuvaiacrarfg28qxhwz/kl16.ckpt?rlkey=l44xipsezc8atcffdp4q7mwmh&dl=1",
    "var_d16": "FoundationVision/var/var_d16.pth",
    "var_d20": "FoundationVision/var/var_d20.pth",
    "var_d24": "FoundationVision/var/var_d24.pth",
    "var_d30": "FoundationVision/var/var_d30.pth",
    "vae_ch160v4096z32": "FoundationVision/var/vae_ch160v4096z32.pth",
}

_RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_HF_ID = re.compile(r"^(?:hf://)?([\w.-]+/[\w.-]+)/(.+?)(?:@([\w./-]+))?$")
_CHUNK = 1 << 20


class DownloadError(OSError):
  """A checkpoint could not be fetched (the message names the URL or repository and why)."""


def cache_root() -> str:
  """$XDG_CACHE_HOME/flowar_jax, else ~/.cache/flowar_jax."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "flowar_jax")


def source_kind(source: str) -> str:
  """'url', 'hf' or 'local': how `fetch_checkpoint` reads `source`.

  An existing file is always local; otherwise `hf://OWNER/REPO/FILE[@REV]` or a relative `OWNER/REPO/FILE`
  (three or more parts, the first not '.' or '..') names a Hugging Face file.
  """
  if re.match(r"^https?://", source, re.IGNORECASE):
    return "url"
  if source.startswith("hf://"):
    return "hf"
  if os.path.exists(source) or source.startswith(("/", "./", "../", "~")):
    return "local"
  return "hf" if _HF_ID.match(source) else "local"


def fetch_checkpoint(source: str, *, sha256: str | None = None, cache_dir: str | None = None,
                     retries: int = 3, timeout: float = 60.0) -> str:
  """The local path of the checkpoint `source` (a path, an http(s) URL, or a Hugging Face OWNER/REPO/FILE[@REV]),
  downloading it on first use; a later call with the same source returns the cached file without a request."""
  kind = source_kind(source)
  if kind == "url":
    url, _, fragment = source.partition("#")
    if fragment.startswith("sha256="):
      sha256 = sha256 or fragment[len("sha256="):]
    return download_url(url, sha256=sha256, cache_dir=cache_dir, retries=retries, timeout=timeout)
  if kind == "hf":
    return download_hf(source, cache_dir=cache_dir)
  path = os.path.expanduser(source)
  if sha256:
    _check_sha256(path, sha256, source)
  return path


def cached_path(url: str, cache_dir: str | None = None) -> str:
  """Where `download_url` keeps `url`: the URL's file name, prefixed by a hash of the whole URL."""
  name = os.path.basename(urllib.parse.urlsplit(url).path) or "download"
  digest = hashlib.sha256(url.encode()).hexdigest()[:16]
  return os.path.join(cache_dir or os.path.join(cache_root(), "downloads"), f"{digest}-{name}")


def download_url(url: str, *, sha256: str | None = None, cache_dir: str | None = None, retries: int = 3,
                 timeout: float = 60.0, backoff: float = 1.0) -> str:
  """Downloads `url` into the cache (once) and returns the local path.

  Transient failures (connection errors, timeouts, a transfer shorter than its Content-Length, HTTP
  408/429/5xx) are retried `retries` times, waiting backoff * 2**attempt seconds; other HTTP errors fail at once.
  """
  target = cached_path(url, cache_dir)
  if os.path.isfile(target):
    if sha256:
      _check_sha256(target, sha256, url)
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  for attempt in range(retries + 1):
    try:
      _download_once(url, target, timeout)
      break
    except _Transient as e:
      if attempt == retries:
        raise DownloadError(f"downloading {url} failed after {retries + 1} attempts: {e}") from e
      time.sleep(backoff * 2 ** attempt)
  if sha256:
    try:
      _check_sha256(target, sha256, url)
    except DownloadError:
      os.remove(target)  # never keep a file that failed its check
      raise
  return target


class _Transient(Exception):
  """A failure worth retrying."""


def _download_once(url: str, target: str, timeout: float) -> None:
  request = urllib.request.Request(url, headers={"User-Agent": "flowar_jax"})
  fd, partial = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".partial",
                                 dir=os.path.dirname(target))
  try:
    with os.fdopen(fd, "wb") as out:
      try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
          if "text/html" in (response.headers.get("Content-Type") or ""):
            raise DownloadError(f"{url} returned a web page (text/html), not a checkpoint file: give the file's "
                                f"direct download URL")
          expected = response.headers.get("Content-Length")
          received = 0
          while chunk := response.read(_CHUNK):
            out.write(chunk)
            received += len(chunk)
      except urllib.error.HTTPError as e:
        if e.code in _RETRIED_STATUS:
          raise _Transient(f"HTTP {e.code} {e.reason}") from e
        raise DownloadError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from e
      except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as e:
        raise _Transient(str(getattr(e, "reason", e))) from e
      except http.client.IncompleteRead as e:
        raise _Transient(f"the transfer broke off after {len(e.partial)} more bytes") from e
    if expected is not None and received != int(expected):
      raise _Transient(f"received {received} of {expected} bytes")
    if received == 0:
      raise DownloadError(f"downloading {url} failed: the server sent an empty file")
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def _check_sha256(path: str, expected: str, source: str) -> None:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      digest.update(block)
  if digest.hexdigest() != expected.lower():
    raise DownloadError(f"{source}: sha256 {digest.hexdigest()} does not match the expected {expected}")


def download_hf(source: str, cache_dir: str | None = None) -> str:
  """`[hf://]OWNER/REPO/PATH[@REVISION]` -> the local path, through huggingface_hub's cache."""
  match = _HF_ID.match(source)
  if not match:
    raise ValueError(f"{source!r} is not a Hugging Face file: write OWNER/REPO/FILE (e.g. {PUBLISHED['flowar_s']})")
  repo_id, filename, revision = match.groups()
  try:
    from huggingface_hub import hf_hub_download  # pylint: disable=g-import-not-at-top
    from huggingface_hub.errors import (  # pylint: disable=g-import-not-at-top
        EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError)
  except ImportError as e:
    raise ImportError(f"{source!r} names a Hugging Face file; fetching it needs huggingface_hub: "
                      f"pip install huggingface_hub") from e
  where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
  try:
    return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                           endpoint=os.environ.get("HF_ENDPOINT") or None)
  except LocalEntryNotFoundError as e:  # no connection, and not in the cache
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    raise DownloadError(f"could not reach {endpoint} to download {where}, and it is not in the Hugging Face cache "
                        f"(there is no local file {source!r} either)") from e
  except (EntryNotFoundError, RepositoryNotFoundError) as e:
    raise DownloadError(f"Hugging Face has no file {where} (and there is no local file {source!r}): "
                        f"{_first_line(e)}") from e
  except Exception as e:  # pylint: disable=broad-except  # network and HTTP errors of the hub client
    if isinstance(e, (KeyboardInterrupt, DownloadError)):
      raise
    raise DownloadError(f"downloading {where} from Hugging Face failed (there is no local file {source!r}): "
                        f"{_first_line(e)}") from e


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
