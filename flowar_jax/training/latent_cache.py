"""Precomputed VAE posteriors: encode the train split once, then train FlowAR on the cached moments.

The cache stores the posterior's mean and log-variance (not one sample), so training still draws a fresh
posterior sample every step, exactly as when encoding on the fly without augmentation.

Layout, under WORKDIR/latent_cache/ (any `fs` path, `gs://` included):

  manifest.json             count, shard size, record shape and dtypes, the data it was encoded from (for a
                            captioned split, a hash of its captions in example order)
  shard_00000-<id>.npy      examples [0, S): a 1-D structured array, one record per example:
                            'moments' float32 [h, w, 2C] (mean | logvar) and 'label' int32
  shard_00000-<id>.json     that shard's count and the spread of its posterior means (for the latent scale)
  ...

`<id>` is a hash of the manifest, so shards of another VAE shape or dataset are never mistaken for this
cache's. Each file is written whole-or-nothing (`fs.write_bytes`), the .json before the .npy: a shard is
complete when its .npy exists, and a killed caching job re-encodes only the shards it had not finished.

Process p of P encodes shards p, p + P, ... on its own devices and writes them; training then reads, for
each batch, exactly the records of that batch with ranged reads (`fs.read_ranges`), so host memory holds
one shard while encoding and one batch while training, whatever the dataset size.

Record i is example i of the train split; a text run's batches carry each record's index (`read_indexed`),
which `flowar_jax.data.text_batches` maps to that example's caption encodings.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
from typing import Callable, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from flowar_jax import data
from flowar_jax.data import preprocess
from flowar_jax.data import source as source_lib
from flowar_jax.models.vae import AutoencoderKL
from flowar_jax.parallel.batch import to_host
from flowar_jax.parallel.mesh import MESH_AXES
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.runs import fs
from flowar_jax.runs.progress import Progress

SHARD_SIZE = 1024  # examples per shard: 32 MiB of records for ImageNet at 256 px (latent 16 x 16 x 16)
_ENCODE_BATCH = 64
_READ_THREADS = 16  # threads decoding images while encoding (when config.data.num_workers > 0), reading spreads
_FORMAT = "flowar_jax latent cache v1"


def cache_dir(workdir: str) -> str:
  return fs.join(workdir, "latent_cache")


@dataclasses.dataclass(frozen=True)
class Spread:
  """Count, mean and sum of squared deviations of some values (float64); merges exactly as one pass would,
  up to rounding, so per-shard spreads give the spread of the whole cache."""

  count: int
  mean: float
  m2: float

  @classmethod
  def of(cls, values: np.ndarray) -> Spread:
    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    return cls(values.size, mean, float(np.square(values - mean).sum()))

  def merge(self, other: Spread) -> Spread:
    count = self.count + other.count
    delta = other.mean - self.mean
    return Spread(count, self.mean + delta * other.count / count,
                  self.m2 + other.m2 + delta * delta * self.count * other.count / count)

  @property
  def std(self) -> float:
    return float(np.sqrt(self.m2 / self.count))


def mean_spread(moments: np.ndarray, shard_size: int = SHARD_SIZE) -> Spread:
  """The spread of the posterior means of in-memory moments `[N, h, w, 2C]`, merged chunk by chunk of
  `shard_size` examples as `LatentCache.mean_spread` merges its shards, so the same data gives the same bits."""
  channels = moments.shape[-1] // 2
  spreads = [Spread.of(moments[start:start + shard_size, ..., :channels])
             for start in range(0, len(moments), shard_size)]
  return functools.reduce(Spread.merge, spreads)


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What a cache holds; two caches with equal manifests are interchangeable."""

  count: int
  shard_size: int
  shape: tuple[int, int, int]  # (h, w, 2C) of one example's moments
  data: tuple[tuple[str, object], ...]  # (key, value) of the data config the images were read with

  def __post_init__(self):
    if self.count <= 0 or self.shard_size <= 0:
      raise ValueError(f"a latent cache needs count and shard_size > 0, got {self.count} and {self.shard_size}")

  @property
  def num_shards(self) -> int:
    return -(-self.count // self.shard_size)

  @property
  def record_dtype(self) -> np.dtype:
    return np.dtype([("moments", "<f4", self.shape), ("label", "<i4")])

  @functools.cached_property
  def fingerprint(self) -> str:
    return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:12]

  def shard_bounds(self, index: int) -> tuple[int, int]:
    start = index * self.shard_size
    return start, min(start + self.shard_size, self.count)

  def shard_name(self, index: int, suffix: str) -> str:
    return f"shard_{index:05d}-{self.fingerprint}.{suffix}"

  def to_json(self) -> dict:
    return {"format": _FORMAT, "count": self.count, "shard_size": self.shard_size, "shape": list(self.shape),
            "moments_dtype": "float32", "label_dtype": "int32", "data": dict(self.data)}

  @classmethod
  def from_json(cls, value: dict) -> Manifest:
    if value.get("format") != _FORMAT:
      raise ValueError(f"unknown latent cache format {value.get('format')!r}, expected {_FORMAT!r}")
    return cls(int(value["count"]), int(value["shard_size"]), tuple(value["shape"]),
               tuple(sorted(value["data"].items())))


