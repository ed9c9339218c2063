"""The command line as a user runs it: `python -m flowar_jax COMMAND ...` in a subprocess."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def cli(*args, check_ok=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", "flowar_jax", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  if check_ok:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_summary_prints_flowar_s_size():
  out = cli("summary", "--config", "configs/flowar_s.py").stdout
  assert "total_params 171718072 (171.72M)" in out
  assert "backbone.encoder_blocks" in out and "flownet.res_blocks" in out


def test_no_command_is_a_usage_error():
  proc = cli(check_ok=False)
  assert proc.returncode != 0 and "usage: flowar-jax" in proc.stderr


def test_unknown_config_key_fails_loudly(tmp_path):
  proc = cli("train", "--config", "configs/digits.py", "--config.model.widht=3", "--workdir", str(tmp_path),
             check_ok=False)
  assert proc.returncode != 0 and "widht" in proc.stderr


def test_missing_vae_checkpoint_is_named(tmp_path):
  proc = cli("train", "--config", "configs/digits.py", "--config.stage=flowar", "--workdir", str(tmp_path),
             check_ok=False)
  assert proc.returncode == 2 and "no VAE checkpoint found" in proc.stderr and str(tmp_path) in proc.stderr


def test_empty_image_folder_is_named(tmp_path):
  empty = tmp_path / "images"
  empty.mkdir()
  proc = cli("train", "--config", "configs/digits.py", "--config.data.name=image_folder",
             f"--config.data.data_dir={empty}", "--workdir", str(tmp_path / "run"), check_ok=False)
  assert proc.returncode == 2 and str(empty) in proc.stderr


@pytest.mark.parametrize("flags,message", [(["--num_steps", "0"], "num_steps"), (["--cfg", "-1"], "cfg"),
                                           (["--labels", "3,12"], "class label 12 is out of range"),
                                           (["--labels", "x"], "--labels")])
def test_sample_rejects_impossible_arguments(trained, flags, message):
  _, workdir, _ = trained
  proc = cli("sample", "--workdir", workdir, "--num_samples", "2", *flags, check_ok=False)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_sample_writes_npz_and_grid(trained, tmp_path):
  _, workdir, _ = trained
  import shutil
  run = str(tmp_path / "run")
  shutil.copytree(workdir, run)
  cli("sample", "--workdir", run, "--num_samples", "5", "--labels", "3,5", "--seed", "1", "--cfg", "2",
      "--num_steps", "2", "--batch_size", "2")
  with np.load(os.path.join(run, "samples", "samples.npz")) as f:
    assert f["images"].shape == (5, 16, 16, 3) and f["images"].dtype == np.uint8
    np.testing.assert_array_equal(f["labels"], [3, 5, 3, 5, 3])
  assert os.path.exists(os.path.join(run, "samples", "grid.png"))


def test_console_script_runs():
  script = os.path.join(os.path.dirname(sys.executable), "flowar-jax")
  if not os.path.exists(script):
    pytest.skip("flowar_jax is not pip-installed in this interpreter's environment (no flowar-jax script)")
  proc = subprocess.run([script, "summary", "--config", "configs/digits.py"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0 and "total_params" in proc.stdout
