"""Damaged checkpoints: restoring warns, names the step and the problem, and takes the newest good one; good
checkpoints are never deleted before a newer one is committed, even when the writer is killed mid-save."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowar_jax.training.checkpointing import (Checkpointer, CheckpointMismatchError, UnreadableCheckpointError,
                                               restore_params_only)
from test_checkpointing import _abstract, _assert_trees_equal, _init, _iterator, _params

# Orbax's reader leaves background tasks of a failed read that complain once its event loop has closed.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_steps(directory, steps=(1, 2, 3), keep=5):
  """Checkpoint s holds `_init(seed=s)`, the iterator advanced s batches, and a config naming s."""
  with Checkpointer(directory, keep=keep) as checkpointer:
    for step in steps:
      iterator = _iterator()
      for _ in range(step):
        next(iterator)
      checkpointer.save(step, _init(seed=step).replace(step=jnp.int32(step)), data_iterator=iterator,
                        config=ml_collections.ConfigDict({"written_at": step}))


def _truncate(path, size=7):
  with open(path, "r+b") as f:
    f.truncate(size)


def _array_files(step_dir):
  return [p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(p)]


DAMAGE = {
    "no commit marker": (lambda d: os.remove(os.path.join(d, "commit_success.txt")), "commit_success.txt"),
    "array files truncated": (lambda d: [_truncate(p) for p in _array_files(d)], "reading it failed"),
    "array files deleted": (lambda d: [os.remove(p) for p in _array_files(d)], "reading it failed"),
    "tree metadata truncated": (lambda d: _truncate(os.path.join(d, "state", "_METADATA")), "reading it failed"),
    "state item deleted": (lambda d: shutil.rmtree(os.path.join(d, "state")), "no 'state' item"),
    "iterator state truncated": (lambda d: _truncate(os.path.join(d, "data", "process_0-of-1.json"), 3),
                                 "reading it failed"),
    "empty step directory": (lambda d: [shutil.rmtree(d), os.mkdir(d)], "commit_success.txt"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_falls_back_to_the_previous(tmp_path, damage, caplog):
  directory = str(tmp_path)
  _write_steps(directory)
  corrupt, problem = DAMAGE[damage]
  corrupt(os.path.join(directory, "3"))
  checkpointer = Checkpointer(directory, keep=5)
  iterator = _iterator()
  with caplog.at_level("WARNING"):
    restored = checkpointer.restore(_abstract(), data_iterator=iterator)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("checkpoint 3" in w and "damaged" in w and problem in w for w in warnings), warnings
  assert int(restored.step) == 2
  _assert_trees_equal(restored.params, _params(seed=2))
  expected = _iterator()
  for _ in range(2):
    next(expected)
  np.testing.assert_array_equal(next(iterator), next(expected))  # the iterator comes from step 2 as well
  # Training on from step 2 saves step 3 again: the damaged one is replaced, not kept as "already saved".
  checkpointer.save(3, _init(seed=33).replace(step=jnp.int32(3)))
  checkpointer.wait()
  caplog.clear()
  with caplog.at_level("WARNING"):
    _assert_trees_equal(checkpointer.restore(_abstract()).params, _params(seed=33))
  assert not [r for r in caplog.records if "damaged" in r.getMessage()]
  checkpointer.close()


def test_sampling_and_config_reads_skip_a_damaged_latest(tmp_path):
  directory = str(tmp_path)
  _write_steps(directory)
  for path in _array_files(os.path.join(directory, "3")):
    os.remove(path)
  os.remove(os.path.join(directory, "3", "config", "metadata"))
  abstract_params = jax.eval_shape(lambda: _params())
  _assert_trees_equal(restore_params_only(directory, abstract_params, use_ema=False), _params(seed=2))
  with Checkpointer(directory) as checkpointer:
    assert checkpointer.restore_config().to_dict() == {"written_at": 2}


def test_every_checkpoint_damaged_is_an_error_naming_each(tmp_path):
  directory = str(tmp_path)
  _write_steps(directory, steps=(1, 2))
  for step in ("1", "2"):
    os.remove(os.path.join(directory, step, "commit_success.txt"))
  with Checkpointer(directory) as checkpointer, pytest.raises(UnreadableCheckpointError) as error:
    checkpointer.restore(_abstract())
  assert "step 2: it has no commit_success.txt" in str(error.value) and "step 1:" in str(error.value)
  assert directory in str(error.value)


def test_asking_for_a_damaged_step_is_an_error(tmp_path):
  directory = str(tmp_path)
  _write_steps(directory, steps=(1, 2))
  for path in _array_files(os.path.join(directory, "1")):
    os.remove(path)
  with Checkpointer(directory) as checkpointer, pytest.raises(UnreadableCheckpointError, match="step 1"):
    checkpointer.restore(_abstract(), step=1)


def test_a_config_mismatch_is_not_mistaken_for_damage(tmp_path, caplog):
  directory = str(tmp_path)
  _write_steps(directory, steps=(1, 2))
  with caplog.at_level("WARNING"), Checkpointer(directory) as checkpointer:
    with pytest.raises(CheckpointMismatchError, match="checkpoint 2 "):  # the latest, no fallback to 1
      checkpointer.restore(_abstract(width=5))
  assert not [r for r in caplog.records if "damaged" in r.getMessage()]


def test_keep_deletes_an_old_checkpoint_only_after_the_new_one_is_committed(tmp_path):
  directory = str(tmp_path)
  checkpointer = Checkpointer(directory, keep=1, async_save=True)
  checkpointer.save(1, {"w": jnp.ones((8,))})
  checkpointer.wait()
  checkpointer.save(2, {"w": jnp.ones((2048, 2048))})  # returns while the files are written
  if any(".orbax-checkpoint-tmp" in name for name in os.listdir(directory)):
    assert "1" in os.listdir(directory)
  checkpointer.wait()
  assert sorted(os.listdir(directory)) == ["2"]
  checkpointer.close()


_KILLED_WRITER = """
import os, signal, sys, time
import jax.numpy as jnp
from flowar_jax.training.checkpointing import Checkpointer
checkpointer = Checkpointer(sys.argv[1], keep=1)
checkpointer.save(1, {"w": jnp.full((8,), 1.0)})
checkpointer.wait()
checkpointer.save(2, {"w": jnp.full((4096, 4096), 2.0)})  # 64 MB, written in the background
deadline = time.time() + 60
while time.time() < deadline and not any(n.startswith("2.") for n in os.listdir(sys.argv[1])):
  time.sleep(0.001)  # until the background write has started
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_during_an_async_save_keeps_the_previous_checkpoint(tmp_path):
  directory = str(tmp_path / "checkpoints")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, directory], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  names = os.listdir(directory)
  assert any(name.startswith("2.orbax-checkpoint-tmp") for name in names), names  # killed mid-write
  assert "1" in names  # keep=1, yet step 1 is still there: step 2 never committed
  abstract = {"w": jax.ShapeDtypeStruct((8,), jnp.float32)}
  with Checkpointer(directory, keep=1) as checkpointer:
    assert checkpointer.all_steps() == [1]
    np.testing.assert_array_equal(checkpointer.restore(abstract)["w"], np.ones(8))
    checkpointer.save(2, {"w": jnp.zeros((8,))})  # the resumed run clears the leftovers and saves again
  assert sorted(os.listdir(directory)) == ["2"]
