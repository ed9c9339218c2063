"""Reference statistics for FID / sFID and reference features for precision / recall.

A reference is named by a string (config `eval.reference`, flag `--reference`):
  PATH.npz        ADM's layout, local or gs://, e.g. VIRTUAL_imagenet256_labeled.npz: `mu`, `sigma` (pool3)
                  and `mu_s`, `sigma_s` (spatial) when precomputed, and/or `arr_0`, uint8 reference images
                  [N, H, W, 3]. As in ADM's evaluator, stored statistics are used when present; features of
                  `arr_0` are computed for precision / recall (and for statistics the file lacks).
  dataset:train   a fixed-size draw from one split of the config's dataset, center-cropped at the training
  dataset:eval    size as `make_eval_batches` serves it (see `ReferenceDraw`): `draw.pr_size` images (10,000,
                  ADM's reference batch size) for precision / recall, `draw.stats_size` images (50,000) for
                  the FID / sFID statistics, fewer only when the split is smaller. Only the drawn images are
                  read, so the cost does not grow with the split.
Features and statistics are computed once and cached in `cache_dir` (local or gs://) under names that
spell out what determines them, next to a JSON file that records it in full.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import zipfile

import grain
import jax
import ml_collections
import numpy as np

from flowar_jax.data import preprocess
from flowar_jax.data import source as source_lib
from flowar_jax.evaluation.features import InceptionFeatures
from flowar_jax.evaluation.frechet import feature_statistics
from flowar_jax.evaluation.metrics import PR_NEIGHBOURS
from flowar_jax.runs import fs

DATASET_PREFIX = "dataset:"
_STATS = ("mu", "sigma", "mu_s", "sigma_s")
_READ_THREADS = 16  # image decoding releases the GIL; threads keep Inception fed on ImageNet JPEGs


@dataclasses.dataclass
class Reference:
  """mu `[2048]`, sigma `[2048, 2048]`, mu_s `[2023]`, sigma_s `[2023, 2023]`; pool `[N, 2048]` for P/R."""

  name: str
  mu: np.ndarray | None = None
  sigma: np.ndarray | None = None
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  pool: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class ReferenceDraw:
  """Which images of a dataset split form a `dataset:SPLIT` reference.

  One permutation of the split's indices, seeded by `seed`, is drawn; the precision / recall images are its
  first `pr_size` entries and the statistics images its first `stats_size` (so one set contains the other
  and the features of the larger serve both). Uniform over the split, unlike its first N images, which in a
  dataset listed class by class (`image_folder`) would cover a handful of classes.
  """

  pr_size: int = 10_000
  stats_size: int = 50_000
  seed: int = 0

  def __post_init__(self):
    if self.pr_size <= PR_NEIGHBOURS or self.stats_size < 2:
      raise ValueError(f"a reference draw needs pr_size > {PR_NEIGHBOURS} (k-NN manifolds) and stats_size >= 2 "
                       f"(covariances), got pr_size={self.pr_size}, stats_size={self.stats_size}")


def draw_indices(num_items: int, count: int, seed: int) -> np.ndarray:
  """int64 `[min(count, num_items)]`: the first entries of a seeded permutation of range(num_items)."""
  if num_items < 1:
    raise ValueError("cannot draw a reference from an empty split")
  return np.random.default_rng(seed).permutation(num_items)[:count].astype(np.int64)


def _dataset_split(spec: str) -> str | None:
  if not spec.startswith(DATASET_PREFIX):
    return None
  split = spec[len(DATASET_PREFIX):]
  if split not in ("train", "eval"):
    raise ValueError(f"reference {spec!r}: the dataset split must be 'train' or 'eval'")
  return split


def _npz_keys(spec: str) -> set[str]:
  """The array names of an .npz file without reading its arrays (a reference batch may be GBs on gs://)."""
  try:
    with fs.as_path(spec).open("rb") as f, np.load(f) as archive:
      return set(archive.files)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # what np.load raises on a non-.npz
    raise ValueError(f"reference {spec!r} is not a readable .npz file: {e}") from e


def check_reference(spec: str, needs_features: bool) -> None:
  """Fails before any sampling when `spec` cannot serve: a missing or unreadable file, an unknown split, no
  `arr_0` for precision / recall."""
  if _dataset_split(spec) is not None:
    return
  if not spec.endswith(".npz"):
    raise ValueError(f"reference {spec!r} is neither an .npz file (ADM's layout) nor dataset:train / dataset:eval")
  if not fs.is_file(spec):
    raise FileNotFoundError(f"no reference batch at {spec!r} (ADM's reference batches, e.g. "
                            "VIRTUAL_imagenet256_labeled.npz, are linked in docs/evaluation.md)")
  keys = _npz_keys(spec)
  if not ("arr_0" in keys or set(_STATS) <= keys):
    raise ValueError(f"reference {spec!r} holds neither images (arr_0) nor mu/sigma/mu_s/sigma_s: its keys are "
                     f"{sorted(keys)}")
  if needs_features and "arr_0" not in keys:
    raise ValueError(f"precision/recall need reference images (arr_0), and {spec!r} only holds statistics")


# --- The cache --------------------------------------------------------------------------------------------

def _cache_path(cache_dir: str, label: str, identity: dict) -> str:
  """`<label>-<hash of identity>.npz`: the label for people, the hash for everything else it depends on."""
  digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
  return fs.join(cache_dir, f"{label}-{digest}.npz")


def _cached(cache_dir: str, label: str, identity: dict, compute) -> dict[str, np.ndarray]:
  """The arrays cached under (label, identity), or `compute()`'s, cached for the next call."""
  path = _cache_path(cache_dir, label, identity)
  if fs.exists(path):
    return fs.load_npz(path)
  arrays = compute()
  _store(path, identity, arrays)
  return arrays


def _store(path: str, identity: dict, arrays: dict[str, np.ndarray]) -> None:
  if jax.process_index() == 0:  # every process computes, one writes
    fs.save_npz(path, **arrays)
    fs.write_json(path[:-len(".npz")] + ".json", identity)


def _statistics(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  mu, sigma = feature_statistics(features["pool"])
  mu_s, sigma_s = feature_statistics(features["spatial"])
  return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


# --- dataset:SPLIT ----------------------------------------------------------------------------------------

class _Subset:
  """`source[indices[i]]` as a random-access source: the only images a dataset reference reads."""

  def __init__(self, source, indices: np.ndarray):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return self._source[int(self._indices[i])]


def _eval_crop(example: dict[str, np.ndarray], *, image_size: int, resize_to: int) -> np.ndarray:
  """uint8 `[S, S, 3]`, the image `make_eval_batches` serves (before its scaling to [-1, 1])."""
  return preprocess.center_crop(preprocess.resize_shorter_side(example["image"], resize_to), image_size)


def _read_images(source, indices: np.ndarray, data_config: ml_collections.ConfigDict, batch_size: int):
  """uint8 batches `[b <= batch_size, S, S, 3]` of `source[indices]`, in order, read by a few threads."""
  crop = functools.partial(_eval_crop, image_size=data_config.image_size, resize_to=source_lib.resize_size(data_config))
  dataset = grain.MapDataset.source(_Subset(source, indices)).map(crop)
  options = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=2 * batch_size)
  return iter(dataset.to_iter_dataset(options).batch(batch_size))


def _dataset_reference(spec: str, split: str, draw: ReferenceDraw, *, extractor: InceptionFeatures,
                       weights_id: str, cache_dir: str, data_config: ml_collections.ConfigDict,
                       needs_features: bool, needs_statistics: bool) -> Reference:
  source = source_lib.build_source(data_config, split)
  num_items = len(source)
  pr_count, stats_count = min(draw.pr_size, num_items), min(draw.stats_size, num_items)
  if jax.process_index() == 0 and num_items < max(draw.pr_size, draw.stats_size):
    print(f"reference {spec}: the split holds {num_items} images, fewer than asked for (precision/recall "
          f"{draw.pr_size}, statistics {draw.stats_size}): using {pr_count} and {stats_count}", flush=True)
  base = {"dataset": data_config.name, "data_dir": data_config.data_dir, "split": split, "split_size": num_items,
          "image_size": data_config.image_size, "resize_size": data_config.resize_size,
          "eval_fraction": data_config.eval_fraction, "seed": draw.seed, "resize": extractor.resize,
          "weights": weights_id}
  name = f"{data_config.name}-{split}-seed{draw.seed}-{extractor.resize}"
  wanted = {}  # kind -> (images, cache path, identity)
  if needs_features:
    identity = dict(base, kind="pool", images=pr_count)
    wanted["pool"] = (pr_count, _cache_path(cache_dir, f"{name}-pool{pr_count}", identity), identity)
  if needs_statistics:
    identity = dict(base, kind="statistics", images=stats_count)
    wanted["stats"] = (stats_count, _cache_path(cache_dir, f"{name}-stats{stats_count}", identity), identity)
  found = {kind: fs.load_npz(path) for kind, (_, path, _) in wanted.items() if fs.exists(path)}
  missing = {kind: entry for kind, entry in wanted.items() if kind not in found}
  if missing:  # the drawn sets are nested: one pass over the largest missing one serves them all
    count = max(images for images, _, _ in missing.values())
    indices = draw_indices(num_items, count, draw.seed)
    features = extractor.extract(_read_images(source, indices, data_config, extractor.batch_size), total=count,
                                 desc=f"reference {spec} ({count} images)")
    for kind, (images, path, identity) in missing.items():
      head = {k: v[:images] for k, v in features.items()}
      found[kind] = {"pool": head["pool"]} if kind == "pool" else _statistics(head)
      _store(path, identity, found[kind])
  return Reference(spec, pool=found.get("pool", {}).get("pool"), **found.get("stats", {}))


# --- ADM's .npz -------------------------------------------------------------------------------------------

def _npz_reference(spec: str, *, extractor: InceptionFeatures | None, weights_id: str, cache_dir: str,
                   needs_features: bool, needs_statistics: bool) -> Reference:
  keys = _npz_keys(spec)
  stored = {}
  if needs_statistics and set(_STATS) <= keys:
    with fs.as_path(spec).open("rb") as f, np.load(f) as archive:
      stored = {k: archive[k] for k in _STATS}
  if not needs_features and (stored or not needs_statistics):
    return Reference(spec, **stored)
  stat = fs.as_path(spec).stat()  # check_reference made sure the file holds images (arr_0) when we get here
  identity = {"resize": extractor.resize, "weights": weights_id, "file": str(fs.as_path(spec)),
              "size": stat.length, "mtime": int(stat.mtime)}

  def compute():
    with fs.as_path(spec).open("rb") as f, np.load(f) as archive:
      images = archive["arr_0"]
    features = extractor(images, desc=f"reference {fs.basename(spec)}")
    return {"pool": features["pool"], **_statistics(features)}

  label = f"{fs.basename(spec)[:-len('.npz')]}-{extractor.resize}"
  cached = _cached(cache_dir, label, identity, compute)
  reference = Reference(spec, **cached)
  for key, value in stored.items():  # stored statistics win, as in ADM's evaluator
    setattr(reference, key, value)
  return reference


def load_reference(spec: str, *, extractor: InceptionFeatures | None, weights_id: str, cache_dir: str,
                   data_config: ml_collections.ConfigDict | None, needs_features: bool,
                   needs_statistics: bool = True, draw: ReferenceDraw = ReferenceDraw()) -> Reference:
  """The reference `spec` names (see the module docstring), with `pool` when `needs_features` (precision /
  recall) and the statistics when `needs_statistics` (FID / sFID); Inception runs only where needed."""
  check_reference(spec, needs_features)
  split = _dataset_split(spec)
  if split is not None:
    return _dataset_reference(spec, split, draw, extractor=extractor, weights_id=weights_id, cache_dir=cache_dir,
                              data_config=data_config, needs_features=needs_features,
                              needs_statistics=needs_statistics)
  return _npz_reference(spec, extractor=extractor, weights_id=weights_id, cache_dir=cache_dir,
                        needs_features=needs_features, needs_statistics=needs_statistics)
