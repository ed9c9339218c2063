"""Checkpointer: exact round trips (typed keys, optax state, grain position, config), retention, errors."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from flowar_jax.runs.checkpointing import Checkpointer, checkpoint_exists, restore_params_only


@flax.struct.dataclass
class _State:  # the trainer's TrainState layout
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array


class _Net(nnx.Module):

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.dense = nnx.Linear(3, width, rngs=rngs)
    self.norm = nnx.LayerNorm(width, rngs=rngs)


def _params(width: int = 4, seed: int = 0):
  return nnx.split(_Net(width, nnx.Rngs(seed)), nnx.Param)[1]


def _init(width: int = 4, seed: int = 0) -> _State:
  params = _params(width, seed)
  ema = jax.tree.map(lambda p: p + 1.0, params)
  return _State(step=jnp.zeros((), jnp.int32), params=params, opt_state=optax.adamw(1e-3).init(params),
                ema_params=ema, rng=jax.random.key(seed))


def _trained(steps: int = 2) -> _State:
  """A state whose optimizer moments and rng differ from a fresh one."""
  state = _init()
  tx = optax.adamw(1e-2)
  for _ in range(steps):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, rng=jax.random.split(state.rng)[0])
  return state


def _abstract(width: int = 4):
  return jax.eval_shape(lambda: _init(width))


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype
    if jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
      a, e = jax.random.key_data(a), jax.random.key_data(e)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def test_save_restore_is_exact(tmp_path):
  state = _trained()
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(2, state)
    ckpt.wait()
    restored = ckpt.restore(_abstract())
  _assert_trees_equal(restored, state)
  assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  assert int(restored.step) == 2 and restored.step.dtype == jnp.int32
  # The restored key draws the same numbers as the saved one.
  np.testing.assert_array_equal(jax.random.normal(restored.rng, (3,)), jax.random.normal(state.rng, (3,)))
  assert int(restored.opt_state[0].count) == 2


def _on_host(tree):
  """numpy copies of every leaf (typed keys as their key data)."""
  def host(x):
    return np.array(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
  return jax.tree.map(host, tree)


def test_async_save_survives_donation(tmp_path):
  # The trainer donates the state right after `save` returns; the checkpoint must still hold the old values.
  state = _trained()
  expected = _on_host(state)
  ckpt = Checkpointer(str(tmp_path), async_save=True)
  ckpt.save(1, state)
  params_plus_one = jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(state.params)
  ckpt.close()
  restored = Checkpointer(str(tmp_path)).restore(_abstract())
  _assert_trees_equal(_on_host(restored), expected)
  assert not np.array_equal(_on_host(params_plus_one)["dense"]["kernel"][...], expected.params["dense"]["kernel"][...])


def test_restore_onto_requested_sharding(tmp_path):
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("data",))
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, {"w": jnp.arange(8.0 * len(devices)).reshape(len(devices), 8)})
    ckpt.wait()
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    abstract = {"w": jax.ShapeDtypeStruct((len(devices), 8), jnp.float32, sharding=sharding)}
    restored = ckpt.restore(abstract)
  assert restored["w"].sharding == sharding
  np.testing.assert_array_equal(restored["w"], np.arange(8.0 * len(devices)).reshape(len(devices), 8))


def test_resume_picks_latest_and_keep_limits(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=2)
  assert ckpt.latest_step() is None and not checkpoint_exists(str(tmp_path))
  for step in (1, 2, 3):
    ckpt.save(step, _init(seed=step).replace(step=jnp.int32(step)))
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["2", "3"]
  reopened = Checkpointer(str(tmp_path), keep=2)
  assert reopened.all_steps() == [2, 3] and reopened.latest_step() == 3
  assert checkpoint_exists(str(tmp_path))
  assert int(reopened.restore(_abstract()).step) == 3
  older = reopened.restore(_abstract(), step=2)
  _assert_trees_equal(older.params, _params(seed=2))
  with pytest.raises(FileNotFoundError, match="step 1 "):
    reopened.restore(_abstract(), step=1)
  reopened.close()


def test_in_flight_save_is_not_latest(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  big = {"w": jnp.ones((512, 1024))}
  ckpt.save(7, big)
  # Until committed, step 7 exists only as a temporary directory and does not count.
  if any(".orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path)):
    assert ckpt.latest_step() is None
  ckpt.wait()
  assert ckpt.latest_step() == 7
  ckpt.close()


def test_saving_an_existing_step_is_skipped_unless_forced(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(5, _init(seed=1))
  ckpt.save(5, _init(seed=2))  # skipped: step 5 is kept as first saved
  ckpt.wait()
  _assert_trees_equal(ckpt.restore(_abstract()).params, _params(seed=1))
  ckpt.save(5, _init(seed=2), force=True)
  ckpt.wait()
  _assert_trees_equal(ckpt.restore(_abstract()).params, _params(seed=2))
  ckpt.close()


def test_grain_iterator_position_round_trip(tmp_path):
  it = _iterator()
  for _ in range(3):
    next(it)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(3, _init(), data_iterator=it)
  expected_next = next(it)  # advancing right after save must not change what was saved
  for _ in range(5):
    next(it)
  ckpt.close()

  fresh = _iterator()
  reopened = Checkpointer(str(tmp_path))
  reopened.restore(_abstract(), data_iterator=fresh)
  np.testing.assert_array_equal(next(fresh), expected_next)
  assert not np.array_equal(expected_next, next(_iterator()))  # the check is not vacuous
  reopened.close()


def test_restore_without_saved_iterator_leaves_it_untouched(tmp_path):
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _init())
    ckpt.wait()
    it = _iterator()
    ckpt.restore(_abstract(), data_iterator=it)
  np.testing.assert_array_equal(next(it), next(_iterator()))


def test_shape_mismatch_names_parameter_and_shapes(tmp_path):
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _init(width=4))
    ckpt.wait()
    with pytest.raises(ValueError) as error:
      ckpt.restore(_abstract(width=5))
  message = str(error.value)
  # params come before opt_state and ema_params in the state, and dense before norm.
  assert "'params.dense.bias'" in message
  assert "(4,)" in message and "(5,)" in message
  assert "checkpoint 1" in message


def test_structure_mismatch_lists_missing_and_unexpected_keys(tmp_path):
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, {"a": jnp.ones(2), "b": jnp.ones(3)})
    ckpt.wait()
    abstract = {"a": jax.ShapeDtypeStruct((2,), jnp.float32), "c": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(ValueError, match=r"missing from the checkpoint: c; in the checkpoint but not expected: b"):
      ckpt.restore(abstract)


def test_restore_from_empty_directory_raises(tmp_path):
  empty = tmp_path / "nothing_here"
  ckpt = Checkpointer(str(empty))
  with pytest.raises(FileNotFoundError, match="nothing_here"):
    ckpt.restore(_abstract())
  with pytest.raises(FileNotFoundError, match="nothing_here"):
    restore_params_only(str(empty), _params())
  assert not empty.exists()  # looking did not create it
  ckpt.close()


def test_config_round_trip(tmp_path):
  config = ml_collections.ConfigDict({"lr": 1e-3, "name": "x", "scales": (1, 2, 4),
                                      "model": {"depth": 2, "flag": True, "none": None}})
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _init(), config=config)
    ckpt.save(2, _init())
    ckpt.wait()
    assert ckpt.restore_config(step=2) is None
    restored = ckpt.restore_config(step=1)
  assert isinstance(restored, ml_collections.ConfigDict)
  assert restored.to_dict() == {"lr": 1e-3, "name": "x", "scales": [1, 2, 4],
                                "model": {"depth": 2, "flag": True, "none": None}}


def test_project_config_round_trip(tmp_path, tiny):
  from flowar_jax.config import config_from_dict
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _init(), config=tiny)
    ckpt.wait()
    restored = config_from_dict(ckpt.restore_config().to_dict())
  assert restored.to_dict() == tiny.to_dict()


@pytest.mark.parametrize("use_ema", [True, False])
def test_restore_params_only(tmp_path, use_ema):
  state = _trained()
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(2, state)
  abstract_params = nnx.split(nnx.eval_shape(lambda: _Net(4, nnx.Rngs(0))), nnx.Param)[1]
  params = restore_params_only(str(tmp_path), abstract_params, use_ema=use_ema)
  _assert_trees_equal(params, state.ema_params if use_ema else state.params)
  model = nnx.merge(nnx.split(_Net(4, nnx.Rngs(9)), nnx.Param)[0], params)
  expected = state.ema_params if use_ema else state.params
  np.testing.assert_array_equal(model.dense.kernel[...], expected["dense"]["kernel"][...])


def test_restore_params_only_shape_mismatch(tmp_path):
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _init(width=4))
  abstract_params = jax.eval_shape(lambda: _params(width=6))
  with pytest.raises(ValueError, match=r"'ema_params.dense.bias' has shape \(4,\) in the checkpoint but \(6,\)"):
    restore_params_only(str(tmp_path), abstract_params)


def test_save_in_flight_is_committed_when_the_script_exits_without_close(tmp_path):
  script = ("import jax.numpy as jnp\n"
            "from flowar_jax.runs.checkpointing import Checkpointer\n"
            f"Checkpointer({str(tmp_path)!r}).save(1, {{'w': jnp.ones((1024, 1024))}})\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo)
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.listdir(tmp_path) == ["1"]
  restored = Checkpointer(str(tmp_path)).restore({"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)})
  np.testing.assert_array_equal(restored["w"], np.ones((1024, 1024), np.float32))


def test_reader_sees_new_steps_and_leaves_a_writers_temporary_files_alone(tmp_path):
  reader = Checkpointer(str(tmp_path))
  assert reader.latest_step() is None
  with Checkpointer(str(tmp_path)) as writer:
    writer.save(1, _init(seed=1))
  in_progress = tmp_path / "2.orbax-checkpoint-tmp"  # as a live run's save in flight looks
  in_progress.mkdir()
  _assert_trees_equal(reader.restore(_abstract()).params, _params(seed=1))
  assert Checkpointer(str(tmp_path)).latest_step() == 1
  assert in_progress.exists()
  reader.close()
  # A writer starting in the directory (a resumed run) clears what a crashed save left behind.
  with Checkpointer(str(tmp_path)) as writer:
    writer.save(3, _init())
  assert sorted(os.listdir(tmp_path)) == ["1", "3"]
