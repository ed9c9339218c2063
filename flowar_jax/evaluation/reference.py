"""Reference statistics for FID / sFID and reference features for precision / recall.

A reference is named by a string (config `eval.reference`, flag `--reference`):
  PATH.npz        ADM's layout, e.g. VIRTUAL_imagenet256_labeled.npz: `mu`, `sigma` (pool3) and `mu_s`,
                  `sigma_s` (spatial) when precomputed, and/or `arr_0`, uint8 reference images [N, H, W, 3].
                  As in ADM's evaluator, stored statistics are used when present; features of `arr_0` are
                  computed for precision / recall (and for statistics the file lacks).
  dataset:train   the config's dataset, one split, center-cropped at the training size (`make_eval_batches`)
  dataset:eval
Computed features are cached in `cache_dir` under a key that names the source, the resize mode and the
Inception weights, so the reference costs one pass per workdir.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import ml_collections
import numpy as np

from flowar_jax import data
from flowar_jax.evaluation.features import InceptionFeatures
from flowar_jax.evaluation.frechet import feature_statistics
from flowar_jax.evaluation.sample_store import atomic_savez

DATASET_PREFIX = "dataset:"
_STATS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclasses.dataclass
class Reference:
  """mu `[2048]`, sigma `[2048, 2048]`, mu_s `[2023]`, sigma_s `[2023, 2023]`; pool `[N, 2048]` for P/R."""

  name: str
  mu: np.ndarray | None = None
  sigma: np.ndarray | None = None
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  pool: np.ndarray | None = None


def check_reference(spec: str, needs_features: bool) -> None:
  """Fails before any sampling when `spec` cannot serve: a missing file, an unknown split, no `arr_0` for
  precision / recall."""
  if spec.startswith(DATASET_PREFIX):
    split = spec[len(DATASET_PREFIX):]
    if split not in ("train", "eval"):
      raise ValueError(f"reference {spec!r}: the dataset split must be 'train' or 'eval'")
    return
  if not spec.endswith(".npz"):
    raise ValueError(f"reference {spec!r} is neither an .npz file (ADM's layout) nor dataset:train / dataset:eval")
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"no reference batch at {spec!r} (ADM's reference batches, e.g. "
                            "VIRTUAL_imagenet256_labeled.npz, are linked in docs/evaluation.md)")
  with np.load(spec) as f:
    keys = set(f.files)
  if not ("arr_0" in keys or set(_STATS) <= keys):
    raise ValueError(f"reference {spec!r} holds neither images (arr_0) nor mu/sigma/mu_s/sigma_s: its keys are "
                     f"{sorted(keys)}")
  if needs_features and "arr_0" not in keys:
    raise ValueError(f"precision/recall need reference images (arr_0), and {spec!r} only holds statistics")


def _cache_path(cache_dir: str, identity: dict) -> str:
  digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
  return os.path.join(cache_dir, f"reference_{digest}.npz")


def _features_cached(cache_dir: str, identity: dict, compute) -> dict[str, np.ndarray]:
  """{'pool', 'spatial'} features from the cache, or computed and cached."""
  path = _cache_path(cache_dir, identity)
  if os.path.isfile(path):
    with np.load(path) as f:
      return {"pool": f["pool"], "spatial": f["spatial"]}
  features = compute()
  if jax.process_index() == 0:  # every process computes, one writes
    os.makedirs(cache_dir, exist_ok=True)
    atomic_savez(path, pool=features["pool"], spatial=features["spatial"])
    with open(path[:-len(".npz")] + ".json", "w") as f:
      json.dump(identity, f, indent=1)
  return features


def _dataset_batches(data_config: ml_collections.ConfigDict, split: str, batch_size: int):
  for batch in data.make_eval_batches(data_config, batch_size, split):
    images = np.clip(np.rint((batch["image"] + 1.0) * 127.5), 0, 255).astype(np.uint8)
    yield images[batch["mask"]]


def load_reference(spec: str, *, extractor: InceptionFeatures | None, weights_id: str, cache_dir: str,
                   data_config: ml_collections.ConfigDict | None, needs_features: bool) -> Reference:
  """The reference `spec` names (see the module docstring); Inception features only where needed."""
  check_reference(spec, needs_features)
  if spec.startswith(DATASET_PREFIX):
    split = spec[len(DATASET_PREFIX):]
    identity = {"resize": extractor.resize, "weights": weights_id, "dataset": data_config.name,
                "data_dir": data_config.data_dir, "split": split, "image_size": data_config.image_size,
                "resize_size": data_config.resize_size, "eval_fraction": data_config.eval_fraction}
    features = _features_cached(cache_dir, identity, lambda: extractor.extract(
        _dataset_batches(data_config, split, extractor.batch_size),
        total=len(data.build_source(data_config, split)), desc=f"reference {spec}"))
    return _from_features(spec, features)
  with np.load(spec) as f:
    stored = {k: f[k] for k in _STATS if k in f.files}
  if set(_STATS) <= set(stored) and not needs_features:
    return Reference(spec, **stored)
  stat = os.stat(spec)  # check_reference made sure the file holds images (arr_0) when we get here
  identity = {"resize": extractor.resize, "weights": weights_id, "file": os.path.abspath(spec),
              "size": stat.st_size, "mtime": int(stat.st_mtime)}

  def compute():
    with np.load(spec) as f:
      images = f["arr_0"]
    return extractor(images, desc=f"reference {os.path.basename(spec)}")

  reference = _from_features(spec, _features_cached(cache_dir, identity, compute))
  for key, value in stored.items():  # stored statistics win, as in ADM's evaluator
    setattr(reference, key, value)
  return reference


def _from_features(name: str, features: dict[str, np.ndarray]) -> Reference:
  mu, sigma = feature_statistics(features["pool"])
  mu_s, sigma_s = feature_statistics(features["spatial"])
  return Reference(name, mu, sigma, mu_s, sigma_s, features["pool"])
