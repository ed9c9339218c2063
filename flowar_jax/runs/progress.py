"""Progress reporting: a tqdm bar in a terminal, plain periodic lines in logs (CI, redirected output).

A redirected tqdm bar fills log files with carriage returns, so when the stream is not a terminal each
update becomes one line instead, e.g.

  flowar: step 120/2000 (6%) loss=0.123 grad_norm=1.05 | 3.21 steps/s, eta 9m45s

Only process 0 reports, so multi-host logs don't repeat every line per host.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Mapping, TextIO

import jax
from tqdm import tqdm


def format_duration(seconds: float) -> str:
  """12s, 3m12s, 2h05m, 1d03h."""
  seconds = max(0, int(round(seconds)))
  minutes, secs = divmod(seconds, 60)
  hours, minutes = divmod(minutes, 60)
  days, hours = divmod(hours, 24)
  if days:
    return f"{days}d{hours:02d}h"
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def _format_metrics(metrics: Mapping[str, Any]) -> str:
  parts = []
  for name, value in metrics.items():
    try:
      parts.append(f"{name}={float(value):.4g}")
    except (TypeError, ValueError):
      parts.append(f"{name}={value}")
  return " ".join(parts)


class Progress:
  """Reports `update(step, metrics)` calls against `total` steps, with throughput and ETA."""

  def __init__(self, total: int, *, initial: int = 0, desc: str = "", every: int = 1, unit: str = "step",
               stream: TextIO | None = None, tty: bool | None = None):
    """Starts the bar (terminal) or the line reporter (anything else) on process 0.

    Args:
      total: the step at which the work is done.
      initial: the step it starts from (e.g. when resuming).
      desc: a prefix naming the work ("vae", "flowar", "sample").
      every: in line mode, print when at least this many steps passed since the last line (and always
        at `total`); the caller decides how often it calls `update`.
      unit: what a step is called in lines and the bar.
      stream: where to write; default stdout.
      tty: force the bar (True) or lines (False); default: whether `stream` is a terminal.
    """
    if every < 1:
      raise ValueError(f"every must be >= 1, got {every}")
    self.total, self.desc, self.every, self.unit = total, desc, every, unit
    self.active = jax.process_index() == 0
    self._stream = stream if stream is not None else sys.stdout
    self._tty = self._stream.isatty() if tty is None else tty
    self._bar = None
    self._printed = initial
    self._pending = ""  # the last line computed but not printed
    # Throughput is measured from the first update on, so the first step's compile time doesn't skew it.
    self._start = (initial, time.perf_counter())
    self._first_update: tuple[int, float] | None = None
    if self.active and self._tty:
      self._bar = tqdm(total=total, initial=initial, desc=desc or None, unit=unit, file=self._stream,
                       dynamic_ncols=True)

  def _rate(self, step: int, now: float) -> float | None:
    origin_step, origin_time = self._start
    if self._first_update is not None and step > self._first_update[0]:
      origin_step, origin_time = self._first_update
    if step <= origin_step or now <= origin_time:
      return None
    return (step - origin_step) / (now - origin_time)

  def _line(self, step: int, metrics: Mapping[str, Any], now: float) -> str:
    percent = 100.0 * step / self.total if self.total else 100.0
    head = f"{self.desc}: " if self.desc else ""
    text = f"{head}{self.unit} {step}/{self.total} ({percent:.0f}%)"
    if metrics:
      text += " " + _format_metrics(metrics)
    rate = self._rate(step, now)
    if rate is not None:
      text += f" | {rate:.3g} {self.unit}s/s"
      if step < self.total:
        text += f", eta {format_duration((self.total - step) / rate)}"
    if step >= self.total:
      text += f", done in {format_duration(now - self._start[1])}"
    return text

  def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
    """Reports that work has reached `step` (absolute, not an increment), with optional scalar metrics."""
    if not self.active:
      return
    metrics = metrics or {}
    now = time.perf_counter()
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if metrics:
        self._bar.set_postfix_str(_format_metrics(metrics))
    else:
      line = self._line(step, metrics, now)
      if step - self._printed >= self.every or step >= self.total:
        self._stream.write(line + "\n")
        self._stream.flush()
        self._printed, self._pending = step, ""
      else:
        self._pending = line
    if self._first_update is None:
      self._first_update = (step, now)

  def close(self) -> None:
    """Ends the bar, or prints the last update if it was skipped by `every`."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self._pending:
      self._stream.write(self._pending + "\n")
      self._stream.flush()
      self._pending = ""

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
