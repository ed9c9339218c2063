"""`train`: the VAE stage, the FlowAR stage, or both, then samples from the result."""
from __future__ import annotations

import jax
import ml_collections

from flowar_jax.commands.sample import sample_to_workdir, settings_from
from flowar_jax.config import validate_config
from flowar_jax.parallel.mesh import job_slices
from flowar_jax.training.flowar_stage import train_flowar
from flowar_jax.training.vae_stage import train_vae
from flowar_jax.training.workdir import vae_dir


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains what `config.stage` names in WORKDIR; returns a small report (e.g. the digits accuracy)."""
  validate_config(config, jax.device_count(), job_slices(config.mesh, jax.devices()))
  report = {}
  if config.stage in ("vae", "both"):
    train_vae(config, vae_dir(config, workdir))
  if config.stage in ("flowar", "both"):
    train_flowar(config, workdir)
    images, labels = sample_to_workdir(config, workdir, num_samples=config.sampling.num_samples,
                                       seed=config.seed, settings=settings_from(config),
                                       batch_size=config.sampling.batch_size, use_ema=config.sampling.use_ema)
    if config.data.name == "digits":
      from flowar_jax.evaluation.digits import digit_accuracy, real_digit_accuracy  # pylint: disable=g-import-not-at-top
      report["digit_accuracy_samples"] = digit_accuracy(images, labels)
      report["digit_accuracy_real_heldout"] = real_digit_accuracy()
      if jax.process_index() == 0:
        print(f"digit classifier accuracy: samples {report['digit_accuracy_samples']:.3f} "
              f"(real held-out digits {report['digit_accuracy_real_heldout']:.3f})", flush=True)
  return report
