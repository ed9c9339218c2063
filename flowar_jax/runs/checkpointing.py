"""Saving and restoring the train state, the data iterator's position and the config, on Orbax.

A checkpoint directory holds one sub-directory per step (`DIR/<step>/`), each with up to three items:

  state   the TrainState pytree (typed PRNG keys are stored as their key data and re-wrapped on restore)
  data    the grain iterator's state, one JSON file per process (absent when no iterator was given)
  config  the config as JSON (tuples come back as lists; `config.config_from_dict` restores them)

Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
never leaves a partial checkpoint that looks finished, and old steps are only deleted once a newer one
is committed. Before any array is read, the saved tree is compared with the expected one, so a
mismatch fails with the parameter's name and both shapes instead of deep inside Orbax.

Restoring the latest checkpoint tolerates a damaged one (files deleted or truncated, bytes that do not
decode, a step directory copied without Orbax's commit marker): it logs a warning naming the step and the
evidence of damage and takes the newest checkpoint that reads back completely. A read that fails for
any other reason (the storage is unreachable, slow, refusing, or the error shows no damage; see
`checkpoint_damage`) is retried with backoff and then stops with `CheckpointStorageError`: a storage
outage never rolls a run back to an older step. A mismatch with the expected tree is not damage either
and fails at once, since every older checkpoint of the run would mismatch too.
"""
from __future__ import annotations

import atexit
import json
import os
import threading
import time
from typing import Any, Callable

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from flowar_jax.runs.checkpoint_damage import RetryPolicy, absent, damage_shown_by, describe

_STATE, _DATA, _CONFIG = "state", "data", "config"
_MAX_LISTED = 8  # missing / unexpected keys named in an error message
_COMMIT_MARKER = "commit_success.txt"  # Orbax writes it into a step directory as the save's last file


class CheckpointMismatchError(ValueError):
  """A checkpoint's tree differs from the state it is restored into (another model config)."""


class UnreadableCheckpointError(ValueError):
  """Every checkpoint in the directory (or the one asked for) is damaged."""


class CheckpointStorageError(RuntimeError):
  """A checkpoint could not be read for a storage reason (not damage), on every try; nothing fell back."""


class _Damaged(Exception):
  """The checkpoint being read is damaged; the message is the evidence."""


def _absolute(directory: str) -> str:
  # Orbax wants absolute paths; remote paths (gs://...) already are.
  return directory if "://" in directory else os.path.abspath(os.path.expanduser(directory))


def _finalized_steps(directory: str) -> list[int]:
  # Read from disk rather than asking the manager: the manager also lists a step whose async save is
  # still running, and only committed checkpoints may count.
  return sorted(ocp.utils.checkpoint_steps(directory))


def _resolve_step(directory: str, step: int | None) -> int:
  """`step`, or the latest complete one when None; FileNotFoundError naming `directory` if absent."""
  steps = _finalized_steps(directory)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory!r}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {directory!r}; it has steps {steps}")
  return step


def _step_dir(directory: str, step: int) -> str:
  return f"{directory.rstrip('/')}/{step}"


def _damage(directory: str, step: int) -> str | None:
  """Why checkpoint `step` is visibly incomplete (without reading arrays), or None."""
  step_dir = _step_dir(directory, step)
  if absent(f"{step_dir}/{_COMMIT_MARKER}"):
    return f"it has no {_COMMIT_MARKER}, so its save never finished"
  if absent(f"{step_dir}/{_STATE}"):
    return f"it has no {_STATE!r} item"
  if absent(f"{step_dir}/{_STATE}/_METADATA"):  # Orbax's tree metadata, written with every state item
    return f"its {_STATE!r} item has no _METADATA"
  return None


