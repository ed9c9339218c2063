"""`train`: the tokenizer stage, the generator stage, or both, then samples from the result."""
from __future__ import annotations

import json

import jax
import ml_collections

from flowar_jax.config import trains_generator, trains_tokenizer, validate_config
from flowar_jax.config_text import is_text
from flowar_jax.parallel.mesh import job_slices
from flowar_jax.runs import fs
from flowar_jax.runs.workdir import REPORT_FILE, vae_dir
from flowar_jax.sampling.generate import sample_to_workdir, settings_from
from flowar_jax.sampling.prompts import sample_prompts_to_workdir
from flowar_jax.training.generator_stage import train_generator
from flowar_jax.training.resume_check import check_config_matches_checkpoints
from flowar_jax.training.vae_stage import train_vae


def _sample_prompts(config: ml_collections.ConfigDict, workdir: str) -> None:
  """After a text run on the composed digits: samples for held-out and seen captions -> WORKDIR/samples/."""
  if config.data.name != "digits_text":
    return  # a captioned folder has no prompts of its own: `sample --prompt` draws from the run
  from flowar_jax.evaluation.alignment import eval_prompts  # pylint: disable=g-import-not-at-top
  prompts, _ = eval_prompts(8)
  sample_prompts_to_workdir(config, workdir, prompts, num_samples=max(1, config.sampling.num_samples // 8),
                            seed=config.seed, settings=settings_from(config), batch_size=config.sampling.batch_size,
                            use_ema=config.sampling.use_ema)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains what `config.stage` names in WORKDIR; returns a small report (e.g. the digits metric), also
  written to WORKDIR/report.json once everything is done."""
  validate_config(config, jax.device_count(), job_slices(config.mesh, jax.devices()))
  check_config_matches_checkpoints(config, workdir)
  report = {}
  if trains_tokenizer(config):
    if config.model.name == "flowar":
      train_vae(config, vae_dir(config, workdir))
    else:
      from flowar_jax.training.vq_stage import train_vq  # pylint: disable=g-import-not-at-top
      train_vq(config, vae_dir(config, workdir))
  if trains_generator(config) and is_text(config):
    train_generator(config, workdir)
    _sample_prompts(config, workdir)
  elif trains_generator(config):
    train_generator(config, workdir)
    images, labels = sample_to_workdir(config, workdir, num_samples=config.sampling.num_samples,
                                       seed=config.seed, settings=settings_from(config),
                                       batch_size=config.sampling.batch_size, use_ema=config.sampling.use_ema)
    if config.data.name == "digits":
      from flowar_jax.evaluation.digits import digits_metrics, real_heldout_metrics  # pylint: disable=g-import-not-at-top
      samples = digits_metrics(images, labels, config.data.eval_fraction)
      real = real_heldout_metrics(config.data.image_size, config.data.eval_fraction)
      report.update(digit_accuracy_samples=samples["digits_accuracy"], digit_fd_samples=samples["digits_fd"],
                    digit_accuracy_real_heldout=real["digits_accuracy"], digit_fd_real_heldout=real["digits_fd"])
      if jax.process_index() == 0:
        print(f"digits metric: samples accuracy {samples['digits_accuracy']:.3f}, FD {samples['digits_fd']:.3g} "
              f"(real held-out digits: accuracy {real['digits_accuracy']:.3f}, FD {real['digits_fd']:.3g})",
              flush=True)
  if jax.process_index() == 0:
    fs.write_text(fs.join(workdir, REPORT_FILE), json.dumps(report, indent=1) + "\n")
  return report
