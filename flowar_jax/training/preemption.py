"""Preemption: SIGTERM (how TPU VMs, GKE and Slurm announce it) becomes "checkpoint now, then exit".

The loop asks `reached(step)` after every step. On one process a SIGTERM handler sets a flag, and the
loop saves the current step and raises `Preempted`. Across processes every host must save the same step:
when JAX's distributed runtime is up with its preemption service (the default after
`jax.distributed.initialize`), that service catches the signal (on any host; one is enough) and agrees on
the step with all hosts, and `reached` asks it instead. The service collects the counter each host last
passed to it, and answers True at exactly the largest one plus one; hosts a step apart when the signal
comes therefore still stop together. `reached` passes it a count of its own calls in this process rather
than the step: every host makes the same calls, and a count that starts at 1 reaches the agreed point
even when the signal came before the loop's first step (a resumed run starts at step N > 1, or a second
stage restarts at step 1 after the first reached N). A second SIGTERM while the checkpoint is written
changes nothing; the scheduler's SIGKILL after its grace period loses at most that checkpoint, and the one
before is intact.

The command line exits with `EXIT_CODE` (143 = 128 + SIGTERM, what a shell reports for a process ended by
SIGTERM) so that schedulers restart the job instead of marking it done; rerunning the same command resumes.
"""
from __future__ import annotations

import itertools
import signal
import threading
import types

import jax
from absl import logging
from jax.experimental import multihost_utils

EXIT_CODE = 128 + signal.SIGTERM
_SERVICE_CALLS = itertools.count(1)  # calls to the preemption service by this process, in every loop


class Preempted(Exception):
  """Training stopped on a preemption notice after committing the checkpoint of `step`."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted: saved the checkpoint of step {step} in {directory}; run the same command "
                     f"to resume")
    self.step, self.directory = step, directory


def _distributed_service_running() -> bool:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  state = distributed.global_state
  return state.client is not None and state.preemption_sync_manager is not None


class PreemptionWatcher:
  """Context manager: while open, SIGTERM requests a checkpoint-and-exit at the next `reached(step)`."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._signals = signals
    self._previous: dict[int, object] = {}
    self._requested = False
    self._use_service = False

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:  # pylint: disable=unused-argument
    if not self._requested:
      logging.warning("received %s: saving a checkpoint after this step, then exiting",
                      signal.Signals(signum).name)
    self._requested = True

  def start(self) -> PreemptionWatcher:
    """Starts watching (installs the handler); returns self."""
    if jax.process_count() > 1:
      self._use_service = _distributed_service_running()
      if not self._use_service:  # a local flag could make hosts save different steps and hang
        logging.warning("JAX's preemption service is off (jax_enable_preemption_service): SIGTERM keeps its "
                        "default action and no checkpoint is written on preemption")
      return self  # otherwise the service owns the signal and synchronises the hosts
    if threading.current_thread() is not threading.main_thread():
      logging.info("not on the main thread: SIGTERM keeps its default action (no checkpoint on preemption)")
      return self
    for signum in self._signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def stop(self) -> None:
    """Restores the handlers that were there before `start`."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def __enter__(self) -> PreemptionWatcher:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  @property
  def requested(self) -> bool:
    return self._requested

  def reached(self, step: int) -> bool:
    """True when training should save `step` and stop (on every host at the same step)."""
    if self._use_service:
      return multihost_utils.reached_preemption_sync_point(next(_SERVICE_CALLS))
    return self._requested
