"""One worker thread that owns the compiled samplers: requests wait in a bounded queue and run one at a time.

Every batch has the same size (the last one of a request is padded), so each sampler is one compiled
program whatever a request asks for, and memory use does not grow with the number of users: a full queue
answers "busy" instead of growing.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Callable, Mapping

import numpy as np

# labels int32 [B], seed, index of the first sample -> uint8 images [B, H, W, 3]
SampleFn = Callable[[np.ndarray, int, int], np.ndarray]


class Busy(Exception):
  """The queue is full."""


@dataclasses.dataclass
class _Job:
  labels: np.ndarray
  seed: int
  cfg: float
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  images: np.ndarray | None = None
  error: BaseException | None = None


class SamplerWorker:
  """`worker.sample(labels, seed, cfg)` -> uint8 images `[N, H, W, 3]`, run by `samplers[cfg]` on the worker thread
  in batches of `batch_size`; sample i draws its noise from (seed, i), as `sample` does."""

  def __init__(self, samplers: Mapping[float, SampleFn], batch_size: int, max_queue: int = 64):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.samplers = dict(samplers)
    self.batch_size = batch_size
    self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
    self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
    self._thread.start()

  def warm_up(self) -> None:
    """Compiles (or loads) every sampler's program before the first request."""
    for cfg in self.samplers:
      self.sample(np.zeros((1,), np.int32), 0, cfg)

  def sample(self, labels: np.ndarray, seed: int, cfg: float, timeout: float | None = None) -> np.ndarray:
    if cfg not in self.samplers:
      raise ValueError(f"no sampler for cfg {cfg}")
    job = _Job(np.asarray(labels, np.int32), int(seed), cfg)
    try:
      self._jobs.put_nowait(job)
    except queue.Full as e:
      raise Busy(f"{self._jobs.maxsize} requests are already waiting; try again shortly") from e
    if not job.done.wait(timeout):
      raise TimeoutError(f"the sampler did not answer within {timeout} s")
    if job.error is not None:
      raise job.error
    return job.images

  def close(self) -> None:
    self._jobs.put(None)
    self._thread.join()

  def _loop(self) -> None:
    while (job := self._jobs.get()) is not None:
      try:
        job.images = self._run(job)
      except Exception as e:  # pylint: disable=broad-except  # handed to the waiting request
        job.error = e
      finally:
        job.done.set()

  def _run(self, job: _Job) -> np.ndarray:
    sampler, out = self.samplers[job.cfg], []
    for start in range(0, len(job.labels), self.batch_size):
      chunk = job.labels[start:start + self.batch_size]
      out.append(sampler(np.resize(chunk, self.batch_size), job.seed, start)[:len(chunk)])
    return np.concatenate(out)
