"""Bad configs fail before any compute, with errors that name the field (library and command line)."""
from __future__ import annotations

import os
import shutil

import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from flowar_jax.commands.flag_errors import shorten_config_file_error, unknown_key_message
from flowar_jax.config import check_batch_divisible, check_types, validate_config
from flowar_jax.runs.checkpointing import Checkpointer
from flowar_jax.training.resume_check import check_config_matches_checkpoints
from test_cli import cli


def _built_by_hand(key: str | None = None, value=None) -> ml_collections.ConfigDict:
  """The tiny config as a plain ConfigDict built from a dict (as a notebook or JSON might), with `key` set
  to `value` before it takes on types."""
  values = tiny_config().to_dict()
  if key is not None:
    *parents, leaf = key.split(".")
    target = values
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return ml_collections.ConfigDict(values)


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", "64", r"config.batch_size must be an int, got '64' \(str\)"),
    ("optimizer.base_lr", "1e-4", r"config.optimizer.base_lr must be a number"),
    ("data.random_flip", 1, r"config.data.random_flip must be a bool, got 1"),
    ("model.num_heads", 2.0, r"config.model.num_heads must be an int, got 2.0 \(float\)"),
    ("model.scales", (1, 2.5, 4), r"config.model.scales must be a tuple of ints .* got \(1, 2.5, 4\)"),
    ("model.scales", ("(1,2,x)",), r"config.model.scales must be a tuple of ints"),
    ("model.scales", 4, r"config.model.scales must be a tuple of ints"),
    ("stage", None, r"config.stage must be a string, got None"),
])
def test_wrong_value_types_name_the_field(key, value, match):
  with pytest.raises(ValueError, match=match):
    validate_config(_built_by_hand(key, value))


def test_unknown_and_missing_keys_are_named():
  config = _built_by_hand()
  config.model.widht = 3
  with pytest.raises(ValueError, match=r"unknown config key\(s\): config.model.widht"):
    check_types(config)
  config = _built_by_hand()
  del config.model.head["depth"]
  with pytest.raises(ValueError, match=r"missing: config.model.head.depth"):
    check_types(config)


def test_batch_must_split_over_the_data_parallel_devices():
  config = tiny_config()  # batch 8, VAE batch 8
  check_batch_divisible(config, 4)
  with pytest.raises(ValueError, match="config.batch_size 8 is not divisible by the 3 devices"):
    check_batch_divisible(config, 3)
  config.batch_size = 12
  with pytest.raises(ValueError, match="config.vae.train.batch_size 8 is not divisible by the 6 devices"):
    check_batch_divisible(config, 6)


def _workdir_with_checkpoint(tmp_path, config):
  workdir = str(tmp_path / "run")
  with Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
    checkpointer.save(5, {"w": np.ones(2, np.float32)}, config=config)
  return workdir


def test_a_checkpoint_of_another_architecture_is_named(tmp_path):
  stored = tiny_config()
  stored.stage = "flowar"
  workdir = _workdir_with_checkpoint(tmp_path, stored)
  config = tiny_config()
  config.stage = "flowar"
  check_config_matches_checkpoints(config, workdir)  # same config: fine
  config.model.width = 64
  config.model.head.variant = "v2"
  with pytest.raises(ValueError) as error:
    check_config_matches_checkpoints(config, workdir)
  message = str(error.value)
  assert "config.model.width is 32 in the checkpoint but 64 now" in message
  assert "config.model.head.variant is 'v1' in the checkpoint but 'v2' now" in message
  assert os.path.join(workdir, "checkpoints") in message and "checkpoint 5" in message


def test_changed_training_settings_only_warn(tmp_path, caplog):
  workdir = _workdir_with_checkpoint(tmp_path, tiny_config())
  config = tiny_config()
  config.seed = 3
  config.num_train_steps = 8
  with caplog.at_level("WARNING"):
    check_config_matches_checkpoints(config, workdir)
  message = " ".join(r.getMessage() for r in caplog.records)
  assert "config.seed is 0 in the checkpoint but 3 now" in message
  assert "config.num_train_steps is 4 in the checkpoint but 8 now" in message


