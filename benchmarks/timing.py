"""Timing and reporting shared by the benchmarks, free of JAX and torch imports (the official-code benchmark
runs in a torch-only environment)."""
from __future__ import annotations

import json
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
  """Prints `figures` as one JSON line (what `versus_official.py` reads), and writes them to `path` if given."""
  print(json.dumps(figures), flush=True)
  if path:
    with open(path, "w") as f:
      json.dump(figures, f, indent=1)
