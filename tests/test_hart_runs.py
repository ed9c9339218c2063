"""HART through the same run paths as FlowAR and VAR: `train` (HART's generator stage on a stored hybrid
tokenizer, then samples) on the bundled digits with a tiny config, `sample` / `evaluate` from its workdir, the
resume check and the config and flag errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flowar_jax.commands import evaluate, train
from flowar_jax.config import validate_config
from flowar_jax.config_files import load_config
from flowar_jax.convert import write_workdir
from flowar_jax.convert.hart import hybrid_state_dict
from flowar_jax.evaluation.runner import SamplingPlan
from flowar_jax.models.hart_sampling import HARTSampling
from flowar_jax.models.registry import build_vae
from flowar_jax.runs.checkpointing import Checkpointer
from flowar_jax.sampling.generate import settings_from
from flowar_jax.training.resume_check import check_config_matches_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "hart_digits.py")
# The smallest run that still has every part: 8x8 digits (their own size) over two scales (1, 2) of the stride-4
# tokenizer, one block. Compiles dominate this module's time and grow with the scales, blocks and image side.
TINY = {"num_train_steps": 2, "vae.train.num_train_steps": 2, "checkpoint_every_steps": 2, "log_every_steps": 1,
        "sample_every_steps": 0, "batch_size": 8, "vae.train.batch_size": 8, "vae.vocab_size": 32,
        "data.image_size": 8, "vae.patch_nums": (1, 2), "model.depth": 1, "model.width": 64, "model.num_heads": 2,
        "model.residual.width": 32, "model.residual.depth": 1, "sampling.num_samples": 6,
        "sampling.batch_size": 6}


def tiny(**overrides):
  return load_config(DIGITS, dict(TINY, **overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny HART trained by the `train` command's library on a random hybrid tokenizer written as WORKDIR/vae
  (as `convert --vae_torch` writes one): 2 HART steps, then samples. The tokenizer stage's own training is
  tests/test_hybrid_training.py's; compiling it here would double this module's time."""
  workdir = str(tmp_path_factory.mktemp("hart_run"))
  config = tiny(stage="hart")
  write_workdir(config, workdir, None, hybrid_state_dict(build_vae(config, 2), config.vae.share_quant_resi))
  report = train.run(config, workdir)
  return config, workdir, report


def test_train_runs_the_generator_on_the_stored_tokenizer_and_samples(trained):
  config, workdir, report = trained
  with Checkpointer(os.path.join(workdir, "vae", "checkpoints")) as checkpointer:
    assert checkpointer.all_steps() == [0]  # stage 'hart' reads the tokenizer and leaves it as it is
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [r for r in map(json.loads, f) if "residual_loss" in r]
  assert [r["step"] for r in logged] == [1, 2]
  for r in logged:  # the loss is the categorical part plus the residual head's
    assert r["residual_loss"] > 0 and 0.0 <= r["token_accuracy"] <= 1.0
    assert abs(r["loss"] - (r["ce"] + r["residual_loss"])) < 1e-4 * r["loss"]
  assert abs(logged[0]["ce"] - np.log(config.vae.vocab_size)) < 1.5  # a fresh model predicts codes at chance
  samples = np.load(os.path.join(workdir, "samples", "samples.npz"))
  images = samples[samples.files[0]]
  assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8 and images.std() > 0
  assert 0.0 <= report["digit_accuracy_samples"] <= 1.0 and report["digit_fd_samples"] > 0


def test_evaluate_names_the_residual_settings(trained):
  config, workdir, _ = trained
  settings = settings_from(config, num_steps=2, residual_temperature=0.5)
  report = evaluate.run(config, workdir, num_samples=6, seed=0, settings=settings, batch_size=6, metrics=("digits",))
  assert set(report["metrics"]) >= {"digits_accuracy", "digits_fd"}
  name = "step2-n6-seed0-cfg3-topk0-topp0-rsteps2-rtemp0.5-ema"
  with open(os.path.join(workdir, "eval", name, "sampling.json")) as f:
    record = json.load(f)
  assert (record["residual_steps"], record["residual_cfg"], record["residual_temperature"]) == (2, 3.0, 0.5)


