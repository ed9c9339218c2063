"""Damaged checkpoints: restoring warns, names the step and the evidence, and takes the newest good one; a
storage failure is retried and then stops, never rolling back; good checkpoints are never deleted before a
newer one is committed, even when the writer is killed mid-save."""
from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from gcsfs.retry import HttpError

from flowar_jax.runs.checkpoint_damage import RetryPolicy, damage_shown_by
from flowar_jax.runs.checkpointing import (Checkpointer, CheckpointMismatchError, CheckpointStorageError,
                                               UnreadableCheckpointError, restore_params_only)
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


def _garble(path):
  size = os.path.getsize(path)
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(size))


# How a step directory is damaged -> what the warning must say about it (the evidence, not just "failed").
DAMAGE = {
    "no commit marker": (lambda d: os.remove(os.path.join(d, "commit_success.txt")), "commit_success.txt"),
    "array files truncated": (lambda d: [_truncate(p) for p in _array_files(d)], "is truncated (7 bytes"),
    "array files deleted": (lambda d: [os.remove(p) for p in _array_files(d)], "is missing"),
    "array files garbled": (lambda d: [_garble(p) for p in _array_files(d)], "does not decode"),
    "array store manifest deleted": (lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
                                     "state/manifest.ocdbt is missing"),
    "tree metadata truncated": (lambda d: _truncate(os.path.join(d, "state", "_METADATA")), "undecodable JSON"),
    "tree metadata deleted": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")), "no _METADATA"),
    "sharding metadata truncated": (lambda d: _truncate(os.path.join(d, "state", "_sharding")), "does not decode"),
    "state item deleted": (lambda d: shutil.rmtree(os.path.join(d, "state")), "no 'state' item"),
    "iterator state truncated": (lambda d: _truncate(os.path.join(d, "data", "process_0-of-1.json"), 3),
                                 "undecodable JSON"),
    "iterator state deleted": (lambda d: os.remove(os.path.join(d, "data", "process_0-of-1.json")),
                               "data/process_0-of-1.json is missing"),
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


# ----------------------------------------------------------------------------- storage failures

FAST = RetryPolicy(attempts=4, first_delay_s=0.01, max_delay_s=0.02)

STORAGE_FAILURES = {  # what gcsfs, TensorStore and the OS raise when the storage, not the checkpoint, fails
    "connection reset": lambda d: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "timeout": lambda d: TimeoutError("The read operation timed out"),
    "disk I/O error": lambda d: OSError(errno.EIO, "Input/output error", f"{d}/3/state/_METADATA"),
    "gcsfs 503": lambda d: HttpError({"code": 503, "message": "Service Unavailable"}),
    "gcsfs 429": lambda d: HttpError({"code": 429, "message": "rate limit exceeded"}),
    "TensorStore UNAVAILABLE": lambda d: ValueError(
        f'UNAVAILABLE: Error reading "gs://bucket/run/3/state/manifest.ocdbt": HTTP response code: 503'),
    "TensorStore DEADLINE_EXCEEDED": lambda d: ValueError("DEADLINE_EXCEEDED: Error reading local file"),
    "TensorStore reset beside NOT_FOUND": lambda d: ValueError(
        f'NOT_FOUND: Error reading local file "{d}/3/state/d/x": CURL error[56] Connection reset by peer'),
    # No evidence of damage: the file said to be missing is there.
    "NOT_FOUND of a file that exists": lambda d: ValueError(
        f'NOT_FOUND: Error reading local file "{d}/3/state/_METADATA"'),
    "damage-like error caused by a timeout": lambda d: _caused_by(json.JSONDecodeError("Expecting value", "", 0),
                                                                  TimeoutError("timed out")),
}


def _caused_by(error, cause):
  error.__cause__ = cause
  return error


def _failing(monkeypatch, cls, method, error, times):
  """Makes `cls.method` raise `error` on its first `times` calls (all calls: None); returns the steps asked."""
  original, asked = getattr(cls, method), []

  def flaky(self, step, *args, **kwargs):
    asked.append(step)
    if times is None or len(asked) <= times:
      raise error
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(cls, method, flaky)
  return asked


@pytest.mark.parametrize("failure", list(STORAGE_FAILURES))
def test_a_storage_failure_is_retried_and_the_latest_step_restored(tmp_path, failure, monkeypatch, caplog):
  directory = str(tmp_path)
  _write_steps(directory)
  asked = _failing(monkeypatch, ocp.CheckpointManager, "restore", STORAGE_FAILURES[failure](directory), times=2)
  with caplog.at_level("WARNING"), Checkpointer(directory, read_retry=FAST) as checkpointer:
    restored = checkpointer.restore(_abstract(), data_iterator=_iterator())
  assert int(restored.step) == 3 and asked == [3, 3, 3]  # two failures, then read; never step 2
  _assert_trees_equal(restored.params, _params(seed=3))
  messages = [r.getMessage() for r in caplog.records]
  assert not [m for m in messages if "damaged" in m], messages
  retries = [m for m in messages if "checkpoint 3" in m and "without evidence of damage" in m and "retrying" in m]
  assert len(retries) == 2, messages


def test_a_storage_outage_stops_with_an_error_and_never_falls_back(tmp_path, monkeypatch, caplog):
  directory = str(tmp_path)
  _write_steps(directory)
  before = sorted(os.walk(directory))
  asked = _failing(monkeypatch, ocp.CheckpointManager, "restore",
                   ValueError('UNAVAILABLE: Error reading "gs://b/3/state": HTTP response code: 503'), times=None)
  iterator = _iterator()
  with caplog.at_level("WARNING"), Checkpointer(directory, read_retry=FAST) as checkpointer:
    with pytest.raises(CheckpointStorageError) as error:
      checkpointer.restore(_abstract(), data_iterator=iterator)
  message = str(error.value)
  assert asked == [3] * FAST.attempts  # retried, and step 2 never read
  assert f"checkpoint 3 in {directory!r}" in message and "UNAVAILABLE" in message
  assert "storage problem" in message and "not a damaged checkpoint" in message and "no older checkpoint" in message
  assert not [r for r in caplog.records if "damaged" in r.getMessage() and "not a damaged" not in r.getMessage()]
  np.testing.assert_array_equal(next(iterator), next(_iterator()))  # the iterator was not moved
  assert sorted(os.walk(directory)) == before  # nothing deleted or replaced
  monkeypatch.undo()  # the storage is back: the same call reads step 3
  with Checkpointer(directory, keep=5) as checkpointer:
    _assert_trees_equal(checkpointer.restore(_abstract()).params, _params(seed=3))


def test_sampling_and_config_reads_stop_on_a_storage_outage(tmp_path, monkeypatch):
  directory = str(tmp_path)
  _write_steps(directory)
  outage = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
  asked = _failing(monkeypatch, ocp.PyTreeCheckpointHandler, "metadata", outage, times=None)
  with pytest.raises(CheckpointStorageError, match="checkpoint 3 .*ConnectionResetError"):
    restore_params_only(directory, jax.eval_shape(lambda: _params()), read_retry=FAST)
  assert len(asked) == FAST.attempts
  _failing(monkeypatch, ocp.CheckpointManager, "item_metadata", outage, times=None)
  with Checkpointer(directory, read_retry=FAST) as checkpointer, pytest.raises(CheckpointStorageError):
    checkpointer.restore_config()


def test_a_failing_disk_is_not_a_missing_commit_marker(tmp_path, monkeypatch, caplog):
  """`os.path.exists` says False on EIO; the damage check must not read that as "no commit_success.txt"."""
  directory = str(tmp_path)
  _write_steps(directory)
  real_stat, failures = os.stat, []

  def stat(path, *args, **kwargs):
    if str(path).endswith(os.path.join("3", "commit_success.txt")) and len(failures) < 2:
      failures.append(path)
      raise OSError(errno.EIO, "Input/output error", str(path))
    return real_stat(path, *args, **kwargs)

  monkeypatch.setattr(os, "stat", stat)
  with caplog.at_level("WARNING"), Checkpointer(directory, read_retry=FAST) as checkpointer:
    restored = checkpointer.restore(_abstract())
  assert len(failures) == 2 and int(restored.step) == 3
  assert not [r for r in caplog.records if "damaged" in r.getMessage()]


def test_evidence_decides_damage(tmp_path):
  step_dir = str(tmp_path / "3")
  os.makedirs(os.path.join(step_dir, "state", "d"))
  with open(os.path.join(step_dir, "state", "d", "short"), "wb") as f:
    f.write(b"x" * 7)
  with open(os.path.join(step_dir, "state", "_METADATA"), "wb") as f:  # named by a STORAGE_FAILURES case
    f.write(b"{}")
  missing, short = f"{step_dir}/state/d/gone", f"{step_dir}/state/d/short"
  assert damage_shown_by(ValueError(f'NOT_FOUND: Error reading local file "{missing}"'), step_dir) == \
      "state/d/gone is missing"
  assert damage_shown_by(ValueError(f'NOT_FOUND: Error reading local file "{short}"'), step_dir) is None
  range_error = 'OUT_OF_RANGE: Error reading Byte range [0, {}) of local file "{}": not valid for value of size 7'
  assert "state/d/short is truncated (7 bytes" in damage_shown_by(ValueError(range_error.format(628, short)), step_dir)
  assert damage_shown_by(ValueError(range_error.format(5, short)), step_dir) is None  # the file is long enough
  assert damage_shown_by(FileNotFoundError(errno.ENOENT, "No such file", missing), step_dir) == \
      "state/d/gone is missing"
  outside = str(tmp_path / "elsewhere")
  assert damage_shown_by(FileNotFoundError(errno.ENOENT, "No such file", outside), step_dir) is None
  assert "undecodable JSON" in damage_shown_by(json.JSONDecodeError("Expecting value", "", 0), step_dir)
  assert damage_shown_by(ValueError("DATA_LOSS: Error decoding manifest"), step_dir).startswith("its data does not")
  for name, make in STORAGE_FAILURES.items():
    assert damage_shown_by(make(str(tmp_path)), step_dir) is None, name
  assert damage_shown_by(RuntimeError("something unexpected"), step_dir) is None  # unsure: not damage


def test_retry_policy_delays_double_up_to_the_cap():
  assert list(RetryPolicy(attempts=5, first_delay_s=1, max_delay_s=5).delays()) == [1, 2, 4, 5]
  with pytest.raises(ValueError, match="attempts"):
    RetryPolicy(attempts=0)


_KILLED_WRITER = """
import os, signal, sys, time
import jax.numpy as jnp
from flowar_jax.runs.checkpointing import Checkpointer
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
