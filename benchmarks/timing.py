"""Timing and reporting shared by the benchmarks, free of JAX and torch imports (the official-code benchmark
runs in a torch-only environment)."""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
  """Median wall time of `fn()` (which must block until its result is ready) after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def report(figures: dict, path: str | None = None) -> None:
  """Prints `figures` as one JSON line (what `versus_official.py` reads), and writes them to `path` if given.

  Adds the machine's 1-minute load average at the end of the run (`load_1m`): above the number of cores, other
  processes shared the CPU during the timing."""
  figures = dict(figures, load_1m=round(os.getloadavg()[0], 2))
  print(json.dumps(figures), flush=True)
  if path:
    with open(path, "w") as f:
      json.dump(figures, f, indent=1)
