"""Shared fixtures: tiny configs that build and run in seconds on a CPU."""
from __future__ import annotations

import contextlib
import os
import shutil

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


def trained_config():
  """The config of the `trained` run: the tiny config, 40 VAE and 40 FlowAR steps, checkpoints and sample
  grids every 20."""
  config = tiny_config()
  config.vae.train.num_train_steps = 40
  config.num_train_steps = 40
  config.checkpoint_every_steps = 20
  config.batch_size = 16
  config.vae.train.batch_size = 16
  config.data.cache_latents = True
  config.sample_every_steps = 20
  return config


@pytest.fixture(scope="session")
def compilation_cache_dir(tmp_path_factory) -> str:
  """A JAX compilation cache shared within the session: the programs the `trained` run compiles are loaded,
  not compiled again, by command-line tests that run the same config in a subprocess."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def compilation_cache_env(directory: str) -> dict[str, str]:
  """Environment variables that make a subprocess read and write the compilation cache in `directory`."""
  return {"JAX_COMPILATION_CACHE_DIR": directory, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@contextlib.contextmanager
def persistent_compilation_cache(directory: str):
  """Within the block, this process also writes every program it compiles to `directory`."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  settings = {"jax_compilation_cache_dir": directory, "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  previous = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # the cache is set up at the first compile; make it see the new directory
  try:
    yield
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def trained(tmp_path_factory, compilation_cache_dir):
  """VAE (40 steps) then FlowAR (40 steps) on real digits with `trained_config()`, once per test session.

  Returns (config, workdir, report); tests must not modify the workdir (copy it first).
  """
  from flowar_jax.commands import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("run"))
  config = trained_config()
  with persistent_compilation_cache(compilation_cache_dir):
    report = train.run(config, workdir)
  return config, workdir, report


def tiny_text_config():
  """The tiny config made text-conditional: composed digits at 16x16 with captions, a randomly initialised
  MiniLM (the bundled tokenizer), 3 VAE and 4 FlowAR steps on cached latents (as configs/digits_text.py)."""
  from flowar_jax.config_text import add_text_section  # pylint: disable=g-import-not-at-top
  c = add_text_section(tiny_config(), "minilm")
  c.text.weights = "random"
  c.text.max_length = 16
  c.data.name = "digits_text"
  c.data.cache_latents = True
  c.sampling.num_samples = c.sampling.batch_size = 8
  return c


def built_once(tmp_path_factory, name: str, build) -> str:
  """The directory NAME that `build(directory)` fills once per test session: under pytest-xdist the first
  worker to ask builds it while the others wait, then all read it (a session fixture is otherwise built once
  per worker)."""
  import filelock  # pylint: disable=g-import-not-at-top
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    directory = str(tmp_path_factory.mktemp(name))
    build(directory)
    return directory
  root = tmp_path_factory.getbasetemp().parent  # the workers' base directories sit side by side in it
  directory, done = root / name, root / f"{name}.done"
  with filelock.FileLock(str(root / f"{name}.lock")):
    if not done.exists():
      shutil.rmtree(directory, ignore_errors=True)  # what a failed build left
      build(str(directory))
      done.touch()
  return str(directory)


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
  """`tiny_text_config()` trained end to end by `train` (VAE, latent and text caches, FlowAR, samples from
  captions), once per session. Returns (config, workdir); tests must not modify the workdir."""
  from flowar_jax.commands import train  # pylint: disable=g-import-not-at-top
  config = tiny_text_config()
  workdir = built_once(tmp_path_factory, "text_run", lambda directory: train.run(config, directory))
  return config, workdir
