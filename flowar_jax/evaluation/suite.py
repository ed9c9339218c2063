"""One call from generated images to every requested metric: the Inception suite and the digits metric."""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from flowar_jax.evaluation.features import InceptionFeatures
from flowar_jax.evaluation.frechet import frechet_distance_to_features
from flowar_jax.evaluation.inception_input import check_resize_mode
from flowar_jax.evaluation.inception_weights import file_digest, find_weights, load_inception
from flowar_jax.evaluation.metrics import inception_score, precision_recall
from flowar_jax.evaluation.reference import DATASET_PREFIX, Reference, ReferenceDraw, check_reference, load_reference
from flowar_jax.runs import fs

INCEPTION_METRICS = ("fid", "sfid", "is", "precision", "recall")
METRICS = INCEPTION_METRICS + ("digits",)


@dataclasses.dataclass(frozen=True)
class EvalSetup:
  """What an evaluation needs besides the images, resolved and checked before any sampling."""

  metrics: tuple[str, ...]
  reference: str = ""
  weights: str = ""  # the Inception weights file (resolved), '' when no Inception metric is asked for
  resize: str = "adm"
  inception_batch_size: int = 200
  cache_dir: str = ""
  draw: ReferenceDraw = ReferenceDraw()  # which images a dataset:SPLIT reference uses

  @property
  def inception_metrics(self) -> tuple[str, ...]:
    return tuple(m for m in self.metrics if m in INCEPTION_METRICS)

  def describe(self) -> dict:
    out = {"metrics": list(self.metrics)}
    if self.inception_metrics:
      out.update(reference=self.reference, inception_weights=self.weights,
                 inception_weights_sha256=file_digest(self.weights), resize=self.resize)
      if self.reference.startswith(DATASET_PREFIX):
        out["reference_draw"] = dataclasses.asdict(self.draw)
    return out


def prepare(config: ml_collections.ConfigDict, *, metrics, reference: str | None = None,
            inception_weights: str | None = None, cache_dir: str) -> EvalSetup:
  """Checks the metric names, the data they need and the files (weights, reference) up front."""
  metrics = tuple(dict.fromkeys(metrics))
  unknown = [m for m in metrics if m not in METRICS]
  if unknown or not metrics:
    raise ValueError(f"unknown metrics {unknown or '(none given)'}; choose from {', '.join(METRICS)}")
  if "digits" in metrics and config.data.name != "digits":
    raise ValueError(f"the 'digits' metric scores the bundled digits; this config's data is {config.data.name!r}")
  draw = ReferenceDraw(pr_size=config.eval.reference_size, stats_size=config.eval.reference_stats_size,
                       seed=config.eval.reference_seed)
  setup = EvalSetup(metrics, resize=config.eval.resize, inception_batch_size=config.eval.inception_batch_size,
                    cache_dir=cache_dir, draw=draw)
  if not setup.inception_metrics:
    return setup
  check_resize_mode(config.eval.resize)
  reference = reference or config.eval.reference
  check_reference(reference, needs_features=any(m in metrics for m in ("precision", "recall")))
  weights = find_weights(inception_weights if inception_weights is not None else config.eval.inception_weights)
  return dataclasses.replace(setup, reference=reference, weights=weights)


def compute_metrics(images: np.ndarray, labels: np.ndarray, setup: EvalSetup,
                    config: ml_collections.ConfigDict) -> dict[str, float]:
  """uint8 images `[N, H, W, 3]` and the labels they were sampled for `[N]` -> {metric: value}."""
  out = {}
  if "digits" in setup.metrics:
    from flowar_jax.evaluation.digits import digits_metrics  # pylint: disable=g-import-not-at-top
    out.update(digits_metrics(images, labels, config.data.eval_fraction))
  if not setup.inception_metrics:
    return out
  model, _ = load_inception(setup.weights)
  extractor = InceptionFeatures(model, resize=setup.resize, batch_size=setup.inception_batch_size)
  features = extractor(images, desc="inception (samples)")
  wants = set(setup.metrics)
  reference = Reference("")
  if wants & {"fid", "sfid", "precision", "recall"}:
    reference = load_reference(setup.reference, extractor=extractor, weights_id=file_digest(setup.weights),
                               cache_dir=setup.cache_dir, data_config=config.data,
                               needs_features=bool(wants & {"precision", "recall"}),
                               needs_statistics=bool(wants & {"fid", "sfid"}), draw=setup.draw)
  if "fid" in wants:
    out["fid"] = frechet_distance_to_features(features["pool"], reference.mu, reference.sigma)
  if "sfid" in wants:
    out["sfid"] = frechet_distance_to_features(features["spatial"], reference.mu_s, reference.sigma_s)
  if "is" in wants:
    out["is"] = inception_score(features["logits_unbiased"])
  if wants & {"precision", "recall"}:
    precision, recall = precision_recall(reference.pool, features["pool"], mesh=extractor.mesh)
    out.update({k: v for k, v in (("precision", precision), ("recall", recall)) if k in wants})
  return out


def default_cache_dir(workdir: str) -> str:
  return fs.join(workdir, "eval", "references")
