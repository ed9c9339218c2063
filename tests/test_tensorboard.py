"""TensorBoard event files written without TensorFlow, read back with tensorboard's own EventAccumulator."""
from __future__ import annotations

import importlib.util
import inspect
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

from flowar_jax.runs.metrics import MetricWriter  # noqa: E402
from flowar_jax.runs.tensorboard_writer import TensorBoardWriter  # noqa: E402


def _events(logdir: str) -> EventAccumulator:
  accumulator = EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0, "tensors": 0,
                                                        "histograms": 0})
  accumulator.Reload()
  return accumulator


def _png(image_event) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)))


def _hparams(accumulator: EventAccumulator) -> dict:
  content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
  info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
  return {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
          for name, value in info.hparams.items()}


def test_writer_implements_clus_metric_writer_interface():
  """Every abstract method of clu's MetricWriter, with the same arguments (read from clu's interface module
  directly: importing clu.metric_writers itself needs tensorflow)."""
  clu_dir = importlib.util.find_spec("clu").submodule_search_locations[0]
  spec = importlib.util.spec_from_file_location("clu_interface", os.path.join(clu_dir, "metric_writers",
                                                                              "interface.py"))
  interface = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(interface)
  abstract = interface.MetricWriter.__abstractmethods__
  assert {"write_scalars", "write_images", "write_hparams", "flush", "close"} <= abstract
  for name in abstract:
    ours = inspect.signature(getattr(TensorBoardWriter, name))
    theirs = inspect.signature(getattr(interface.MetricWriter, name))
    assert list(ours.parameters) == list(theirs.parameters), name


def test_scalars_images_text_histograms_and_hparams_read_back(tmp_path):
  logdir = str(tmp_path / "tb")
  writer = TensorBoardWriter(logdir)
  writer.write_hparams({"model.width": 128, "model.scales": (1, 2, 4), "stage": "both", "flag": True})
  for step in (10, 20, 30):
    writer.write_scalars(step, {"loss": 1.0 / step, "learning_rate": np.float32(1e-3)})
  grid = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
  writer.write_images(30, {"samples": grid, "batch": np.stack([grid, 255 - grid])})
  writer.write_texts(30, {"note": "**done**"})
  writer.write_histograms(30, {"weights": np.arange(100.0)}, num_buckets={"weights": 10})
  writer.close()

  events = _events(logdir)
  assert set(events.Tags()["scalars"]) == {"loss", "learning_rate"}
  loss = events.Scalars("loss")
  assert [e.step for e in loss] == [10, 20, 30]
  np.testing.assert_allclose([e.value for e in loss], [0.1, 0.05, 1 / 30], rtol=1e-6)
  (image,) = events.Images("samples")
  assert image.step == 30 and (image.height, image.width) == (12, 20)
  np.testing.assert_array_equal(_png(image), grid)  # lossless PNG
  np.testing.assert_array_equal(_png(events.Images("batch/1")[0]), 255 - grid)
  (text,) = events.Tensors("note")
  assert text.tensor_proto.string_val == [b"**done**"]
  (histogram,) = events.Histograms("weights")
  assert histogram.histogram_value.num == 100 and sum(histogram.histogram_value.bucket) == 100
  assert _hparams(events) == {"model.width": 128.0, "model.scales": "(1, 2, 4)", "stage": "both",
                              "flag": True}


def test_events_roll_over_to_new_files_that_tensorboard_reads_in_order(tmp_path):
  """Each event file stays near `file_bytes` (on GCS each upload rewrites the open one); TensorBoard reads
  them all, and a second writer in the same second and process gets files of its own."""
  logdir = str(tmp_path / "tb")
  grid = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  first = TensorBoardWriter(logdir, file_bytes=2000)
  for step in range(1, 31):
    first.write_scalars(step, {"loss": 1.0 / step})
    first.write_images(step, {"grid": grid})
  first.close()
  second = TensorBoardWriter(logdir, file_bytes=2000)
  second.write_scalars(31, {"loss": 1.0 / 31})
  second.close()
  files = sorted(os.listdir(logdir))
  assert len(files) > 5 and all(".tfevents." in name for name in files)
  png_bytes = len(_png_bytes(grid))
  assert all(os.path.getsize(os.path.join(logdir, name)) < 2000 + png_bytes + 500 for name in files)
  events = _events(logdir)
  assert [e.step for e in events.Scalars("loss")] == list(range(1, 32))
  np.testing.assert_allclose([e.value for e in events.Scalars("loss")], [1.0 / s for s in range(1, 32)], rtol=1e-6)
  assert [e.step for e in events.Images("grid")] == list(range(1, 31))


