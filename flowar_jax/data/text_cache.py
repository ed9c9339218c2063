"""The text-encoding cache: a frozen encoder's outputs for every distinct caption, computed once.

Captions repeat (the composed digits have a few hundred distinct ones over thousands of images), so the cache
holds one record per distinct caption, the empty prompt (the null condition of classifier-free guidance)
always first. Layout, under any `fs` directory (`gs://` included):

  manifest.json             the encoder (name, weights, tokenizer, max_length, truncate, widths), the number
                            and digest of the captions, the shard size
  captions.json             the distinct captions, in row order
  shard_00000-<id>.npy      rows [0, S): a 1-D structured array, one record per caption:
                            'states' float32 [T, D], 'mask' bool [T], 'pooled' float32 [P]
  ...

As in the latent cache (`training/latent_cache.py`): `<id>` is a hash of the manifest, each file is written
whole-or-nothing, a shard is complete when its .npy exists (a killed job encodes only what is missing),
process p of P encodes shards p, p + P, ..., and readers fetch only the records a batch needs with ranged
reads. Unlike it, a cache whose manifest differs from the run's (another encoder, weights, max_length or
caption set) is refused with an error naming what changed, never silently re-encoded or mixed.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
from typing import Callable, Sequence

from absl import logging
import numpy as np

from flowar_jax.runs import fs
from flowar_jax.text.base import TextEncoder

SHARD_SIZE = 4096  # captions per shard: 100 MiB at T = 16, D = 384
ENCODE_BATCH = 64
_FORMAT = "flowar_jax text cache v1"
_NAMED = 5  # over-long captions named in an error
NULL_PROMPT = ""


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What a cache holds; a run may use a cache only when its expected manifest equals the stored one."""

  encoder: tuple[tuple[str, object], ...]  # (key, value): name, weights, tokenizer, max_length, truncate
  context_length: int  # T
  width: int  # D
  pooled_width: int  # P
  count: int  # distinct captions, the empty prompt included
  captions_digest: str
  shard_size: int = SHARD_SIZE

  @property
  def num_shards(self) -> int:
    return -(-self.count // self.shard_size)

  @property
  def record_dtype(self) -> np.dtype:
    return np.dtype([("states", "<f4", (self.context_length, self.width)), ("mask", "?", (self.context_length,)),
                     ("pooled", "<f4", (self.pooled_width,))])

  @functools.cached_property
  def fingerprint(self) -> str:
    return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:12]

  def shard_bounds(self, index: int) -> tuple[int, int]:
    start = index * self.shard_size
    return start, min(start + self.shard_size, self.count)

  def shard_name(self, index: int) -> str:
    return f"shard_{index:05d}-{self.fingerprint}.npy"

  def to_json(self) -> dict:
    return {"format": _FORMAT, "encoder": dict(self.encoder), "context_length": self.context_length,
            "width": self.width, "pooled_width": self.pooled_width, "count": self.count,
            "captions_digest": self.captions_digest, "shard_size": self.shard_size}

  @classmethod
  def from_json(cls, value: dict) -> Manifest:
    if value.get("format") != _FORMAT:
      raise ValueError(f"unknown text cache format {value.get('format')!r}, expected {_FORMAT!r}")
    return cls(tuple(sorted(value["encoder"].items())), int(value["context_length"]), int(value["width"]),
               int(value["pooled_width"]), int(value["count"]), str(value["captions_digest"]),
               int(value["shard_size"]))


def distinct_captions(captions: Sequence[str]) -> list[str]:
  """The empty prompt, then every other distinct caption in order of first appearance."""
  return list(dict.fromkeys([NULL_PROMPT, *captions]))


def captions_digest(distinct: Sequence[str]) -> str:
  return hashlib.sha256(json.dumps(list(distinct)).encode()).hexdigest()


def expected_manifest(encoder_identity: dict, encoder: TextEncoder, distinct: Sequence[str],
                      shard_size: int = SHARD_SIZE) -> Manifest:
  """The manifest of `distinct` captions encoded by `encoder`, built as `encoder_identity` says (the text
  config's encoder, weights, tokenizer, max_length and truncate)."""
  return Manifest(tuple(sorted(encoder_identity.items())), int(encoder.context_length), int(encoder.width),
                  int(encoder.pooled_width), len(distinct), captions_digest(distinct), shard_size)


def _npy_header(dtype: np.dtype, count: int) -> bytes:
  """The .npy header of a 1-D array of `count` records; its length is where the records start."""
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buffer, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)})
  return buffer.getvalue()