def test_sample_command_refuses_flowar_only_flags(trained):
  _, workdir, _ = trained
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  refused = subprocess.run([sys.executable, "-m", "flowar_jax", "sample", "--workdir", workdir, "--solver", "heun",
                            "--num_samples", "2"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert refused.returncode == 2
  assert "--solver does not apply to hart (a categorical head and the residual head)" in refused.stderr


def test_resume_check_names_a_changed_architecture(trained):
  _, workdir, _ = trained
  with pytest.raises(ValueError, match=r"config\.model\.residual\.width is 32 in the checkpoint but 48 now"):
    check_config_matches_checkpoints(tiny(**{"model.residual.width": 48}), workdir)
  with pytest.raises(ValueError, match=r"config\.model\.mlp is 'llama' in the checkpoint but 'gpt2' now"):
    check_config_matches_checkpoints(tiny(**{"model.mlp": "gpt2"}), workdir)
  check_config_matches_checkpoints(tiny(**{"vae.train.skip_continuous_prob": 0.25, "model.residual.num_steps": 4}),
                                   workdir)  # a changed setting resumes (with a warning), a sampling one freely


def test_settings_from_builds_hart_sampling():
  config = tiny(**{"sampling.residual_cfg": 1.5, "sampling.residual_steps": 5})
  s = settings_from(config, top_k=8, cfg=2.0)
  assert isinstance(s, HARTSampling)
  assert (s.categorical.cfg, s.categorical.top_k, s.residual_steps, s.residual_cfg) == (2.0, 8, 5, 1.5)
  assert settings_from(config, num_steps=3).residual_steps == 3  # the CLI's --num_steps
  default = settings_from(tiny())
  assert default.residual_steps is None and default.residual_cfg is None and default.residual().cfg == 3.0
  plan = SamplingPlan(num_samples=10, num_classes=10, seed=0, settings=default, use_ema=True, checkpoint_step=5)
  assert plan.name == "step5-n10-seed0-cfg3-topk0-topp0-ema"


@pytest.mark.parametrize("overrides,message", [
    ({"guidance": 0.5}, "--guidance does not apply to hart (a categorical head and the residual head); its "
                        "sampling settings are cfg, top_k, top_p"),
    ({"num_steps": 3, "residual_steps": 4}, "--num_steps 3 and --residual_steps 4 both set the residual head's"),
    ({"num_steps": 0}, "residual_steps must be an int in [1, 1000]"),
    ({"residual_temperature": -1.0}, "residual_temperature must be a finite number >= 0"),
])
def test_settings_errors_name_the_flag(overrides, message):
  with pytest.raises(ValueError) as error:
    settings_from(tiny(), **overrides)
  assert message in str(error.value)


@pytest.mark.parametrize("overrides,message", [
    ({"model.mlp": "swiglu"}, "config.model.mlp must be one of ('llama', 'gpt2'), got 'swiglu'"),
    ({"model.num_heads": 11, "model.width": 66}, "need a head size divisible by 4; config.model.width 66 / "
                                                  "config.model.num_heads 11 = 6"),
    ({"model.remat": "full"}, "config.model.remat 'full': HART's blocks have no rematerialisation"),
    ({"model.residual.depth": 0}, "config.model.residual.depth must be >= 1, got 0"),
    ({"model.residual.num_steps": 1001}, "config.model.residual.num_steps must lie in [1, 1000], got 1001"),
    ({"sampling.residual_steps": -1}, "config.sampling.residual_steps must lie in [1, 1000] (0: "
                                      "model.residual.num_steps), got -1"),
    ({"vae.using_znorm": True}, "config.vae.using_znorm must be False"),
    ({"vae.train.skip_continuous_prob": 1.5}, "config.vae.train.skip_continuous_prob must lie in [0, 1], got 1.5"),
    ({"data.image_size": 16}, "config.data.image_size 16 must equal the last scale x the VQVAE's stride"),
    ({"model.drop_path_rate": -0.1}, "config.model.drop_path_rate must lie in [0, 1), got -0.1"),
])
def test_bad_configs_are_named(overrides, message):
  with pytest.raises(ValueError) as error:
    validate_config(tiny(**overrides))
  assert message in str(error.value)


def test_the_digits_preset_is_valid_and_keeps_var_digits_tokenizer():
  config, var = load_config(DIGITS), load_config(os.path.join(ROOT, "configs", "var_digits.py"))
  validate_config(config)
  assert config.model.name == "hart" and config.stage == "both"
  for key in ("vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "patch_nums"):
    assert config.vae[key] == var.vae[key], key
  assert (config.model.depth, config.model.width, config.model.num_heads) == (2, 128, 2)