def expected_manifest(config: ml_collections.ConfigDict, vae_stride: int, count: int,
                      shard_size: int = SHARD_SIZE, captions: Sequence[str] | None = None) -> Manifest:
  """The manifest of `config`'s train split (`count` examples) encoded by a VAE of stride `vae_stride`.

  A captioned split's `captions` (`[count]`, example i's at i) are recorded by their hash: a text run pairs
  record i with caption i, so a cache encoded from other or reordered captions is re-encoded, not misread.
  """
  side = config.data.image_size // vae_stride
  described = {"name": config.data.name, "image_size": config.data.image_size,
               "resize_size": source_lib.resize_size(config.data)}
  if captions is not None:
    if len(captions) != count:
      raise ValueError(f"{len(captions)} captions for a latent cache of {count} examples")
    described["captions_sha256"] = hashlib.sha256(json.dumps(list(captions)).encode()).hexdigest()
  return Manifest(count, shard_size, (side, side, 2 * config.vae.latent_channels), tuple(sorted(described.items())))


@functools.lru_cache(maxsize=64)
def _npy_header(dtype: np.dtype, count: int) -> bytes:
  """The .npy header of a 1-D array of `count` records; its length is where the records start."""
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buffer, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)})
  return buffer.getvalue()


class LatentCache:
  """A complete cache in `directory`: random access to records by ranged reads, never whole shards."""

  def __init__(self, directory: str, manifest: Manifest):
    self.directory, self.manifest = directory, manifest
    self._dtype = manifest.record_dtype
    # Per shard (a few bytes each, N / shard_size of them): its path and where its records start.
    self._paths = [fs.join(directory, manifest.shard_name(i, "npy")) for i in range(manifest.num_shards)]
    self._offsets = np.array([len(_npy_header(self._dtype, stop - start))
                              for start, stop in map(manifest.shard_bounds, range(manifest.num_shards))], np.int64)

  def __len__(self) -> int:
    return self.manifest.count

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Examples `indices` `[B]` -> `{'moments': float32 [B, h, w, 2C], 'label': int32 [B]}`, in that order."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"latent cache indices must lie in [0, {len(self)}), got {indices.min()}..{indices.max()}")
    shards, rows = np.divmod(indices, self.manifest.shard_size)
    starts = self._offsets[shards] + rows * self._dtype.itemsize
    requests = zip([self._paths[i] for i in shards.tolist()], starts.tolist(),
                   (starts + self._dtype.itemsize).tolist())
    records = np.frombuffer(b"".join(fs.read_ranges(list(requests))), self._dtype)
    return {"moments": np.ascontiguousarray(records["moments"]), "label": records["label"].copy()}

  def mean_spread(self) -> Spread:
    """The spread of every posterior mean in the cache, from the shards' stored spreads (no records read)."""
    paths = [fs.join(self.directory, self.manifest.shard_name(i, "json")) for i in range(self.manifest.num_shards)]
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:  # one small file per shard: overlap the GETs
      stored = [value["mean_spread"] for value in pool.map(fs.read_json, paths)]
    spreads = [Spread(int(s["count"]), float(s["mean"]), float(s["m2"])) for s in stored]
    return functools.reduce(Spread.merge, spreads)  # in shard order, whoever reads them

  def read_indexed(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """As `read`, plus `'index'`: int64 `[B]`, each record's example index in the split it was encoded from."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    return {**self.read(indices), "index": indices}

  def train_iterator(self, batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                     batch_map: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
                     ) -> grain.DatasetIterator:
    """Infinite, shuffled, checkpointable batches `{'moments': [B, h, w, 2C], 'label': [B]}` of process
    `shard_index` of `shard_count`, B = batch_size // shard_count.

    One global permutation per epoch (grain reshuffles each repeat), then this process's strided share cut
    to whole batches: the order of the in-memory cache this one replaces. Only indices go through grain;
    each batch's records are read in one `read` call, so the iterator state is the position alone.

    `batch_map`, when given, receives each batch with its examples' indices added (`read_indexed`) and returns
    the batch to yield; it runs inside the grain iterator, so the state is still the position alone (text runs
    add each example's caption encodings this way).
    """
    if batch_size % shard_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by the {shard_count} processes")
    local_batch = batch_size // shard_count
    if len(self) // shard_count < local_batch:
      raise ValueError(f"the train split has {len(self)} examples, fewer than one batch of {batch_size}")
    per_shard = len(self) // shard_count // local_batch * local_batch
    indices = (grain.MapDataset.range(len(self)).shuffle(seed=seed)
               .slice(slice(shard_index, shard_count * per_shard, shard_count))
               .repeat())
    dataset = (indices.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
               .batch(local_batch, drop_remainder=True)
               .map(self.read if batch_map is None else lambda indices: batch_map(self.read_indexed(indices))))
    return iter(dataset)


class LocalEncoder:
  """The VAE encoder jitted over this process's own devices: processes encode different shards at their own
  pace, so no collective may run while they do. `encoder(images [b, H, W, 3])` -> moments `[b, h, w, 2C]`."""

  def __init__(self, vae: AutoencoderKL, batch_size: int = _ENCODE_BATCH):
    graphdef, state = nnx.split(vae)
    state = to_host(state)  # whole parameters on every process (the run's plan may split them over hosts)
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.array(devices).reshape(-1, 1, 1), MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    self._plan = ShardingPlan(mesh, {"batch": ("data",)})
    self._batch_sharding = self._plan.batch_sharding()  # one object: JAX caches by sharding, so reuse it
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    # Plain leaves, unflattened inside: an nnx State argument would rebuild its Variables' metadata every call.
    leaves, treedef = jax.tree.flatten(state)
    self._state = jax.device_put(leaves, self._plan.replicated)

    def encode(leaves, images):
      posterior = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)).encode(images)
      return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)

    self._encode = self._plan.jit(encode, in_shardings=(self._plan.replicated, self._batch_sharding),
                                  out_shardings=self._batch_sharding)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    count = len(images)
    if count > self.batch_size:
      raise ValueError(f"{count} images exceed the encoder's batch of {self.batch_size}")
    padded = np.zeros((self.batch_size,) + images.shape[1:], np.float32)  # one compiled shape
    padded[:count] = images
    batch = jax.device_put(padded, self._batch_sharding)
    return np.asarray(self._encode(self._state, batch))[:count]


def _centre_cropped(example: dict, *, image_size: int, resize_to: int) -> dict[str, np.ndarray]:
  """The evaluation view of an example (as `data.make_eval_batches` gives it): float32 `[S, S, 3]` in [-1, 1]."""
  image = preprocess.center_crop(preprocess.resize_shorter_side(example["image"], resize_to), image_size)
  return {"image": preprocess.to_float(image), "label": np.int32(example["label"])}


def encode_range(encoder: Callable[[np.ndarray], np.ndarray], source: data.ImageSource,
                 data_config: ml_collections.ConfigDict, start: int, stop: int, batch_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Examples [start, stop) of `source`, centre-cropped and encoded in batches of `batch_size` counted from
  `start` -> moments float32 `[n, h, w, 2C]`, labels int32 `[n]`."""
  transform = functools.partial(_centre_cropped, image_size=data_config.image_size,
                                resize_to=source_lib.resize_size(data_config))
  threads = _READ_THREADS if data_config.num_workers else 0
  # range + map rather than MapDataset.source, whose per-read metrics keep a little memory per example
  examples = (grain.MapDataset.range(start, stop).map(lambda i: transform(source[i]))
              .to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * batch_size)))
  moments, labels = [], []
  for batch in examples.batch(batch_size):
    moments.append(encoder(batch["image"]))
    labels.append(batch["label"])
  return np.concatenate(moments), np.concatenate(labels).astype(np.int32)


