"""Preemption and kills: SIGTERM checkpoints the current step; SIGKILL at any moment, then the same command,
gives bit for bit the run that was never interrupted."""
from __future__ import annotations

import os
import signal

import jax
import ml_collections
import numpy as np
import optax
import pytest

from flowar_jax.training import loop
from flowar_jax.training.checkpointing import Checkpointer
from flowar_jax.training.preemption import EXIT_CODE, Preempted, PreemptionWatcher
from test_nonfinite import _Regressor, _batches, _leaves, _loss


def _signalling(batches, at_step: int):
  """Yields `batches`, sending this process SIGTERM while the batch of `at_step` is being read."""
  for step, batch in enumerate(batches, start=1):
    if step == at_step:
      os.kill(os.getpid(), signal.SIGTERM)
    yield batch


def _train(workdir, num_steps, data):
  return loop.train(workdir=str(workdir), model_factory=_Regressor, loss_fn=_loss, tx=optax.adamw(1e-2),
                    schedule=optax.constant_schedule(1e-2), ema_decay=0.9, data_iterator=data, num_steps=num_steps,
                    config=ml_collections.ConfigDict({"name": "test"}), seed=0, checkpoint_every=100, keep=3,
                    log_every=1)


def test_sigterm_saves_the_current_step_and_stops(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(Preempted) as error:
    _train(tmp_path, 20, _signalling(_batches(), at_step=7))
  assert error.value.step == 7 and "step 7" in str(error.value)
  assert signal.getsignal(signal.SIGTERM) is previous  # the handler is gone after training
  with Checkpointer(str(tmp_path / "checkpoints")) as checkpointer:
    assert checkpointer.all_steps() == [7]  # not a periodic step (every 100): saved for the preemption
  # The same run, uninterrupted, has the same weights at step 7.
  _, reference = _train(tmp_path / "reference", 7, _batches())
  abstract = jax.eval_shape(lambda: reference)
  with Checkpointer(str(tmp_path / "checkpoints")) as checkpointer:
    saved = checkpointer.restore(abstract)
  for a, b in zip(_leaves((saved.params, saved.opt_state, saved.ema_params)),
                  _leaves((reference.params, reference.opt_state, reference.ema_params))):
    np.testing.assert_array_equal(a, b)


def test_watcher_restores_the_previous_handler_and_counts_one_request():
  calls = []
  previous = signal.signal(signal.SIGTERM, lambda *args: calls.append(args))
  try:
    with PreemptionWatcher() as watcher:
      assert not watcher.reached(1)
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGTERM)
      assert watcher.reached(2) and watcher.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert len(calls) == 1  # only the signal after the watcher closed reached the old handler
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert EXIT_CODE == 143