class TextCache:
  """A complete cache: captions -> rows in memory, records by ranged reads of only the rows asked for."""

  def __init__(self, directory: str, manifest: Manifest, captions: Sequence[str]):
    if len(captions) != manifest.count:
      raise ValueError(f"text cache {directory}: {len(captions)} captions, the manifest says {manifest.count}")
    self.directory, self.manifest = directory, manifest
    self.captions = list(captions)
    self._rows = {caption: row for row, caption in enumerate(self.captions)}
    self._dtype = manifest.record_dtype
    self._paths = [fs.join(directory, manifest.shard_name(i)) for i in range(manifest.num_shards)]
    self._offsets = np.array([len(_npy_header(self._dtype, stop - start))
                              for start, stop in map(manifest.shard_bounds, range(manifest.num_shards))], np.int64)

  def __len__(self) -> int:
    return self.manifest.count

  def rows(self, texts: Sequence[str]) -> np.ndarray:
    """Captions `[B]` -> int64 rows `[B]`; a caption the cache lacks is an error naming it."""
    try:
      return np.array([self._rows[str(text)] for text in texts], np.int64)
    except KeyError as error:
      raise ValueError(f"caption {error.args[0]!r} is not in the text cache {self.directory} "
                       f"({len(self)} captions, encoded from the split's captions)") from None

  def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `[B]` -> `{'text_states': float32 [B, T, D], 'text_mask': bool [B, T], 'text_pooled': float32 [B, P]}`."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
      raise IndexError(f"text cache rows must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}")
    shards, within = np.divmod(rows, self.manifest.shard_size)
    starts = self._offsets[shards] + within * self._dtype.itemsize
    requests = zip([self._paths[i] for i in shards.tolist()], starts.tolist(), (starts + self._dtype.itemsize).tolist())
    records = np.frombuffer(b"".join(fs.read_ranges(list(requests))), self._dtype)
    return {"text_states": np.ascontiguousarray(records["states"]), "text_mask": records["mask"].copy(),
            "text_pooled": np.ascontiguousarray(records["pooled"])}

  def encodings(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Captions `[B]` -> their cached encodings, as `read` gives them."""
    return self.read(self.rows(texts))

  def null(self) -> dict[str, np.ndarray]:
    """The empty prompt's encoding (the null condition), `[1, ...]` as `read` gives it."""
    return self.read(np.zeros(1, np.int64))


def check_lengths(encoder: TextEncoder, distinct: Sequence[str], origins: Callable[[str], str] | None = None) -> None:
  """Tokenizes every caption; one the encoder refuses (longer than its context, when it does not truncate) is
  reported with the count and the first few, and where each comes from (`origins(caption)`, e.g. its rows)."""
  refused = []
  for start in range(0, len(distinct), ENCODE_BATCH):
    chunk = distinct[start:start + ENCODE_BATCH]
    try:
      encoder.tokenize(chunk)
    except ValueError:
      for caption in chunk:  # find which: the error names one caption, the report names them all
        try:
          encoder.tokenize([caption])
        except ValueError as error:
          refused.append((caption, str(error).splitlines()[0]))
  if refused:
    named = "; ".join(f"{caption!r}{' at ' + origins(caption) if origins else ''} ({why})"
                      for caption, why in refused[:_NAMED])
    more = f"; and {len(refused) - _NAMED} more" if len(refused) > _NAMED else ""
    raise ValueError(f"{len(refused)} caption(s) the text encoder refuses (context {encoder.context_length} tokens): "
                     f"{named}{more}. Shorten them, drop those rows, or set config.text.truncate=True.")


def encode(encoder: TextEncoder, captions: Sequence[str], batch_size: int = ENCODE_BATCH) -> dict[str, np.ndarray]:
  """Captions `[N]` -> `{'states': float32 [N, T, D], 'mask': bool [N, T], 'pooled': float32 [N, P]}`, in
  batches padded with the empty prompt to `batch_size` (one compiled shape)."""
  out = {"states": [], "mask": [], "pooled": []}
  for start in range(0, len(captions), batch_size):
    chunk = list(captions[start:start + batch_size])
    tokens = encoder.tokenize(chunk + [NULL_PROMPT] * (batch_size - len(chunk)))
    encoding = encoder(tokens.ids, tokens.mask)
    out["states"].append(np.asarray(encoding.states, np.float32)[:len(chunk)])
    out["mask"].append(np.asarray(encoding.mask, bool)[:len(chunk)])
    out["pooled"].append(np.asarray(encoding.pooled, np.float32)[:len(chunk)])
  return {key: np.concatenate(value) for key, value in out.items()}


def _write_shard(directory: str, manifest: Manifest, index: int, encoded: dict[str, np.ndarray]) -> None:
  start, stop = manifest.shard_bounds(index)
  records = np.empty(stop - start, manifest.record_dtype)
  records["states"], records["mask"], records["pooled"] = encoded["states"], encoded["mask"], encoded["pooled"]
  fs.write_bytes(fs.join(directory, manifest.shard_name(index)), _npy_header(manifest.record_dtype, stop - start)
                 + records.tobytes())


def _stored_manifest(directory: str) -> Manifest | None:
  path = fs.join(directory, "manifest.json")
  if not fs.exists(path):
    return None
  try:
    return Manifest.from_json(fs.read_json(path))
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(f"text cache manifest {path} is unreadable ({error}); delete {directory} to re-encode") from None


def _refuse_stale(directory: str, stored: Manifest, expected: Manifest) -> None:
  old, new = stored.to_json(), expected.to_json()
  was, now = old["encoder"], new["encoder"]
  changed = [f"encoder.{k}: cached {was.get(k)!r}, now {now.get(k)!r}"
             for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
  changed += [f"{k}: cached {old[k]!r}, now {new[k]!r}" for k in new if k != "encoder" and old[k] != new[k]]
  raise ValueError(f"the text cache {directory} is stale ({'; '.join(changed)}). Delete it to re-encode the "
                   f"captions, or use another workdir.")


def _barrier(name: str, shard_count: int) -> None:
  if shard_count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def load(directory: str) -> TextCache:
  """A complete cache from its directory (no encoder needed); an error when it is absent or incomplete."""
  manifest = _stored_manifest(directory)
  if manifest is None:
    raise FileNotFoundError(f"no text cache in {directory} (manifest.json is missing)")
  names = set(fs.listdir(directory))
  absent = [i for i in range(manifest.num_shards) if manifest.shard_name(i) not in names]
  if absent:
    raise ValueError(f"text cache {directory} lacks shards {absent[:10]}: it is still being (or was never fully) "
                     f"encoded")
  return TextCache(directory, manifest, fs.read_json(fs.join(directory, "captions.json")))


def build(directory: str, encoder: TextEncoder, encoder_identity: dict, captions: Sequence[str], *,
          origins: Callable[[str], str] | None = None, shard_size: int = SHARD_SIZE, shard_index: int = 0,
          shard_count: int = 1) -> tuple[TextCache, list[int]]:
  """Completes the cache of `captions` (duplicates allowed) in `directory` -> (the cache, shards encoded now).

  Every one of the `shard_count` processes calls this alike; process `shard_index` encodes the missing shards
  i with i % shard_count == shard_index.

  Raises:
    ValueError when `directory` holds a cache of another encoder or caption set (naming what changed), or when
    the encoder refuses a caption (naming it, and where it comes from by `origins(caption)`).
  """
  distinct = distinct_captions(captions)
  manifest = expected_manifest(encoder_identity, encoder, distinct, shard_size)
  stored = _stored_manifest(directory)
  if stored is not None and stored != manifest:
    _refuse_stale(directory, stored, manifest)
  names = set(fs.listdir(directory))
  _barrier("text cache listed", shard_count)  # no process writes before every process has listed
  missing = [i for i in range(manifest.num_shards) if manifest.shard_name(i) not in names]
  encoded = []
  if missing:  # checked before the manifest is written: a refused caption leaves no cache behind
    check_lengths(encoder, distinct, origins)  # every process: all raise alike rather than leave others waiting
  if shard_index == 0 and stored is None:
    fs.write_json(fs.join(directory, "captions.json"), distinct)
    fs.write_json(fs.join(directory, "manifest.json"), manifest.to_json())
  for index in [i for i in missing if i % shard_count == shard_index]:
    start, stop = manifest.shard_bounds(index)
    _write_shard(directory, manifest, index, encode(encoder, distinct[start:stop]))
    encoded.append(index)
  _barrier("text cache written", shard_count)
  cache = load(directory)
  logging.info("text cache %s: %d distinct captions (of %d) in %d shards, %d encoded by this process now",
               directory, len(cache), len(captions), manifest.num_shards, len(encoded))
  return cache, encoded