def encode_train_split(vae: AutoencoderKL, config: ml_collections.ConfigDict, max_examples: int
                       ) -> tuple[np.ndarray, np.ndarray]:
  """-> moments float32 `[n, h, w, 2C]` (mean | logvar) and labels int32 `[n]` of the first
  n = min(max_examples, train size) centre-cropped train examples, encoded by every process alike."""
  source = data.build_source(config.data, "train")
  encoder = LocalEncoder(vae)
  return encode_range(encoder, source, config.data, 0, min(len(source), max_examples), encoder.batch_size)


def _write_shard(directory: str, manifest: Manifest, index: int, moments: np.ndarray, labels: np.ndarray) -> None:
  """Shard `index`: its spread first, then its records (their .npy appearing is what marks it complete)."""
  start, stop = manifest.shard_bounds(index)
  if moments.shape != (stop - start, *manifest.shape) or labels.shape != (stop - start,):
    raise ValueError(f"shard {index} needs moments {(stop - start, *manifest.shape)} and labels {(stop - start,)}, "
                     f"got {moments.shape} and {labels.shape}")
  spread = Spread.of(moments[..., :manifest.shape[-1] // 2])
  fs.write_json(fs.join(directory, manifest.shard_name(index, "json")),
                {"count": stop - start, "mean_spread": dataclasses.asdict(spread)})
  records = np.empty(stop - start, manifest.record_dtype)
  records["moments"], records["label"] = moments, labels
  fs.write_bytes(fs.join(directory, manifest.shard_name(index, "npy")),
                 _npy_header(manifest.record_dtype, stop - start) + records.tobytes())


def _read_manifest(directory: str) -> Manifest | None:
  path = fs.join(directory, "manifest.json")
  if not fs.exists(path):
    return None
  try:
    return Manifest.from_json(fs.read_json(path))
  except (ValueError, KeyError, TypeError) as error:
    logging.warning("latent cache manifest %s is unreadable (%s): re-encoding", path, error)
    return None


def _shard_index_of(name: str) -> int | None:
  """The shard index in a cache file's name (`shard_00012-...`, or a leftover `.shard_00012-....tmp`)."""
  name = name.lstrip(".")
  if not name.startswith("shard_") or not name[6:11].isdigit():
    return None
  return int(name[6:11])


def _remove_stale(directory: str, names: set[str], manifest: Manifest, shard_index: int, shard_count: int) -> None:
  """Deletes this process's share of files from another manifest (or unfinished local writes)."""
  for name in sorted(names):
    index = _shard_index_of(name)
    stale = manifest.fingerprint not in name or name.endswith(".tmp")
    if index is not None and stale and index % shard_count == shard_index:
      fs.remove(fs.join(directory, name))


def _barrier(name: str, shard_count: int) -> None:
  if shard_count > 1:
    multihost_utils.sync_global_devices(name)


def build(directory: str, manifest: Manifest, make_encoder: Callable[[], LocalEncoder], source: data.ImageSource,
          data_config: ml_collections.ConfigDict, *, shard_index: int = 0, shard_count: int = 1
          ) -> tuple[LatentCache, list[int]]:
  """Completes the cache of `manifest` in `directory` -> (the cache, the shards this process encoded now).

  Every one of the `shard_count` processes calls this; process `shard_index` encodes the missing shards
  i with i % shard_count == shard_index, one at a time, and all return once every shard is complete.
  `make_encoder` is called (by every process alike) only when some shard is missing.
  """
  if len(source) != manifest.count:
    raise ValueError(f"the train split has {len(source)} examples, the latent cache manifest {manifest.count}")
  stored = _read_manifest(directory)
  if stored is not None and stored != manifest:
    logging.warning("latent cache %s holds %s (record shape %s), expected %s (record shape %s): re-encoding",
                    directory, stored.to_json(), stored.shape, manifest.to_json(), manifest.shape)
  names = set(fs.listdir(directory))
  _barrier("latent cache listed", shard_count)  # no process writes before every process has listed
  missing = [i for i in range(manifest.num_shards) if manifest.shard_name(i, "npy") not in names]
  encoded = []
  if missing:
    encoder = make_encoder()
    if shard_index == 0 and stored != manifest:
      fs.write_json(fs.join(directory, "manifest.json"), manifest.to_json())
    _remove_stale(directory, names, manifest, shard_index, shard_count)
    mine = [i for i in missing if i % shard_count == shard_index]
    total = sum(stop - start for start, stop in map(manifest.shard_bounds, mine))
    if mine:
      done = 0
      with Progress(total, desc="encode latents", unit="image", every=max(1, total // 20)) as progress:
        for index in mine:
          start, stop = manifest.shard_bounds(index)
          moments, labels = encode_range(encoder, source, data_config, start, stop, encoder.batch_size)
          _write_shard(directory, manifest, index, moments, labels)
          encoded.append(index)
          done += stop - start
          progress.update(done)
  _barrier("latent cache written", shard_count)
  if missing:
    names = set(fs.listdir(directory))
    absent = [i for i in range(manifest.num_shards) if manifest.shard_name(i, "npy") not in names]
    if absent:
      raise RuntimeError(f"latent cache {directory} still lacks shards {absent[:10]} after encoding")
  elif shard_index == 0 and stored != manifest:
    fs.write_json(fs.join(directory, "manifest.json"), manifest.to_json())
  return LatentCache(directory, manifest), encoded


def load_or_encode(vae: AutoencoderKL, config: ml_collections.ConfigDict, workdir: str,
                   shard_size: int = SHARD_SIZE, source: data.ImageSource | None = None) -> LatentCache:
  """The latent cache of WORKDIR, encoding (split over the processes) whatever shards it lacks; a cache of
  another latent shape or dataset is re-encoded with a warning. `source`: the train split's source where the
  caller has built it already."""
  directory = cache_dir(workdir)
  legacy = fs.join(workdir, "latent_cache.npz")
  if fs.exists(legacy):
    logging.warning("%s (a single-file cache) is no longer read; the cache is %s. Delete it to free space.",
                    legacy, directory)
  if source is None:
    source = data.build_source(config.data, "train")
  manifest = expected_manifest(config, vae.stride, len(source), shard_size, getattr(source, "captions", None))
  cache, encoded = build(directory, manifest, functools.partial(LocalEncoder, vae), source, config.data,
                         shard_index=jax.process_index(), shard_count=jax.process_count())
  logging.info("latent cache %s: %d latents of shape %s in %d shards, %d encoded by this process now",
               directory, len(cache), manifest.shape, manifest.num_shards, len(encoded))
  return cache


def make_latent_iterator(vae: AutoencoderKL, config: ml_collections.ConfigDict, workdir: str
                         ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite, shuffled, checkpointable iterator of `{'moments': [B, h, w, 2C], 'label': [B]}` (this process's
  share); missing shards of the cache are encoded first."""
  cache = load_or_encode(vae, config, workdir)
  return cache.train_iterator(config.batch_size, config.seed, jax.process_index(), jax.process_count())
