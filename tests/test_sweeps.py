"""Sweeps: expanding grids and random searches, checking every point first, running locally, resuming, summaries."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap

import pytest
from absl import flags
from ml_collections import config_flags

from flowar_jax.config_files import apply_overrides, load_config, override_flags, parse_override
from flowar_jax.sweeps import Choice, LogUniform, Sweep, Uniform, load_sweep
from flowar_jax.sweeps import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")


def _sweep_cli():
  spec = importlib.util.spec_from_file_location("sweep_cli", os.path.join(ROOT, "launch", "sweep.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def _write_sweep(tmp_path, body: str) -> str:
  path = tmp_path / "sweep.py"
  path.write_text("from flowar_jax.sweeps import Sweep, Choice, LogUniform\n\n" + textwrap.dedent(body))
  return str(path)


def test_grid_is_every_combination_with_fixed_values_and_readable_names():
  sweep = Sweep(config="configs/digits.py", grid={"optimizer.base_lr": [2e-3, 4e-3], "model.width": [64, 128],
                                                  "model.scales": [(1, 2, 4)]},
                fixed={"num_train_steps": 100})
  points = sweep.expand()
  assert [p.name for p in points] == ["00_base_lr=0.002_width=64_scales=1-2-4",
                                      "01_base_lr=0.002_width=128_scales=1-2-4",
                                      "02_base_lr=0.004_width=64_scales=1-2-4",
                                      "03_base_lr=0.004_width=128_scales=1-2-4"]
  assert points[3].values == {"optimizer.base_lr": 4e-3, "model.width": 128, "model.scales": (1, 2, 4)}
  assert points[3].overrides == {"num_train_steps": 100, **points[3].values}


def test_keys_sharing_a_last_part_keep_their_full_name():
  (point,) = Sweep(config="c.py", points=[{"batch_size": 8, "vae.train.batch_size": 4}]).expand()
  assert point.name == "00_batch_size=8_vae.train.batch_size=4"


def test_random_search_is_reproducible_and_within_bounds():
  sweep = Sweep(config="c.py", random={"optimizer.base_lr": LogUniform(1e-4, 1e-2),
                                       "optimizer.b2": Uniform(0.9, 0.99), "model.depth": Choice([1, 2, 3])},
                num_points=20, seed=3)
  points = sweep.expand()
  assert [p.overrides for p in points] == [p.overrides for p in sweep.expand()]
  assert len(points) == 20 and len({p.name for p in points}) == 20
  lrs = [p.values["optimizer.base_lr"] for p in points]
  assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and min(lrs) < 1e-3 < max(lrs)  # spread over decades
  assert {p.values["model.depth"] for p in points} == {1, 2, 3}
  other = Sweep(config="c.py", random=sweep.random, num_points=20, seed=4).expand()
  assert [p.values for p in other] != [p.values for p in points]


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one of"),
    ({"grid": {"seed": [0]}, "points": [{"seed": 1}]}, "exactly one of"),
    ({"grid": {"seed": []}}, "non-empty"),
    ({"random": {"seed": Choice([0, 1])}}, "num_points"),
])
def test_malformed_sweeps_are_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Sweep(config="c.py", **kwargs)


def test_config_overrides_are_checked_and_round_trip_through_the_cli_flags():
  overrides = {"model.scales": (1, 2, 4), "optimizer.base_lr": 1e-3, "data.cache_latents": False,
               "data.name": "digits", "optimizer.warmup_steps": 7, "sampling.cfg": 2}
  config = load_config(DIGITS, overrides)
  assert config.sampling.cfg == 2.0 and isinstance(config.sampling.cfg, float)
  argv = ["prog", f"--config={DIGITS}", *override_flags(overrides)]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  assert flag_values.config.to_dict() == config.to_dict()
  with pytest.raises(KeyError, match="'model.widht'"):
    load_config(DIGITS, {"model.widht": 3})
  with pytest.raises(ValueError, match="'model.width' holds a int"):
    apply_overrides(config, {"model.width": "wide"})
  assert parse_override(config, "model.scales=(1,2,4)") == ("model.scales", (1, 2, 4))
  assert parse_override(config, "--config.data.name=image_folder") == ("data.name", "image_folder")
  assert parse_override(config, "data.cache_latents=true") == ("data.cache_latents", True)


def test_unknown_key_fails_before_anything_runs(tmp_path):
  sweep = _write_sweep(tmp_path, f"""
      def get_sweep():
        return Sweep(config={DIGITS!r}, grid={{"model.width": [64], "optimizer.lr": [1e-3, 2e-3]}})
      """)
  with pytest.raises(ValueError, match="sweep point 00_width=64_lr=0.001: unknown config key 'optimizer.lr'"):
    _sweep_cli()([sweep, "--workdir", str(tmp_path / "runs")])
  assert not (tmp_path / "runs").exists()


def test_invalid_value_fails_before_anything_runs(tmp_path):
  sweep = _write_sweep(tmp_path, f"""
      def get_sweep():
        return Sweep(config={DIGITS!r}, points=[{{"model.width": 64}}, {{"model.num_heads": 3}}])
      """)
  with pytest.raises(ValueError, match="sweep point 01_num_heads=3: config.model.num_heads 3 does not divide"):
    _sweep_cli()([sweep, "--workdir", str(tmp_path / "runs")])
  assert not (tmp_path / "runs").exists()


def _offline_gcs(monkeypatch) -> list[str]:
  """Makes every gs:// probe answer 'unreadable from here', as gcsfs does offline after half a minute of
  retries; -> the gs:// paths probed."""
  probed = []
  real_exists = runner._exists

  def exists(path):
    if str(path).startswith("gs://"):
      probed.append(str(path))
      return None
    return real_exists(path)

  monkeypatch.setattr(runner, "_exists", exists)
  return probed


