"""Skipping updates whose loss, gradients or new parameters are not finite, and stopping on a streak of them.

A single NaN batch (a corrupt image, an overflow in one step) must not poison the weights: the train step
keeps the previous params, optimizer state and EMA when anything is non-finite, and counts the skip in the
state (so the counts survive a restart). The step number and the data still advance, so the next step
sees the next batch and a new noise draw. When `max_consecutive` steps in a row are skipped, training is
diverging rather than unlucky: the loop stops with `NonFiniteError`, and since no skipped update ever
reached the state, every checkpoint it wrote is clean.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from absl import logging

# Metric names the train step reports (the loop reads them; they also land in metrics.jsonl).
SKIPPED = "nonfinite_skipped"  # skipped steps since the run began
CONSECUTIVE = "nonfinite_consecutive"  # skipped steps in a row, up to and including this one


@flax.struct.dataclass
class SkipCounts:
  total: jax.Array  # int32 []
  consecutive: jax.Array  # int32 []

  @classmethod
  def zeros(cls) -> SkipCounts:
    return cls(total=jnp.zeros((), jnp.int32), consecutive=jnp.zeros((), jnp.int32))


def all_finite(*trees: Any) -> jax.Array:
  """bool []: every floating-point leaf of every tree is finite (integer and key leaves are ignored)."""
  checks = [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(trees)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return jnp.stack(checks).all() if checks else jnp.array(True)


def keep_if(finite: jax.Array, updated: Any, previous: Any) -> Any:
  """`updated` where `finite` (a bool scalar), else `previous`, leaf by leaf (same structure)."""
  return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, previous)


def count(counts: SkipCounts, finite: jax.Array) -> SkipCounts:
  skipped = (~finite).astype(jnp.int32)
  return SkipCounts(total=counts.total + skipped, consecutive=(counts.consecutive + 1) * skipped)


class NonFiniteError(FloatingPointError):
  """Training stopped after too many consecutive non-finite steps."""


class NonFiniteMonitor:
  """Watches the skip counts a train step reports; warns on each skip and raises on a streak.

  `observe` takes the metrics of the step just dispatched but reads those of the step before, so the
  host never waits for the device and one step stays in flight; `finish` reads the last one.
  """

  def __init__(self, max_consecutive: int, *, desc: str = "train", checkpoint_dir: str = ""):
    if max_consecutive < 1:
      raise ValueError(f"max_consecutive_nonfinite_steps must be >= 1, got {max_consecutive}")
    self.max_consecutive, self.desc, self.checkpoint_dir = max_consecutive, desc, checkpoint_dir
    self._pending: tuple[int, dict] | None = None
    self._total = None  # skipped steps seen so far (None: nothing read yet)

  def observe(self, step: int, metrics: dict) -> None:
    pending, self._pending = self._pending, (step, metrics)
    if pending is not None:
      self._check(*pending)

  def finish(self) -> None:
    pending, self._pending = self._pending, None
    if pending is not None:
      self._check(*pending)

  def _check(self, step: int, metrics: dict) -> None:
    total, consecutive = int(metrics[SKIPPED]), int(metrics[CONSECUTIVE])
    if consecutive and total != self._total:
      logging.warning("%s: step %d had a non-finite loss, gradient or update (loss=%s): skipped, params and "
                      "EMA unchanged (%d in a row, %d skipped in total)", self.desc, step,
                      float(metrics.get("loss", float("nan"))), consecutive, total)
    self._total = total
    if consecutive >= self.max_consecutive:
      where = f"; the checkpoints in {self.checkpoint_dir} hold no skipped update" if self.checkpoint_dir else ""
      raise NonFiniteError(
          f"{self.desc}: stopped at step {step}: {consecutive} consecutive steps had a non-finite loss, gradient "
          f"or update (config.max_consecutive_nonfinite_steps = {self.max_consecutive}){where}. Training is "
          f"diverging: lower the learning rate (or raise optimizer.grad_clip / warmup) and resume, or look for "
          f"broken input data")
