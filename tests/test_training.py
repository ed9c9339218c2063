"""Training end to end on the bundled digits: the loss falls, checkpoints resume exactly, configs are checked."""
import functools
import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from conftest import tiny_config
from flowar_jax.commands import train
from flowar_jax.config import config_from_dict, validate_config
from flowar_jax.models.params import flat_params
from flowar_jax.models.registry import build_model
from flowar_jax.runs.checkpointing import Checkpointer
from flowar_jax.runs.loaders import load_params
from flowar_jax.training import loop
from flowar_jax.training.optimizer import decay_mask, flowar_optimizer, warmup_cosine


def read_metrics(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_warmup_cosine_schedule():
  s = warmup_cosine(1e-3, 10, 110, 1e-5)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-5)
  np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-5)
  np.testing.assert_allclose(float(s(60)), 1e-5 + (1e-3 - 1e-5) * 0.5, rtol=1e-4)
  np.testing.assert_allclose(float(s(110)), 1e-5, rtol=1e-4)


def test_lr_scales_with_batch_and_decay_skips_1d_params():
  config = tiny_config()
  config.optimizer.warmup_steps = 0
  _, schedule = flowar_optimizer(config.optimizer, 512, 100)
  np.testing.assert_allclose(float(schedule(0)), config.optimizer.base_lr * 2, rtol=1e-6)
  mask = decay_mask({"bias": np.zeros(3), "kernel": np.zeros((3, 3)), "pos": np.zeros((1, 4, 3))})
  assert mask == {"bias": False, "kernel": True, "pos": True}


def test_losses_fall_on_digits(trained):
  _, workdir, _ = trained
  # The flow-matching loss has a high floor (the noise it cannot predict), so it falls by less.
  for path, factor in [(os.path.join(workdir, "vae", "metrics.jsonl"), 0.8),
                       (os.path.join(workdir, "metrics.jsonl"), 0.95)]:
    losses = [r["loss"] for r in read_metrics(path) if "loss" in r]
    assert len(losses) == 40
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < factor * first, (path, first, last)


def test_logged_metrics_include_throughput(trained):
  _, workdir, _ = trained
  rates = [r["images_per_s"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  assert len(rates) == 40 and all(rate > 0 for rate in rates)


def test_periodic_actions_run_on_schedule():
  runs = loop.Periodic(every=5, action=lambda step, state: None)
  assert [s for s in range(1, 13) if runs.due(s, last_step=12)] == [5, 10, 12]
  assert not any(loop.Periodic(every=0, action=print).due(s, 12) for s in range(1, 13))


def test_training_writes_samples_and_digit_accuracy(trained):
  config, workdir, report = trained
  with np.load(os.path.join(workdir, "samples", "samples.npz")) as f:
    images, labels = f["images"], f["labels"]
  assert images.shape == (config.sampling.num_samples, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(config.sampling.num_samples) % 10)
  assert os.path.exists(os.path.join(workdir, "samples", "grid.png"))
  assert 0.0 <= report["digit_accuracy_samples"] <= 1.0
  assert report["digit_accuracy_real_heldout"] > 0.9


def test_checkpoint_stores_config_and_iterator(trained):
  config, workdir, _ = trained
  with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    assert ckpt.latest_step() == 40
    stored = config_from_dict(ckpt.restore_config().to_dict())
  assert stored.model.scales == config.model.scales and stored.num_train_steps == 40


def test_resume_continues_the_same_run(trained, tmp_path):
  """Drop the last checkpoint and train again: resuming from step 20 reproduces step 40 exactly."""
  config, workdir, _ = trained
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints", "40"))
  resumed = config_from_dict(config.to_dict())
  resumed.stage = "flowar"
  resumed.vae_checkpoint = os.path.join(workdir, "vae")
  resumed.sampling.num_samples = 2
  train.run(resumed, copy)
  a = flat_params(load_params(functools.partial(build_model, config), os.path.join(workdir, "checkpoints"),
                              use_ema=False))
  b = flat_params(load_params(functools.partial(build_model, config), os.path.join(copy, "checkpoints"),
                              use_ema=False))
  for name in a:
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


@pytest.mark.parametrize("key,value,match", [
    ("model.scales", (1, 2, 8), "latent side 4"),
    ("model.num_heads", 3, "num_heads 3 does not divide"),
    ("data.name", "cifar", "data.name"),
    ("model.head.variant", "v3", "model.head.variant"),
    ("batch_size", 0, "batch_size"),
    ("sampling.cfg", -1.0, "sampling.cfg"),
    ("model.scales", (2, 1, 4), "strictly increasing"),
    ("max_consecutive_nonfinite_steps", 0, "config.max_consecutive_nonfinite_steps must be >= 1"),
    ("keep_checkpoints", 0, "config.keep_checkpoints must be >= 1"),
])
def test_validation_names_the_field(key, value, match):
  config = tiny_config()
  target = config
  *parents, leaf = key.split(".")
  for p in parents:
    target = target[p]
  target[leaf] = value
  with pytest.raises(ValueError, match=match):
    validate_config(config)


def test_unknown_keys_are_rejected():
  with pytest.raises(AttributeError, match="widht"):
    tiny_config().model.widht = 3  # pylint: disable=attribute-defined-outside-init
  with pytest.raises(KeyError, match="unknown config key 'model.widht'"):
    config_from_dict({"model": {"widht": 3}})


def test_batch_must_divide_devices():
  with pytest.raises(ValueError, match="not divisible by the 3 devices"):
    validate_config(tiny_config(), num_devices=3)