def test_dry_run_prints_local_and_pod_commands(tmp_path, capsys, monkeypatch):
  sweep = os.path.join(ROOT, "configs", "sweeps", "digits_lr.py")
  main = _sweep_cli()
  probed = _offline_gcs(monkeypatch)
  assert main([sweep, "--workdir", str(tmp_path / "local"), "--dry_run", "--set", "num_train_steps=10"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("6 points of")
  assert "-m flowar_jax train --config" in lines[1] and f"--workdir {tmp_path}/local/00_base_lr=0.002_width=64" \
      in lines[1]
  assert "--config.num_train_steps=10" in lines[1] and "--config.optimizer.base_lr=0.002" in lines[1]
  assert main([sweep, "--workdir", "gs://bucket/lr", "--dry_run", "--pod", "v5e-64",
               "--pod_args=--zone us-west4-a"]) == 0
  pod_lines = capsys.readouterr().out.splitlines()[1:]
  assert len(pod_lines) == 6
  assert all(line.strip().startswith(f"[{runner.UNREADABLE}]") for line in pod_lines)
  assert probed == ["gs://bucket/lr/00_base_lr=0.002_width=64/report.json"]  # the first point only
  config = runner.resolve_config(load_sweep(sweep), sweep)
  assert pod_lines[5].split("] ", 1)[1] == (
      f"launch/tpu_pod.sh --name v5e-64 --zone us-west4-a {config} gs://bucket/lr/05_base_lr=0.008_width=128 -- "
      "--config.sample_every_steps=0 --config.optimizer.base_lr=0.008 --config.model.width=128")
  assert not (tmp_path / "local").exists()


def test_a_pod_sweep_into_an_unreadable_bucket_launches_every_point_after_one_probe(tmp_path, capfd,
                                                                                     monkeypatch):
  """Where this machine cannot read the bucket, the points are launched anyway (training skips finished work
  itself), without a probe per point or file, and the summary says it was not written."""
  launcher = tmp_path / "launcher.sh"
  launcher.write_text('#!/bin/sh\necho "launching $*"\n')
  launcher.chmod(0o755)
  monkeypatch.setattr(runner, "POD_LAUNCHER", str(launcher))
  probed = _offline_gcs(monkeypatch)
  sweep = _write_sweep(tmp_path, """
      from flowar_jax.sweeps import Sweep
      def get_sweep():
        return Sweep(config="configs/digits.py", points=[{"seed": 0}, {"seed": 1}])
  """)
  assert _sweep_cli()([sweep, "--workdir", "gs://bucket/seeds", "--pod", "v5e-8"]) == 0
  out = capfd.readouterr().out  # the launcher's output included
  assert probed == ["gs://bucket/seeds/00_seed=0/report.json"]
  assert out.count("launching anyway") == 2
  assert "launching --name v5e-8 " in out and out.count("gs://bucket/seeds/01_seed=1 -- --config.seed=1") == 2
  assert out.count("| launched |") == 2
  assert "(not written to gs://bucket/seeds: its file system is unreadable from here)" in out


def test_a_workdir_of_other_settings_is_refused(tmp_path):
  (point,) = Sweep(config=DIGITS, points=[{"seed": 1}]).expand()
  (run,) = runner.plan([point], str(tmp_path), DIGITS)
  os.makedirs(run.workdir)
  with open(os.path.join(run.workdir, runner.POINT_FILE), "w") as f:
    json.dump({"name": point.name, "overrides": {"seed": 2}}, f)
  with pytest.raises(ValueError, match="holds sweep point '00_seed=1' with overrides {'seed': 2}"):
    runner.check_records([run])


def test_local_sweep_trains_every_point_resumes_and_summarizes(tmp_path, capsys):
  """configs/sweeps/digits_tiny.py for real: two `flowar_jax train` runs, then a second call skips both."""
  sweep_file = os.path.join(ROOT, "configs", "sweeps", "digits_tiny.py")
  workdir = str(tmp_path / "sweep")
  main = _sweep_cli()
  assert main([sweep_file, "--workdir", workdir]) == 0
  table = capsys.readouterr().out
  names = [p.name for p in load_sweep(sweep_file).expand()]
  assert names == ["00_seed=0", "01_seed=1"]
  with open(os.path.join(workdir, "summary.json")) as f:
    rows = json.load(f)
  assert [r["point"] for r in rows] == names
  for row in rows:
    assert row["status"].startswith("done in") and row["step"] == 6 and row["loss"] > 0
    assert 0 <= row["digit_accuracy_samples"] <= 1
    with open(os.path.join(workdir, row["point"], "report.json")) as f:
      assert json.load(f)["digit_accuracy_samples"] == row["digit_accuracy_samples"]
  assert rows[0]["loss"] != rows[1]["loss"]  # different seeds, different runs
  assert "| 01_seed=1 | seed=1" in table and "digit_accuracy_samples" in table.splitlines()[-4]
  assert os.listdir(os.path.join(workdir, runner.COMPILE_CACHE))  # the points shared compiled programs

  assert main([sweep_file, "--workdir", workdir]) == 0  # resumed: nothing left to run
  with open(os.path.join(workdir, "summary.json")) as f:
    again = json.load(f)
  assert [r["status"] for r in again] == ["done (earlier)"] * 2
  assert [r["loss"] for r in again] == [r["loss"] for r in rows]


def test_local_points_run_in_the_given_environment_with_a_shared_compile_cache(tmp_path):
  """The sweep process itself keeps off accelerators; its points get the caller's environment."""
  probe = "import os; print(os.environ.get('JAX_PLATFORMS'), os.environ['JAX_COMPILATION_CACHE_DIR'])"
  points = Sweep(config=DIGITS, points=[{"seed": 0}, {"seed": 1}]).expand()
  runs = runner.plan(points, str(tmp_path), DIGITS)
  for run in runs:
    run.command = [sys.executable, "-c", probe]
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR")}
  runner.run_local(runs, DIGITS, parallel=2, env=env)
  for run in runs:
    assert run.status.startswith("done in")
    with open(os.path.join(run.workdir, runner.LOG_FILE)) as f:
      assert f.read().split() == ["None", str(tmp_path / runner.COMPILE_CACHE)]
    with open(os.path.join(run.workdir, runner.POINT_FILE)) as f:
      assert json.load(f)["overrides"] == run.point.overrides
  runs[0].command = [sys.executable, "-c", "raise SystemExit(3)"]
  runs[0].status = "pending"
  runner.run_local(runs[:1], DIGITS)
  assert runs[0].status == f"failed (exit 3), see 00_seed=0/{runner.LOG_FILE}"
