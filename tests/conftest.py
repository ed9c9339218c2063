"""Shared fixtures: tiny configs that build and run in seconds on a CPU."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from flowar_jax.config import base_config  # noqa: E402


def tiny_config(variant: str = "v1"):
  """A FlowAR + VAE config of a few thousand parameters on 16x16 digits (latent 4x4, scales 1, 2, 4)."""
  c = base_config()
  c.batch_size = 8
  c.num_train_steps = 4
  c.checkpoint_every_steps = 2
  c.log_every_steps = 1
  c.stage = "both"
  c.data.name = "digits"
  c.data.image_size = 16
  c.data.resize_size = 0
  c.data.random_crop = False
  c.data.random_flip = False
  c.vae.base_channels = 8
  c.vae.channel_multipliers = (1, 2, 2)
  c.vae.encoder_blocks = 1
  c.vae.decoder_blocks = 1
  c.vae.latent_channels = 4
  c.vae.norm_groups = 4
  c.vae.latent_scale = 1.0
  c.vae.train.batch_size = 8
  c.vae.train.num_train_steps = 3
  c.vae.train.warmup_steps = 1
  c.vae.train.learning_rate = 2e-3
  c.model.scales = (1, 2, 4)
  c.model.width = 32
  c.model.depth = 1
  c.model.num_heads = 2
  c.model.num_classes = 10
  c.model.head.variant = variant
  c.model.head.width = 32
  c.model.head.depth = 1
  c.model.head.head_dim = 16
  c.optimizer.base_lr = 1e-2
  c.optimizer.warmup_steps = 1
  c.optimizer.ema_decay = 0.9
  c.sampling.cfg = 2.0
  c.sampling.num_steps = 4
  c.sampling.num_samples = 10
  c.sampling.batch_size = 10
  return c


@pytest.fixture
def tiny():
  return tiny_config()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """VAE (40 steps) then FlowAR (40 steps, sample grids at 20 and 40) on real digits with the tiny config,
  once per test session.

  Returns (config, workdir, report); tests must not modify the workdir (copy it first).
  """
  from flowar_jax.commands import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config()
  config.vae.train.num_train_steps = 40
  config.num_train_steps = 40
  config.checkpoint_every_steps = 20
  config.batch_size = 16
  config.vae.train.batch_size = 16
  config.data.cache_latents = True
  config.sample_every_steps = 20
  report = train.run(config, workdir)
  return config, workdir, report
