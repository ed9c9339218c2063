"""Metric logging for training runs: JSON lines and TensorBoard event files, locally or on gs://.

Every `write_*` call appends one JSON object to WORKDIR/metrics.jsonl, e.g.
`{"step": 100, "loss": 0.41, "learning_rate": 0.0001}`, so it can be tailed or loaded with
`pandas.read_json(path, lines=True)`. Non-finite values are written as NaN / Infinity (Python's json reads
them back). A local file is flushed at every line, so it survives a crash; on GCS, where objects cannot be
appended to, the file is uploaded whole every `UPLOAD_SECONDS` and when the writer is flushed or closed
(see `fs.AppendFile`).

TensorBoard event files (WORKDIR/tensorboard/) come through `TensorBoardWriter`, which needs only the
`tensorboard` package (a dependency; no TensorFlow): every scalar of the JSON lines, each image grid, and
the run's config as hparams. Should it fail to import, a warning says so and the writer keeps to JSON lines
and image PNGs. Only process 0 writes anything, so multi-host runs don't race on the same files.
"""
from __future__ import annotations

import io
import json
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from flowar_jax.runs import fs
from flowar_jax.runs.images import make_grid

UPLOAD_SECONDS = 30.0  # how often a metrics.jsonl on GCS is rewritten


def _tensorboard_writer(logdir: str):
  """The TensorBoard event-file writer, or None when the `tensorboard` package is not installed."""
  try:
    from flowar_jax.runs.tensorboard_writer import TensorBoardWriter  # pylint: disable=g-import-not-at-top
  except ImportError as error:  # a dependency, so only a broken environment gets here
    logging.warning("TensorBoard logging off, its package does not import (%s; `pip install tensorboard`); "
                    "metrics go to metrics.jsonl only", error)
    return None
  except Exception as error:  # a broken tensorboard install must not stop training
    logging.warning("TensorBoard logging off, importing its backend failed: %r", error)
    return None
  return TensorBoardWriter(logdir)


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl, given the file or the run directory holding it (e.g. to plot losses)."""
  file = fs.join(path, "metrics.jsonl") if fs.is_dir(path) else path
  return [json.loads(line) for line in fs.read_text(file).splitlines() if line.strip()]


def _to_float(name: str, value: Any) -> float:
  array = np.asarray(jax.device_get(value))
  if array.size != 1:
    raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
  scalar = array.reshape(())[()]
  if jnp.issubdtype(array.dtype, jnp.floating) and array.dtype.itemsize < 8:
    # The shortest decimal of the float32 value: 0.001, not 0.0010000000474974513.
    return float(str(scalar))
  return float(scalar)


class MetricWriter:
  """Writes scalars and images of a run to WORKDIR (metrics.jsonl, images/, tensorboard/); process 0 only."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, log_scalars: bool = False):
    """Opens WORKDIR/metrics.jsonl for appending (on process 0; other processes touch nothing).

    Args:
      workdir: the run's directory (created if missing).
      tensorboard: also write TensorBoard event files, when the backend is installed.
      log_scalars: also log each scalar call through absl logging (the progress bar usually shows them).
    """
    self.workdir = workdir
    self.active = jax.process_index() == 0
    self._log_scalars = log_scalars
    self.path = fs.join(workdir, "metrics.jsonl")
    self._file = None
    self._tensorboard = None
    if not self.active:
      return
    fs.makedirs(workdir)
    # A resumed run continues the same file.
    self._file = fs.AppendFile(self.path, upload_every=UPLOAD_SECONDS)
    if tensorboard:
      self._tensorboard = _tensorboard_writer(fs.join(workdir, "tensorboard"))

  def _append(self, record: dict) -> None:
    self._file.write(json.dumps(record) + "\n")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes `{"step": step, name: float(value), ...}`; values may be python, numpy or jax scalars."""
    if not self.active:
      return
    values = {name: _to_float(name, value) for name, value in scalars.items()}
    self._append({"step": int(step), **values})
    if self._tensorboard is not None:
      self._tensorboard.write_scalars(int(step), values)
    if self._log_scalars:
      logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in values.items()))

  def write_images(self, step: int, images: Mapping[str, np.ndarray], columns: int | None = None) -> None:
    """Saves each uint8 `[N, H, W, C]` batch as one grid PNG (WORKDIR/images/NAME_STEP.png), also to TensorBoard.

    The grid has `columns` columns (default: a square-ish grid). The JSON line maps each name to its PNG's
    path relative to WORKDIR.
    """
    if not self.active:
      return
    record, grids = {"step": int(step)}, {}
    for name, batch in images.items():
      batch = np.asarray(jax.device_get(batch))
      if batch.ndim != 4 or batch.dtype != np.uint8:
        raise ValueError(f"images {name!r} must be uint8 [N, H, W, C], got {batch.dtype} {batch.shape}")
      grid = make_grid(batch, columns=columns or math.ceil(math.sqrt(len(batch))))
      filename = f"{name.replace('/', '_')}_{int(step):08d}.png"
      png = io.BytesIO()
      Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(png, format="PNG")
      fs.write_bytes(fs.join(self.workdir, "images", filename), png.getvalue())
      record[name] = f"images/{filename}"
      grids[name] = grid
    self._append(record)
    if self._tensorboard is not None:
      self._tensorboard.write_images(int(step), grids)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """A flat {key: value} mapping (e.g. the run's config) for TensorBoard's HParams dashboard."""
    if self.active and self._tensorboard is not None:
      self._tensorboard.write_hparams(hparams)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
