"""`evaluate`: FID, sFID, IS, precision / recall (and the digits metric) of a trained FlowAR checkpoint.

  python -m flowar_jax evaluate --workdir DIR [--config CONFIG] [--num_samples 50000] [--reference REF]

Writes WORKDIR/eval/<settings>/ (see `flowar_jax.evaluation.runner`); rerunning the same command after an
interruption continues from the last saved shard. Everything a metric needs (weights, reference) is
checked before the first sample is drawn.
"""
from __future__ import annotations

import jax
import ml_collections

from flowar_jax.config import validate_config
from flowar_jax.evaluation import runner, suite
from flowar_jax.runs import fs
from flowar_jax.runs.checkpointing import Checkpointer
from flowar_jax.runs.workdir import checkpoint_dir
from flowar_jax.sampling.generate import load_image_sampler
from flowar_jax.sampling.sampler import SamplingSettings


def eval_dir(workdir: str, name: str) -> str:
  return fs.join(workdir, "eval", name)


def run(config: ml_collections.ConfigDict, workdir: str, *, num_samples: int, seed: int,
        settings: SamplingSettings, batch_size: int, use_ema: bool = True, metrics=None,
        reference: str | None = None, inception_weights: str | None = None) -> dict:
  """Evaluates WORKDIR's latest generator checkpoint (FlowAR, VAR or HART); returns the report (also in
  WORKDIR/eval/<name>/report.json)."""
  validate_config(config, jax.device_count())
  setup = suite.prepare(config, metrics=metrics or config.eval.metrics, reference=reference,
                        inception_weights=inception_weights, cache_dir=suite.default_cache_dir(workdir))
  with Checkpointer(checkpoint_dir(workdir)) as checkpointer:
    step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"no model checkpoint in {checkpoint_dir(workdir)!r}: train one first")
  plan = runner.SamplingPlan(num_samples=num_samples, num_classes=config.model.num_classes, seed=seed,
                             settings=settings, use_ema=use_ema, checkpoint_step=step)
  directory = eval_dir(workdir, plan.name)
  sampler = load_image_sampler(config, workdir, settings, use_ema)
  report = runner.evaluate_sampler(sampler, plan, setup, config, directory, batch_size=batch_size)
  if jax.process_index() == 0:
    line = f"evaluate step {step}, {num_samples} samples: {runner.format_metrics(report['metrics'])}"
    if "digits_real_heldout" in report:
      line += f"\nreal held-out digits: {runner.format_metrics(report['digits_real_heldout'])}"
    if "digits_samples_at_heldout_size" in report:
      line += (f"; the first {report['digits_samples_at_heldout_size']['num_images']} samples: "
               f"{runner.format_metrics(report['digits_samples_at_heldout_size'])}")
    print(line + f"\nwrote {fs.join(directory, 'report.json')}", flush=True)
  return report
