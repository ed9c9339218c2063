"""VAR through the same run paths as FlowAR: official-format weights converted into a workdir, then `sample`,
`evaluate` and the generator stage of `train` on the bundled digits (a tiny VAR; random weights)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flowar_jax.commands import evaluate
from flowar_jax.commands.summary import summarize
from flowar_jax.config_files import load_config
from flowar_jax.convert import write_workdir
from flowar_jax.convert.var import var_state_dict, vqvae_state_dict
from flowar_jax.models.registry import build_model, build_vae
from flowar_jax.runs.stored_config import stored_config
from flowar_jax.sampling.generate import generate, settings_from
from flowar_jax.training.generator_stage import train_generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "var_digits.py")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A workdir converted from official-format state dicts of a randomly initialised digits VAR."""
  config = load_config(DIGITS)
  workdir = str(tmp_path_factory.mktemp("var_run"))
  written = write_workdir(config, workdir, var_state_dict(build_model(config, 1)),
                          vqvae_state_dict(build_vae(config, 2), config.vae.share_quant_resi))
  assert [os.path.relpath(d, workdir) for d in written] == ["checkpoints", os.path.join("vae", "checkpoints")]
  return config, workdir


def test_summary_prints_the_published_counts():
  for depth, millions in ((16, "310.28M"), (30, "2010.02M")):
    text = summarize(load_config(os.path.join(ROOT, "configs", f"var_d{depth}.py")))
    assert f"total_params" in text and f"({millions})" in text and "vae_params 108948355 (108.95M)" in text


def test_samples_do_not_depend_on_their_batch(converted):
  config, workdir = converted
  settings = settings_from(config)
  labels = np.array([3, 1, 4, 1, 5, 9], np.int32)
  whole = generate(config, workdir, labels=labels, seed=7, settings=settings, batch_size=6)
  split = generate(config, workdir, labels=labels, seed=7, settings=settings, batch_size=4)
  assert whole.shape == (6, 16, 16, 3) and whole.dtype == np.uint8
  # Same draws, same tokens: the decoder's float rounding may differ with the batch shape by a unit at most.
  diff = np.abs(whole.astype(int) - split.astype(int))
  assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3
  other = generate(config, workdir, labels=labels, seed=8, settings=settings, batch_size=6)
  assert (other != whole).any()


def test_sample_command_and_its_flags(converted):
  _, workdir = converted
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  run = lambda *flags: subprocess.run([sys.executable, "-m", "flowar_jax", "sample", "--workdir", workdir, *flags],
                                      capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  done = run("--num_samples", "4", "--top_k", "16", "--cfg", "2")
  assert done.returncode == 0, done.stderr
  assert os.path.exists(os.path.join(workdir, "samples", "grid.png"))
  refused = run("--num_samples", "4", "--num_steps", "3")
  assert refused.returncode == 2
  assert "--num_steps does not apply to var (a categorical head)" in refused.stderr


def test_evaluate_names_its_settings(converted):
  config, workdir = converted
  report = evaluate.run(stored_config(workdir), workdir, num_samples=20, seed=0, settings=settings_from(config),
                        batch_size=20, metrics=("digits",))
  assert set(report["metrics"]) >= {"digits_accuracy", "digits_fd"}
  name = f"step0-n20-seed0-cfg{config.sampling.cfg:g}-topk0-topp0-ema"
  with open(os.path.join(workdir, "eval", name, "sampling.json")) as f:
    assert json.load(f)["top_k"] == 0


def test_generator_stage_trains_on_the_converted_tokenizer(converted, tmp_path):
  _, tokenizer_run = converted
  config = load_config(DIGITS, {"stage": "var", "vae_checkpoint": os.path.join(tokenizer_run, "vae"),
                                "num_train_steps": 4, "log_every_steps": 2, "checkpoint_every_steps": 4,
                                "sample_every_steps": 0, "batch_size": 8})
  train_generator(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  logged = [r for r in records if "loss" in r]
  assert [r["step"] for r in logged] == [2, 4]
  assert all(0.0 <= r["token_accuracy"] <= 1.0 and r["loss_scale_4"] > 0 for r in logged)
  # the first loss is near log(vocabulary): a fresh VAR predicts codes at about chance
  assert abs(logged[0]["loss"] - np.log(config.vae.vocab_size)) < 1.5