def _png_bytes(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def test_metric_writer_mirrors_jsonl_scalars_and_grids_to_tensorboard(tmp_path):
  images = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(5, {"loss": np.float32(0.75), "tokens_per_s": 1234.5})
    writer.write_images(5, {"samples": images}, columns=3)
  events = _events(str(tmp_path / "tensorboard"))
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [(5, 0.75)]
  assert [(e.step, e.value) for e in events.Scalars("tokens_per_s")] == [(5, 1234.5)]
  with open(tmp_path / "metrics.jsonl") as f:
    png_path = [json.loads(line) for line in f][1]["samples"]
  # TensorBoard gets the same 3-column grid as the PNG in WORKDIR/images/.
  png = np.asarray(Image.open(tmp_path / png_path))
  np.testing.assert_array_equal(_png(events.Images("samples")[0]), png)
  assert png.shape == (2 * 10 + 2, 3 * 10 + 2, 3)


def test_training_run_logs_scales_throughput_and_sample_grids(trained):
  """The session's tiny FlowAR run: per-scale losses, lr, grad norm, images/s and tokens/s at every logged
  step with the JSONL's values, a sample grid every 20 steps, and the config as hparams."""
  config, workdir, _ = trained
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  scalars = [r for r in records if "loss" in r]
  events = _events(os.path.join(workdir, "tensorboard"))
  expected = {"loss", "loss_scale_1", "loss_scale_2", "loss_scale_4", "learning_rate", "grad_norm",
              "images_per_s", "tokens_per_s"}
  assert expected <= set(events.Tags()["scalars"])
  for tag in expected:
    points = events.Scalars(tag)
    assert [e.step for e in points] == [r["step"] for r in scalars] == list(range(1, 41))
    np.testing.assert_allclose([e.value for e in points], [r[tag] for r in scalars], rtol=1e-6, err_msg=tag)
  tokens_per_image = 1 + 4 + 16  # scales (1, 2, 4)
  np.testing.assert_allclose([r["tokens_per_s"] for r in scalars],
                             [r["images_per_s"] * tokens_per_image for r in scalars], rtol=1e-9)

  grids = [r for r in records if "samples" in r]
  assert [r["step"] for r in grids] == [20, 40]
  assert [e.step for e in events.Images("samples")] == [20, 40]
  png = np.asarray(Image.open(os.path.join(workdir, grids[-1]["samples"])))
  # Two rows of the ten classes, each 16 px enlarged to 64 px, with 2 px padding.
  assert png.shape == (2 * 66 + 2, 10 * 66 + 2, 3)
  np.testing.assert_array_equal(_png(events.Images("samples")[-1]), png)
  hparams = _hparams(events)
  assert hparams["model.width"] == config.model.width and hparams["data.name"] == "digits"


def test_a_tensorboard_that_does_not_import_is_a_warning_not_an_info_line(tmp_path, monkeypatch, caplog):
  """The command line shows warnings and hides info lines: a run without event files must say so."""
  monkeypatch.setitem(sys.modules, "flowar_jax.runs.tensorboard_writer", None)  # import raises ImportError
  with caplog.at_level("WARNING"):
    with MetricWriter(str(tmp_path)) as writer:
      writer.write_scalars(1, {"loss": 0.5})
  assert any(r.levelname == "WARNING" and "TensorBoard logging off" in r.getMessage() for r in caplog.records)
  assert not (tmp_path / "tensorboard").exists() and (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_writers_past_the_tenth_in_one_process_are_read_in_order(tmp_path):
  """Writers opened one after another in one process (a long-lived worker, resumed runs) are read in the order
  they were opened, past the tenth as well."""
  logdir = str(tmp_path / "tb")
  for step in range(1, 13):
    writer = TensorBoardWriter(logdir)
    writer.write_scalars(step, {"loss": float(step)})
    writer.close()
  assert [e.step for e in _events(logdir).Scalars("loss")] == list(range(1, 13))
