"""`evaluate`: FID, sFID, IS, precision / recall (and the digits metric) of a trained FlowAR checkpoint, or the
text-image alignment of a text-conditional one.

  python -m flowar_jax evaluate --workdir DIR [--config CONFIG] [--num_samples 50000] [--reference REF]
  python -m flowar_jax evaluate --workdir runs/digits_text --metrics alignment

Writes WORKDIR/eval/<settings>/ (see `flowar_jax.evaluation.runner`); rerunning the same command after an
interruption continues from the last saved shard. Everything a metric needs (weights, reference) is
checked before the first sample is drawn. Alignment (`flowar_jax.evaluation.alignment`) samples one image per
prompt, half held-out combinations and half seen ones, and reports both beside the real compositions' score.
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
from flowar_jax.sampling.prompts import PromptSampler, generate_from_prompts, load_prompt_sampler, require_text
from flowar_jax.sampling.sampler import SamplingSettings

ALIGNMENT = "alignment"


def eval_dir(workdir: str, name: str) -> str:
  return fs.join(workdir, "eval", name)


def alignment_evaluation(sampler: PromptSampler, *, num_samples: int, seed: int, batch_size: int,
                         image_size: int, eval_fraction: float = 0.1) -> dict[str, float]:
  """Samples `num_samples` images from `alignment.eval_prompts` (held-out and seen combinations in turn) ->
  `alignment.alignment_report`: the samples' scores (all, seen, held-out, per relation) and the real
  compositions' (`alignment_real*`) at the same image size."""
  from flowar_jax.evaluation import alignment  # pylint: disable=g-import-not-at-top  (fits the digits classifier)
  prompts, slots = alignment.eval_prompts(num_samples)
  images = generate_from_prompts(sampler, prompts, seed=seed, batch_size=batch_size)
  if images.shape[1] != image_size:
    raise ValueError(f"samples are {images.shape[1]}px but config.data.image_size is {image_size}")
  return alignment.alignment_report(images, slots, eval_fraction)


def run_alignment(config: ml_collections.ConfigDict, workdir: str, *, num_samples: int, seed: int,
                  settings: SamplingSettings, batch_size: int, use_ema: bool = True) -> dict:
  """`evaluate --metrics alignment`: a text run's alignment -> WORKDIR/eval/alignment_<settings>/report.json."""
  require_text(config, "--metrics alignment")
  with Checkpointer(checkpoint_dir(workdir)) as checkpointer:
    step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"no model checkpoint in {checkpoint_dir(workdir)!r}: train one first")
  sampler = load_prompt_sampler(config, workdir, settings, use_ema)
  metrics = alignment_evaluation(sampler, num_samples=num_samples, seed=seed, batch_size=batch_size,
                                 image_size=config.data.image_size, eval_fraction=config.data.eval_fraction)
  name = f"{ALIGNMENT}_step{step}_n{num_samples}_seed{seed}_cfg{settings.cfg:g}_{'ema' if use_ema else 'raw'}"
  report = {"step": step, "num_samples": num_samples, "seed": seed, "cfg": settings.cfg, "metrics": metrics}
  if jax.process_index() == 0:
    path = fs.join(eval_dir(workdir, name), "report.json")
    fs.write_json(path, report)
    keys = [k for k in ("alignment", "alignment_seen", "alignment_heldout", "alignment_real",
                        "alignment_real_seen", "alignment_real_heldout") if k in metrics]
    print(f"evaluate step {step}, {num_samples} samples: "
          + ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) + f"\nwrote {path}", flush=True)
  return report


def run(config: ml_collections.ConfigDict, workdir: str, *, num_samples: int, seed: int,
        settings: SamplingSettings, batch_size: int, use_ema: bool = True, metrics=None,
        reference: str | None = None, inception_weights: str | None = None) -> dict:
  """Evaluates WORKDIR's latest generator checkpoint (FlowAR, VAR or HART); returns the report (also in
  WORKDIR/eval/<name>/report.json)."""
  validate_config(config, jax.device_count())
  metrics = tuple(metrics or config.eval.metrics)
  if ALIGNMENT in metrics:
    if len(metrics) > 1:
      raise ValueError(f"--metrics alignment runs alone (it samples from prompts), got {','.join(metrics)}")
    return run_alignment(config, workdir, num_samples=num_samples, seed=seed, settings=settings,
                         batch_size=batch_size, use_ema=use_ema)
  setup = suite.prepare(config, metrics=metrics, reference=reference,
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
