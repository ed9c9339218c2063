"""Non-finite steps: the update is skipped and counted, params / optimizer state / EMA stay clean, a streak stops."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from flowar_jax.models.params import split_params
from flowar_jax.runs.checkpointing import Checkpointer
from flowar_jax.training import loop, nonfinite
from flowar_jax.training.state import init_train_state, make_train_step


class _Regressor(nnx.Module):

  def __init__(self, seed: int = 0):
    self.dense = nnx.Linear(4, 2, rngs=nnx.Rngs(seed))


def _loss(model, batch, rng, context, step):  # pylint: disable=unused-argument
  loss = jnp.mean((model.dense(batch["x"]) - batch["y"]) ** 2)
  return loss, {}


def _batches(nan_steps=()):
  """Batch i (step i + 1) of a fixed regression problem; NaN inputs at the given (1-based) steps."""
  rng = np.random.default_rng(0)
  step = 0
  while True:
    step += 1
    x = rng.normal(size=(8, 4)).astype(np.float32)
    if step in nan_steps:
      x[3, 1] = np.nan
    yield {"x": x, "y": np.ones((8, 2), np.float32)}


def _train(workdir, num_steps, nan_steps=(), max_consecutive=3):
  tx = optax.adamw(1e-2)
  return loop.train(workdir=str(workdir), model_factory=_Regressor, loss_fn=_loss, tx=tx,
                    schedule=optax.constant_schedule(1e-2), ema_decay=0.9, data_iterator=_batches(nan_steps),
                    num_steps=num_steps, config=ml_collections.ConfigDict({"name": "test"}), seed=0,
                    checkpoint_every=1, keep=10, log_every=1, max_consecutive_nonfinite=max_consecutive)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _restore(directory, step):
  abstract = jax.eval_shape(lambda: init_train_state(_Regressor(), optax.adamw(1e-2), 0))
  with Checkpointer(directory) as checkpointer:
    return checkpointer.restore(abstract, step=step)


def test_nan_batches_are_skipped_and_the_state_stays_clean(tmp_path):
  _, clean = _train(tmp_path / "clean", 2)
  _, state = _train(tmp_path / "nan", 4, nan_steps=(3, 4))
  assert int(state.step) == 4
  assert int(state.skipped.total) == 2 and int(state.skipped.consecutive) == 2
  # Steps 3 and 4 changed nothing: params, optimizer moments and EMA are those after step 2, bit for bit.
  for name in ("params", "opt_state", "ema_params"):
    for a, b in zip(_leaves(getattr(state, name)), _leaves(getattr(clean, name))):
      np.testing.assert_array_equal(a, b, err_msg=name)
  # The counts are checkpointed, and the metrics log shows the skipped steps with their NaN loss.
  restored = _restore(str(tmp_path / "nan" / "checkpoints"), 4)
  assert int(restored.skipped.total) == 2 and int(restored.skipped.consecutive) == 2
  with open(tmp_path / "nan" / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]  # Python's json reads NaN
  assert [r[nonfinite.SKIPPED] for r in lines] == [0, 0, 1, 2]
  assert np.isnan(lines[2]["loss"]) and np.isfinite(lines[1]["loss"])


def test_a_finite_step_resets_the_streak(tmp_path):
  _, state = _train(tmp_path, 5, nan_steps=(2, 3, 5), max_consecutive=3)
  assert int(state.skipped.total) == 3 and int(state.skipped.consecutive) == 1
  assert all(np.isfinite(x).all() for x in _leaves((state.params, state.ema_params, state.opt_state)))


def test_a_streak_stops_training_with_the_step_and_count(tmp_path, caplog):
  with caplog.at_level("WARNING"), pytest.raises(nonfinite.NonFiniteError) as error:
    _train(tmp_path, 10, nan_steps=(3, 4, 5, 6, 7), max_consecutive=3)
  message = str(error.value)
  assert "stopped at step 5" in message and "3 consecutive steps" in message
  assert "max_consecutive_nonfinite_steps = 3" in message
  assert any("step 3 had a non-finite loss" in r.getMessage() for r in caplog.records)
  directory = str(tmp_path / "checkpoints")
  with Checkpointer(directory) as checkpointer:
    steps = checkpointer.all_steps()
  assert steps and max(steps) <= 6  # stopped right away, not at step 10
  for step in steps:  # every checkpoint written holds clean weights
    state = _restore(directory, step)
    assert all(np.isfinite(x).all() for x in _leaves((state.params, state.ema_params, state.opt_state)))
  for a, b in zip(_leaves(_restore(directory, max(steps)).params), _leaves(_restore(directory, 2).params)):
    np.testing.assert_array_equal(a, b)  # the skipped steps 3.. left the weights of step 2


def test_an_update_that_overflows_the_params_is_skipped():
  """Finite loss and gradients, but a learning rate that sends the params to inf: still skipped."""
  model = _Regressor()
  tx = optax.sgd(1e38)
  graphdef, _ = split_params(model)
  state = init_train_state(model, tx, seed=0)
  before = _leaves(state.params)
  step = make_train_step(graphdef, _loss, tx, ema_decay=0.9)
  batch = {"x": np.full((8, 4), 10.0, np.float32), "y": np.full((8, 2), -10.0, np.float32)}
  state, metrics = step(state, batch, None)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert int(state.step) == 1 and int(metrics[nonfinite.SKIPPED]) == 1
  for a, b in zip(_leaves(state.params), before):
    np.testing.assert_array_equal(a, b)


def test_all_finite_ignores_integer_and_key_leaves():
  tree = {"count": jnp.int32(3), "key": jax.random.key(0), "w": jnp.ones(3)}
  assert bool(nonfinite.all_finite(tree))
  assert not bool(nonfinite.all_finite(tree, jnp.array([1.0, jnp.inf])))
  assert not bool(nonfinite.all_finite(jnp.float32(jnp.nan)))


def test_max_consecutive_must_be_positive():
  with pytest.raises(ValueError, match="max_consecutive_nonfinite_steps must be >= 1"):
    nonfinite.NonFiniteMonitor(0)