def _read_step(directory: str, step: int, read: Callable[[int], Any], retry: RetryPolicy) -> Any:
  """`read(step)`; raises `_Damaged` with the evidence of damage, or after `retry`'s tries at any other
  failure, `CheckpointStorageError`."""
  delays = retry.delays()
  started = time.monotonic()
  attempt = 0
  while True:
    attempt += 1
    try:
      problem = _damage(directory, step)
      if problem is not None:
        raise _Damaged(problem)
      return read(step)
    except (CheckpointMismatchError, _Damaged):
      raise
    except Exception as error:  # pylint: disable=broad-except  # Orbax / TensorStore / gcsfs raise many types
      try:
        problem = damage_shown_by(error, _step_dir(directory, step))
      except Exception:  # pylint: disable=broad-except  # the evidence cannot be read either: storage
        problem = None
      if problem is not None:
        raise _Damaged(f"reading it failed: {problem}") from error
      if attempt == retry.attempts:
        raise CheckpointStorageError(
            f"could not read checkpoint {step} in {directory!r}: {describe(error)} (the last of {attempt} "
            f"tries over {time.monotonic() - started:.0f} s). This is a storage problem (unreachable, slow, "
            f"refusing, or failing without any sign of damage in the checkpoint), not a damaged checkpoint, so "
            f"no older checkpoint was used and nothing was changed. Run the same command again once the "
            f"storage is back; if checkpoint {step} is in fact damaged, move {_step_dir(directory, step)} "
            f"away to resume from the one before it.") from error
      delay = next(delays)
      logging.warning("reading checkpoint %d in %s failed without evidence of damage (%s), as when the storage "
                      "fails; retrying in %.3g s (try %d of %d)", step, directory, describe(error), delay,
                      attempt + 1, retry.attempts)
      time.sleep(delay)


def _read_newest_first(directory: str, step: int | None, read: Callable[[int], Any],
                       on_damaged: Callable[[int], None] = lambda step: None,
                       retry: RetryPolicy = RetryPolicy()) -> Any:
  """`read(step)`, or with `step=None` `read` of the newest checkpoint that is not damaged.

  A damaged checkpoint is skipped with a warning naming the step and the evidence, and reported to
  `on_damaged`; when `step` is given it is an error. Any other failure is retried per `retry`, then
  raises `CheckpointStorageError` without trying an older checkpoint.
  """
  candidates = [_resolve_step(directory, step)] if step is not None else _finalized_steps(directory)[::-1]
  if not candidates:
    raise FileNotFoundError(f"no checkpoint in {directory!r}")
  problems = []
  for candidate in candidates:
    try:
      return _read_step(directory, candidate, read, retry)
    except _Damaged as damaged:
      problem = str(damaged)
    problems.append(f"step {candidate}: {problem}")
    on_damaged(candidate)
    if step is None:
      logging.warning("checkpoint %d in %s is damaged: %s; trying the one before it", candidate, directory, problem)
  raise UnreadableCheckpointError(f"no readable checkpoint in {directory!r}: " + "; ".join(problems))


def checkpoint_exists(directory: str) -> bool:
  """True when `directory` holds at least one complete checkpoint."""
  return bool(_finalized_steps(_absolute(directory)))


def _is_grain_iterator(iterator: Any) -> bool:
  return isinstance(iterator, (grain.DatasetIterator, grain.DataLoaderIterator))


def _with_default_sharding(abstract: Any) -> Any:
  """Gives leaves without a sharding the first local device, where `jax.jit(init)()` would put them."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def fill(leaf):
    if getattr(leaf, "sharding", None) is not None:
      return leaf
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)

  return jax.tree.map(fill, abstract)


def _stored_shape(leaf: Any) -> tuple[int, ...]:
  """The shape Orbax stores for `leaf`: typed PRNG keys are saved as their uint32 key data."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
  return tuple(np.shape(leaf))


def _path_name(path: tuple[str, ...]) -> str:
  # nnx Variables add a trailing 'value' level; the parameter is better known without it.
  if len(path) > 1 and path[-1] == "value":
    path = path[:-1]
  return ".".join(path)


def _check_matches(saved_tree: Any, abstract: Any, where: str) -> None:
  """Raises ValueError naming the first parameter whose shape differs, and any missing/unexpected keys."""
  saved = {path: meta for path, meta in ocp.tree.to_flat_dict(saved_tree).items() if meta is not None}
  expected = ocp.tree.to_flat_dict(abstract)
  missing = [path for path in expected if path not in saved]
  unexpected = [path for path in saved if path not in expected]
  first = None
  for path, leaf in expected.items():  # tree order, so "first" means first in the state
    if path in saved and tuple(saved[path].shape) != _stored_shape(leaf):
      first = path
      break
  if first is None and not missing and not unexpected:
    return
  problems = []
  if first is not None:
    problems.append(f"parameter {_path_name(first)!r} has shape {tuple(saved[first].shape)} in the "
                    f"checkpoint but {_stored_shape(expected[first])} is expected")

  def listed(paths):
    names = [_path_name(p) for p in paths[:_MAX_LISTED]]
    more = f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
    return ", ".join(names) + more

  if missing:
    problems.append(f"missing from the checkpoint: {listed(missing)}")
  if unexpected:
    problems.append(f"in the checkpoint but not expected: {listed(unexpected)}")
  raise CheckpointMismatchError(f"{where} does not match the state to restore (was the model config changed?): "
                   + "; ".join(problems))


