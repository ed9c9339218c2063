"""Two seeds of a shrunken digits run, a few steps each: a sweep that finishes in about a minute on a CPU
(a smoke test of the sweep machinery, not a study; the second point reuses the first one's compiled
programs through the sweep's compilation cache).

  python launch/sweep.py configs/sweeps/digits_tiny.py --workdir runs/digits_tiny
"""
from flowar_jax.sweeps import Sweep


def get_sweep():
  return Sweep(
      config="configs/digits.py",
      grid={"seed": [0, 1]},
      fixed={
          "num_train_steps": 6, "vae.train.num_train_steps": 6, "checkpoint_every_steps": 6,
          "log_every_steps": 2, "batch_size": 16, "vae.train.batch_size": 16,
          "model.width": 64, "model.depth": 1, "model.head.depth": 1, "model.head.width": 64,
          "data.cache_latents": False, "vae.latent_scale": 1.0,  # no encoding pass, no measuring
          "sample_every_steps": 0, "sampling.num_samples": 10, "sampling.batch_size": 10,
          "sampling.num_steps": 2,
      })
