"""MetricWriter (JSON lines, PNGs, process 0 only) and Progress (bar in a terminal, lines otherwise)."""
from __future__ import annotations

import io
import json
import os
import re
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flowar_jax.runs import metrics as metrics_lib
from flowar_jax.runs import progress as progress_lib
from flowar_jax.runs.metrics import MetricWriter
from flowar_jax.runs.progress import Progress, format_duration


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_scalars_are_json_lines_of_floats(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(10, {"loss": jnp.float32(0.5), "lr": np.float64(1e-4), "count": 3,
                              "lr32": jnp.float32(1e-3)})
    writer.write_scalars(20, {"loss": jnp.array(0.25), "grad_norm": float("nan")})
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [10, 20]
  # float32 values are written as their shortest decimal (0.001, not 0.0010000000474974513).
  assert records[0] == {"step": 10, "loss": 0.5, "lr": 1e-4, "count": 3.0, "lr32": 0.001}
  assert all(isinstance(records[0][k], float) for k in ("loss", "lr", "count", "lr32"))
  assert records[1]["loss"] == 0.25 and np.isnan(records[1]["grad_norm"])


def test_resumed_writer_appends(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(1, {"loss": 1.0})
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(2, {"loss": 0.5})
  assert [r["step"] for r in _records(tmp_path)] == [1, 2]


def test_lines_are_on_disk_before_close(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write_scalars(3, {"loss": 2.0})
  assert _records(tmp_path) == [{"step": 3, "loss": 2.0}]  # a crash now would keep it
  writer.close()


def test_non_scalar_metric_is_rejected(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match="'loss' must be a scalar"):
      writer.write_scalars(1, {"loss": np.ones(3)})


def test_images_become_grid_pngs(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_images(40, {"samples": images})
  (record,) = _records(tmp_path)
  assert record["step"] == 40
  grid = np.asarray(Image.open(os.path.join(tmp_path, record["samples"])))
  assert grid.dtype == np.uint8 and grid.shape[2] == 3
  # 5 images -> 3 columns x 2 rows; the first image appears intact in the top-left cell.
  assert grid.shape[0] > 2 * 8 and grid.shape[1] > 3 * 6
  first = images[0]
  found = any(np.array_equal(grid[r:r + 8, c:c + 6], first) for r in range(4) for c in range(4))
  assert found


def test_images_must_be_uint8_nhwc(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match="uint8"):
      writer.write_images(1, {"x": np.zeros((2, 4, 4, 3), np.float32)})


def test_other_processes_write_nothing(tmp_path):
  workdir = tmp_path / "run"
  with mock.patch.object(jax, "process_index", return_value=1):
    writer = MetricWriter(str(workdir))
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"x": np.zeros((1, 2, 2, 3), np.uint8)})
    writer.flush()
    writer.close()
  assert not workdir.exists()


def test_tensorboard_backend_gets_the_same_floats(tmp_path):
  fake_tb = mock.MagicMock()
  with mock.patch.object(metrics_lib, "_tensorboard_writer", return_value=fake_tb):
    with MetricWriter(str(tmp_path)) as writer:
      writer.write_scalars(5, {"loss": jnp.float32(1.5)})
  fake_tb.write_scalars.assert_called_once_with(5, {"loss": 1.5})
  fake_tb.close.assert_called_once()
  assert _records(tmp_path) == [{"step": 5, "loss": 1.5}]


def test_missing_tensorboard_backend_is_not_an_error(tmp_path):
  # A None entry in sys.modules makes the import fail, as when the `tensorboard` package is absent.
  with mock.patch.dict(sys.modules, {"tensorboard": None, "flowar_jax.runs.tensorboard_writer": None}):
    assert metrics_lib._tensorboard_writer(str(tmp_path / "tb")) is None
    with MetricWriter(str(tmp_path)) as writer:
      writer.write_scalars(1, {"loss": 1.0})
      writer.write_hparams({"model.width": 8})
  assert _records(tmp_path) == [{"step": 1, "loss": 1.0}]
  assert not (tmp_path / "tensorboard").exists()


def test_format_duration():
  assert format_duration(12.4) == "12s"
  assert format_duration(192) == "3m12s"
  assert format_duration(2 * 3600 + 5 * 60) == "2h05m"
  assert format_duration(27 * 3600) == "1d03h"


def test_progress_prints_plain_lines_when_not_a_tty():
  out = io.StringIO()  # not a terminal
  clock = iter([0.0, 10.0, 20.0, 30.0, 40.0])
  with mock.patch.object(progress_lib.time, "perf_counter", lambda: next(clock)):
    progress = Progress(2000, initial=100, desc="flowar", stream=out)
    progress.update(120, {"loss": jnp.float32(0.123)})  # t=10: 20 steps in 10 s since start
    progress.update(140, {"loss": 0.1, "grad_norm": 1.0})  # t=20: rate measured from the first update
    progress.update(2000, {})  # t=30
    progress.close()
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue()
  assert len(lines) == 3
  assert lines[0] == "flowar: step 120/2000 (6%) loss=0.123 | 2 steps/s, eta 15m40s"
  assert lines[1] == "flowar: step 140/2000 (7%) loss=0.1 grad_norm=1 | 2 steps/s, eta 15m30s"
  assert lines[2].startswith("flowar: step 2000/2000 (100%)") and "done in 30s" in lines[2]


def test_progress_every_skips_lines_and_close_prints_the_last():
  out = io.StringIO()
  progress = Progress(100, every=10, stream=out)
  for step in range(1, 26):
    progress.update(step, {"loss": 1.0 / step})
  progress.close()
  steps = [int(re.match(r"step (\d+)/100", line).group(1)) for line in out.getvalue().splitlines()]
  assert steps == [10, 20, 25]


def test_progress_bar_on_a_terminal():
  out = io.StringIO()
  progress = Progress(50, desc="vae", stream=out, tty=True)
  progress.update(25, {"loss": 0.5})
  progress.close()
  text = out.getvalue()
  assert "\r" in text and "vae" in text and "25/50" in text and "loss=0.5" in text


def test_progress_is_silent_on_other_processes():
  out = io.StringIO()
  with mock.patch.object(jax, "process_index", return_value=3):
    progress = Progress(10, stream=out)
    progress.update(10, {"loss": 1.0})
    progress.close()
  assert out.getvalue() == ""