def test_flag_error_messages():
  error = AttributeError(KeyError('\'widht\'\nDid you mean "width" instead of "widht"?'))
  argv = ["flowar_jax", "train", "--config", "c.py", "--config.seed=1", "--config.model.widht=3"]
  assert unknown_key_message(error, argv) == "unknown config key 'model.widht' (did you mean 'model.width'?)"
  in_file = AttributeError(KeyError('Key "widht" does not exist and cannot be added since the config is locked.'))
  assert unknown_key_message(in_file, argv[:3]) == "unknown config key 'widht' set in the config file"
  text = ("flag --config=my.py: Error whilst parsing config file:\n\nTraceback (most recent call last):\n"
          '  File "/x/config_flags.py", line 684, in parse\n    config = get_config()\n'
          '  File "my.py", line 4, in get_config\n    c.batch_size = 2.5\n'
          "TypeError: Could not override field 'batch_size' (reference).\n")
  assert shorten_config_file_error(text) == (
      "flag --config=my.py: Error whilst parsing config file\n"
      'File "my.py", line 4, in get_config\n  c.batch_size = 2.5\n'
      "TypeError: Could not override field 'batch_size' (reference).")


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("override,message", [
    ("--config.model.widht=3", "unknown config key 'model.widht' (did you mean 'model.width'?)"),
    ("--config.batch_size=abc", "flag --config.batch_size=abc: invalid literal for int()"),
    ("--config.model.scales=(1,2.5,4)", "config.model.scales must be a tuple of ints"),
    ("--config.model.num_heads=3", "config.model.num_heads 3 does not divide config.model.width 128"),
])
def test_command_line_config_errors_are_one_line(override, message, tmp_path):
  proc = cli("train", "--config", "configs/digits.py", override, "--workdir", str(tmp_path / "run"), check_ok=False)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()  # nothing was computed or written


def test_command_line_refuses_a_workdir_of_another_architecture(trained, tmp_path):
  _, workdir, _ = trained
  run = str(tmp_path / "run")
  shutil.copytree(workdir, run)
  before = sorted(os.listdir(os.path.join(run, "checkpoints")))
  proc = cli("train", "--config", "configs/digits.py", "--workdir", run, check_ok=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config.vae.base_channels is 8 in the checkpoint but 32 now" in proc.stderr  # checked before training
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == before


def test_unknown_model_name_lists_the_known_models():
  config = tiny_config()
  config.model.name = "flowwar"
  with pytest.raises(ValueError, match=r"config.model.name 'flowwar' is not a known model; known models: flowar"):
    validate_config(config)


def test_registry_builds_the_named_model_and_stored_configs_without_a_name_are_flowar():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flowar_jax.config import config_from_dict  # pylint: disable=g-import-not-at-top
  from flowar_jax.models import registry  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.flowar import FlowAR  # pylint: disable=g-import-not-at-top
  values = tiny_config().to_dict()
  del values["model"]["name"]  # as in the configs stored before the key existed
  config = config_from_dict(values)
  assert config.model.name == "flowar"
  assert isinstance(nnx.eval_shape(lambda: registry.build_model(config)), FlowAR)
  config.model.name = "maskgit"
  with pytest.raises(ValueError, match=r"known models: flowar, hart, var"):
    registry.build_model(config)
  with pytest.raises(ValueError, match=r"'maskgit' is not a known model; known models: flowar, var, hart"):
    validate_config(config)


def test_resume_check_names_a_changed_text_encoder_and_residual_head():
  """A checkpoint trained with one text encoder (or HART residual head) does not resume under another."""
  from flowar_jax.config_hart import hart_preset  # pylint: disable=g-import-not-at-top
  from flowar_jax.config_text import add_text_section  # pylint: disable=g-import-not-at-top
  from flowar_jax.training import resume_check  # pylint: disable=g-import-not-at-top

  text = add_text_section(tiny_config(), "minilm")
  stored = text.to_dict()
  with text.unlocked():
    text.text.max_length = 8
  found = resume_check.differences(stored, text, resume_check.FLOWAR_ARCHITECTURE)
  assert found == [f"config.text.max_length is {stored['text']['max_length']!r} in the checkpoint but 8 now"]
  # A class-conditional checkpoint has no text section: nothing of it is compared.
  assert resume_check.differences(tiny_config().to_dict(), tiny_config(), resume_check.FLOWAR_ARCHITECTURE) == []

  hart = hart_preset(2)
  stored = hart.to_dict()
  with hart.unlocked():
    hart.model.residual.kind = "flow"
  assert resume_check.differences(stored, hart, resume_check.HART_ARCHITECTURE) == [
      "config.model.residual.kind is 'diffusion' in the checkpoint but 'flow' now"]
