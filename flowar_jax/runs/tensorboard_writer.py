"""TensorBoard event files without TensorFlow: a clu-style metric writer on the `tensorboard` package alone.

clu's SummaryWriter needs tensorflow for its event files; this writer builds the same summaries from
tensorboard's own protos and record format, so the `tensorboard` package (no TensorFlow) is enough for the
Scalars, Images, Text, Histograms and HParams dashboards:

  writer = TensorBoardWriter("runs/digits/tensorboard")
  writer.write_scalars(100, {"loss": 0.41})
  writer.write_images(100, {"samples": grid_uint8_HWC})
  writer.close()

It implements every method of clu's `metric_writers.interface.MetricWriter` (same names and arguments), so
clu's MultiWriter / AsyncWriter can wrap it where clu's writers import (they need tensorflow); videos and
audio are not written (logged once and skipped).

The log directory may be local or `gs://` (files go through `flowar_jax.runs.fs`). A GCS object cannot be
appended to, so events go to a series of event files of at most `file_bytes` each: the open one is rewritten
whole every `flush_secs` (and at `flush` / `close`), then the next file starts. TensorBoard reads every event
file of a directory, in name order, which is the order they were written. Locally, each event is appended
to the open file at once.
"""
from __future__ import annotations

import io
import itertools
import os
import socket
import time
from typing import Any, Mapping

import numpy as np
from absl import logging
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from flowar_jax.runs import fs

_WRITERS = itertools.count()  # tells apart the event files of writers opened in one process in one second


def _png(image: np.ndarray) -> summary_pb2.Summary.Image:
  """uint8 `[H, W, C]` (C in 1, 3, 4) -> an image summary holding its PNG."""
  if image.dtype != np.uint8:
    image = np.clip(np.round(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)
  height, width, channels = image.shape
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if channels == 1 else image).save(buffer, format="PNG")
  return summary_pb2.Summary.Image(height=height, width=width, colorspace=channels,
                                   encoded_image_string=buffer.getvalue())


def _histogram(values: np.ndarray, num_buckets: int) -> summary_pb2.HistogramProto:
  values = np.asarray(values, np.float64).reshape(-1)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return summary_pb2.HistogramProto()
  counts, edges = np.histogram(values, bins=num_buckets)
  return summary_pb2.HistogramProto(min=float(values.min()), max=float(values.max()), num=float(values.size),
                                    sum=float(values.sum()), sum_squares=float(np.dot(values, values)),
                                    bucket_limit=edges[1:].tolist(), bucket=counts.astype(np.float64).tolist())


def _hparam_value(value: Any) -> bool | int | float | str:
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  return str(value)  # tuples (e.g. model.scales) and anything else: shown as text


class _EventFiles:
  """Event files `events.out.tfevents.<time>.<host>.<pid>.<writer>.<part>` in `logdir`, a new part each time
  the open one reaches `file_bytes`; each starts with the file-version event TensorBoard expects."""

  def __init__(self, logdir: str, flush_secs: float, file_bytes: int):
    self._logdir, self._flush_secs, self._file_bytes = logdir, flush_secs, file_bytes
    self._prefix = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                    f"{next(_WRITERS):04d}")  # zero-padded: TensorBoard reads the files in name order
    self._part = 0
    self._open()

  def _open(self) -> None:
    self._file = fs.AppendFile(fs.join(self._logdir, f"{self._prefix}.{self._part:06d}"),
                               upload_every=self._flush_secs)
    self._records = RecordWriter(self._file)
    self._records.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

  def add_event(self, event: event_pb2.Event) -> None:
    if self._file.size >= self._file_bytes:
      self._file.close()
      self._part += 1
      self._open()
    self._records.write(event.SerializeToString())

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class TensorBoardWriter:
  """Writes TensorBoard summaries to event files in `logdir` (clu's MetricWriter interface)."""

  def __init__(self, logdir: str, *, flush_secs: float = 30.0, file_bytes: int = 4 << 20):
    """`flush_secs`: how often the open event file on GCS is uploaded; `file_bytes`: when the next file starts."""
    self.logdir = logdir
    self._events = _EventFiles(logdir, flush_secs, file_bytes)
    self._skipped: set[str] = set()

  def _add(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One point per name on the Scalars dashboard."""
    self._add(step, [summary_pb2.Summary.Value(tag=name, simple_value=float(np.asarray(value)))
                     for name, value in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Each value is `[H, W, C]` or `[N, H, W, C]` (uint8, or float in [0, 1]); a batch shows as NAME/0..N-1."""
    values = []
    for name, batch in images.items():
      batch = np.asarray(batch)
      if batch.ndim == 3:
        values.append(summary_pb2.Summary.Value(tag=name, image=_png(batch)))
      elif batch.ndim == 4:
        values.extend(summary_pb2.Summary.Value(tag=f"{name}/{i}", image=_png(image))
                      for i, image in enumerate(batch))
      else:
        raise ValueError(f"image {name!r} must be [H, W, C] or [N, H, W, C], got shape {batch.shape}")
    self._add(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Markdown snippets on the Text dashboard."""
    self._add(step, [summary_pb2.Summary.Value(
        tag=name, tensor=tensor_util.make_tensor_proto(np.array(text, dtype=object)),
        metadata=text_metadata.create_summary_metadata(display_name=name, description=""))
                     for name, text in texts.items()])

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    self._add(step, [summary_pb2.Summary.Value(
        tag=name, histo=_histogram(array, (num_buckets or {}).get(name, 30)))
                     for name, array in arrays.items()])

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None) -> None:
    """Raw tensors, each with an optional SummaryMetadata (proto or serialized bytes) for a plugin."""
    out = []
    for name, value in values.items():
      entry = summary_pb2.Summary.Value(tag=name, tensor=tensor_util.make_tensor_proto(np.asarray(value)))
      meta = (metadata or {}).get(name)
      if isinstance(meta, bytes):
        meta = summary_pb2.SummaryMetadata.FromString(meta)
      if meta is not None:
        entry.metadata.CopyFrom(meta)
      out.append(entry)
    self._add(step, out)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """A flat {name: value} mapping for the HParams dashboard (compare runs of a sweep)."""
    summary = hparams_summary.hparams_pb({name: _hparam_value(v) for name, v in hparams.items()})
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))

  def _skip(self, kind: str) -> None:
    if kind not in self._skipped:
      self._skipped.add(kind)
      logging.warning("TensorBoardWriter does not write %s; skipped", kind)

  def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:  # pylint: disable=unused-argument
    self._skip("videos")

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:  # pylint: disable=unused-argument
    self._skip("audio")

  def flush(self) -> None:
    self._events.flush()

  def close(self) -> None:
    self._events.close()
