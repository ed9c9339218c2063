"""A resumable evaluation: sample with pinned seeds and labels, save shards as they come, score, report.

Layout of one evaluation, WORKDIR/eval/<name>/ (local or gs://; the name spells out every sampling setting):
  sampling.json                 the settings; a resumed run must match them
  shards/shard_<index>.npz      samples as produced (see `sample_store`)
  samples_<N>x<H>x<W>x3.npz     all samples in ADM's evaluator layout (arr_0 images, arr_1 labels)
  report.json                   every metric and every setting

Sample i has class i % num_classes (equal counts per class when N is a multiple of the class count; else
the first N mod C classes have one more) and noise from (seed, i), so classes are interleaved (each of the
Inception Score's 5000-sample splits sees every class) and a resumed run reproduces the same samples.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import ml_collections
import numpy as np

import flowar_jax
from flowar_jax.evaluation.sample_store import SampleStore, adm_npz_name, export_adm_npz
from flowar_jax.evaluation.suite import EvalSetup, compute_metrics
from flowar_jax.runs import fs
from flowar_jax.runs.progress import Progress
from flowar_jax.heads.categorical import CategoricalSampling
from flowar_jax.models.hart_sampling import HARTSampling
from flowar_jax.sampling.sampler import Sampler, SamplingSettings


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
  """Everything that determines the samples (the batch size doesn't: sample i depends on (seed, i) only)."""

  num_samples: int
  num_classes: int
  seed: int
  settings: SamplingSettings | CategoricalSampling | HARTSampling
  use_ema: bool
  checkpoint_step: int

  def __post_init__(self):
    if self.num_samples < 2:
      raise ValueError(f"an evaluation needs at least 2 samples, got num_samples={self.num_samples}")

  @property
  def name(self) -> str:
    return (f"step{self.checkpoint_step}-n{self.num_samples}-seed{self.seed}-{self._settings_tag()}"
            f"-{'ema' if self.use_ema else 'raw'}")

  def _settings_tag(self) -> str:
    s = self.settings
    if isinstance(s, HARTSampling):  # the residual head's cfg is the categorical one unless it has its own
      cfg = "" if s.residual_cfg is None else f"-rcfg{s.residual_cfg:g}"
      steps = "" if s.residual_steps is None else f"-rsteps{s.residual_steps}"
      temperature = "" if s.residual_temperature == 1.0 else f"-rtemp{s.residual_temperature:g}"
      return self._categorical_tag(s.categorical) + steps + cfg + temperature
    if isinstance(s, CategoricalSampling):
      return self._categorical_tag(s)
    steps = ".".join(str(n) for n in s.scale_steps) if s.scale_steps else s.num_steps
    return f"cfg{s.cfg:g}-guidance{s.guidance:g}-steps{steps}-{s.solver}"

  @staticmethod
  def _categorical_tag(s: CategoricalSampling) -> str:
    return f"cfg{s.cfg:g}-topk{s.top_k}-topp{s.top_p:g}" + ("-smooth" if s.more_smooth else "")

  def _settings_record(self) -> dict:
    s = self.settings
    if isinstance(s, HARTSampling):
      c = s.categorical
      return {"cfg": c.cfg, "top_k": c.top_k, "top_p": c.top_p, "more_smooth": c.more_smooth,
              "residual_steps": s.residual_steps, "residual_cfg": s.residual().cfg,
              "residual_temperature": s.residual_temperature}
    if isinstance(s, CategoricalSampling):
      return {"cfg": s.cfg, "top_k": s.top_k, "top_p": s.top_p, "more_smooth": s.more_smooth}
    record = {"cfg": s.cfg, "guidance": s.guidance, "num_steps": s.num_steps, "solver": s.solver}
    return dict(record, scale_steps=list(s.scale_steps)) if s.scale_steps else record

  def labels(self) -> np.ndarray:
    return (np.arange(self.num_samples) % self.num_classes).astype(np.int32)

  def record(self) -> dict:
    return {"num_samples": self.num_samples, "num_classes": self.num_classes, "seed": self.seed,
            **self._settings_record(), "use_ema": self.use_ema, "checkpoint_step": self.checkpoint_step,
            "labels": "sample i has class i % num_classes", "noise": "sample i draws from fold_in(key(seed), i)"}


def _check_plan(directory: str, plan: SamplingPlan) -> None:
  """Records the plan in a new directory; in an existing one, refuses to mix samples of other settings."""
  path = fs.join(directory, "sampling.json")
  if fs.is_file(path):
    stored = fs.read_json(path)
    differing = {k: (stored.get(k), v) for k, v in plan.record().items() if stored.get(k) != v}
    if differing:
      raise ValueError(f"{directory} holds samples of other settings ({differing}, stored vs asked): "
                       "remove it or evaluate elsewhere")
  elif jax.process_index() == 0:
    fs.write_json(path, plan.record())


def sample_resumably(sampler: Sampler, plan: SamplingPlan, directory: str, batch_size: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """All `plan.num_samples` samples, reusing the shards in `directory` and saving each new batch there."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  _check_plan(directory, plan)
  labels = sampler.check_labels(plan.labels())
  store = SampleStore(fs.join(directory, "shards"))
  done = min(store.count(), plan.num_samples)
  batch_size = min(batch_size, plan.num_samples)
  if done < plan.num_samples:
    progress = Progress(plan.num_samples, initial=done, desc="sample", unit="image")
    for start in range(done, plan.num_samples, batch_size):
      chunk = labels[start:start + batch_size]
      real = len(chunk)
      images = sampler(np.resize(chunk, batch_size), plan.seed, first_index=start)[:real]  # one program
      if jax.process_index() == 0:
        store.write(start, images, chunk)
      progress.update(start + real)
    progress.close()
  return store.load(plan.num_samples)


def evaluate_sampler(sampler: Sampler, plan: SamplingPlan, setup: EvalSetup, config: ml_collections.ConfigDict,
                     directory: str, *, batch_size: int) -> dict:
  """Samples (resuming), writes the ADM-layout npz, computes `setup.metrics`, writes and returns the report."""
  started = time.perf_counter()
  images, labels = sample_resumably(sampler, plan, directory, batch_size)
  sampled = time.perf_counter()
  npz = fs.join(directory, adm_npz_name(images))
  if jax.process_index() == 0:
    export_adm_npz(directory, images, labels)
  metrics = compute_metrics(images, labels, setup, config)
  report = {"metrics": metrics, "sampling": plan.record(), "evaluation": setup.describe(),
            "samples_npz": npz, "image_shape": list(images.shape[1:]),
            "seconds": {"sampling": round(sampled - started, 2),
                        "metrics": round(time.perf_counter() - sampled, 2)},
            "flowar_jax": flowar_jax.__version__}
  if "digits" in setup.metrics:
    from flowar_jax.evaluation.digits import baseline_report  # pylint: disable=g-import-not-at-top
    report.update(baseline_report(images, labels, config.data.eval_fraction))
  if jax.process_index() == 0:
    fs.write_json(fs.join(directory, "report.json"), report)
  return report


def format_metrics(metrics: dict) -> str:
  return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