_OPEN: set[Checkpointer] = set()  # not yet closed; their saves in flight are finished at exit


def _finish_open_saves() -> None:
  for checkpointer in list(_OPEN):
    checkpointer.wait()


# A script that ends without close() would otherwise leave its last save uncommitted. Plain `atexit`
# runs too late: by then Python has stopped the thread pools that Orbax's background writer still
# needs; `threading._register_atexit` hooks run first (Python >= 3.9).
getattr(threading, "_register_atexit", atexit.register)(_finish_open_saves)


class Checkpointer:
  """Keeps the `keep` newest checkpoints of a training run in `directory` (created on first save).

  `read_retry` says how often and how patiently a restore retries a read that fails for a storage reason.
  """

  def __init__(self, directory: str, *, keep: int | None = 3, async_save: bool = True,
               read_retry: RetryPolicy = RetryPolicy()):
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 (or None to keep every checkpoint), got {keep}")
    self.directory = _absolute(directory)
    self._keep, self._async_save, self._read_retry = keep, async_save, read_retry
    # Reading (e.g. sampling from a run that is still training) must not disturb a writer: the writing
    # manager, which deletes old steps and a crashed save's leftovers, only starts at the first save.
    self._reader: ocp.CheckpointManager | None = None
    self._writer: ocp.CheckpointManager | None = None
    self._warned_iterator = False
    self._damaged: set[int] = set()  # steps found unreadable; saving that step again replaces them
    _OPEN.add(self)

  def _manager(self, *, write: bool = False) -> ocp.CheckpointManager:
    handlers = {_STATE: ocp.StandardCheckpointHandler(), _CONFIG: ocp.JsonCheckpointHandler(),
                _DATA: grain.checkpoint.CheckpointHandler()}
    if write and self._writer is None:
      epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
      options = ocp.CheckpointManagerOptions(
          max_to_keep=self._keep, enable_async_checkpointing=self._async_save, create=False,
          cleanup_tmp_directories=True)  # the leftovers of a save interrupted by a crash
      self._writer = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    if self._writer is not None:
      return self._writer
    if self._reader is None:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
      self._reader = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    return self._reader

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, oldest first."""
    return _finalized_steps(self.directory)

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, *, data_iterator: Any = None,
           config: ml_collections.ConfigDict | None = None, force: bool = False) -> None:
    """Starts saving `state` (and the iterator's position and the config) as checkpoint `step`.

    Returns once the arrays are copied off the device, so the caller may donate or update them; the
    files are written in the background (`wait()` blocks until they are). The iterator's position is
    taken now, so it may be advanced right away. A step that is already saved is skipped, unless
    `force`, which replaces it.
    """
    self.wait()  # one save in flight at a time; also surfaces an error of the previous one
    if step in self.all_steps():
      if step in self._damaged:
        logging.warning("replacing the damaged checkpoint %d in %s", step, self.directory)
        self._damaged.discard(step)
      elif not force:
        logging.info("checkpoint %d already in %s; not saving it again", step, self.directory)
        return
      self._manager(write=True).delete(step)
    items = {_STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      if _is_grain_iterator(data_iterator):
        items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
      elif not self._warned_iterator:
        self._warned_iterator = True
        logging.warning("%s is not a grain iterator: its position is not checkpointed, and a resumed "
                        "run starts it afresh", type(data_iterator).__name__)
    if config is not None:
      values = config.to_dict()
      json.dumps(values)  # fail here, naming the bad value's type, rather than in the background writer
      items[_CONFIG] = ocp.args.JsonSave(values)
    self._manager(write=True).save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, *, step: int | None = None, data_iterator: Any = None) -> Any:
    """Restores checkpoint `step` (None: the latest) onto the shapes, dtypes and shardings of `abstract_state`.

    Args:
      abstract_state: the state's structure, e.g. `jax.eval_shape(init)`: a pytree of
        `jax.ShapeDtypeStruct` whose `.sharding` says where each array goes (so a checkpoint can be
        restored onto another mesh); leaves without one go to the first local device.
      step: which checkpoint; None means the newest one that is not damaged (a damaged newer one is
        skipped with a warning, and replaced when this checkpointer saves that step again).
      data_iterator: a grain iterator, moved in place to where it was when the checkpoint was saved.

    Raises:
      FileNotFoundError: no (such) checkpoint in the directory.
      CheckpointMismatchError: the saved tree has other keys or shapes than `abstract_state` (names the
        first differing parameter and both shapes).
      UnreadableCheckpointError: every checkpoint (or the one asked for) is damaged.
      CheckpointStorageError: a checkpoint could not be read for a storage reason, retried per the
        checkpointer's `read_retry` (an older checkpoint is never used then).
    """
    self.wait()
    return _read_newest_first(self.directory, step,
                              lambda candidate: self._restore_step(candidate, abstract_state, data_iterator),
                              on_damaged=self._damaged.add, retry=self._read_retry)

  def _restore_step(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    manager = self._manager()
    metadata = manager.item_metadata(step)
    _check_matches(metadata[_STATE].tree, abstract_state, f"checkpoint {step} in {self.directory!r}")
    items = {_STATE: ocp.args.StandardRestore(_with_default_sharding(abstract_state))}
    if data_iterator is not None:
      if _DATA in metadata and _is_grain_iterator(data_iterator):
        items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
      else:
        logging.warning("checkpoint %d in %s has no data iterator state (or the iterator is not a grain "
                        "iterator); the data starts from the beginning", step, self.directory)
    return manager.restore(step, args=ocp.args.Composite(**items))[_STATE]

  def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict | None:
    """The config saved with checkpoint `step` (None: the newest readable one), or None if it has none."""
    self.wait()

    def read(candidate: int) -> ml_collections.ConfigDict | None:
      manager = self._manager()
      if _CONFIG not in manager.item_metadata(candidate):
        return None
      values = manager.restore(candidate, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))
      return ml_collections.ConfigDict(values[_CONFIG])

    return _read_newest_first(self.directory, step, read, retry=self._read_retry)

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is written and committed."""
    if self._writer is not None:
      self._writer.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight, then releases the manager's resources."""
    _OPEN.discard(self)
    for manager in (self._writer, self._reader):
      if manager is not None:
        manager.close()
    self._writer = self._reader = None

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def restore_params_only(directory: str, abstract_params: Any, *, step: int | None = None,
                        use_ema: bool = True, read_retry: RetryPolicy = RetryPolicy()) -> Any:
  """Reads only `ema_params` (or `params`) of a saved TrainState, without the optimizer's structure.

  Args:
    directory: a checkpoint directory written by `Checkpointer`.
    abstract_params: the params' structure, e.g. the nnx.State of `nnx.eval_shape(model_factory)`.
    step: which checkpoint; None means the newest one that reads back completely.
    use_ema: read the EMA weights (for sampling) rather than the raw training weights.
    read_retry: how a read that fails for a storage reason is retried (then `CheckpointStorageError`).

  Returns:
    A pytree shaped like `abstract_params` holding the stored arrays.
  """
  directory = _absolute(directory)
  return _read_newest_first(directory, step,
                            lambda candidate: _restore_params_step(directory, candidate, abstract_params, use_ema),
                            retry=read_retry)


def _restore_params_step(directory: str, step: int, abstract_params: Any, use_ema: bool) -> Any:
  key = "ema_params" if use_ema else "params"
  state_dir = epath.Path(directory) / str(step) / _STATE
  handler = ocp.PyTreeCheckpointHandler()
  try:
    saved = handler.metadata(state_dir).tree
    if not isinstance(saved, dict) or key not in saved:
      found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
      raise CheckpointMismatchError(f"checkpoint {step} in {directory!r} holds no {key!r} (it has {found})")
    _check_matches({key: saved[key]}, {key: abstract_params}, f"{key} of checkpoint {step} in {directory!r}")
    target = {key: _with_default_sharding(abstract_params)}
    restored = handler.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  finally:
    handler.close()
  return restored[key]
