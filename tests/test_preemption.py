"""Preemption and kills: SIGTERM checkpoints the current step; SIGKILL at any moment, then the same command,
gives bit for bit the run that was never interrupted."""
from __future__ import annotations

import glob
import json
import os
import resource
import signal
import subprocess
import sys
import time
import warnings

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from flowar_jax.runs.checkpointing import Checkpointer
from flowar_jax.training import loop, preemption
from flowar_jax.training.preemption import EXIT_CODE, Preempted, PreemptionWatcher
from conftest import compilation_cache_env
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


class _Service:
  """JAX's preemption service as its runtime implements it: on a notice, every process publishes the
  counter it last passed to `reached_preemption_sync_point`; the sync point is the largest plus one, and
  the call with exactly that counter answers True."""

  def __init__(self):
    self.last, self.sync_point = 0, None

  def notice(self):
    self.sync_point = self.last + 1

  def reached_preemption_sync_point(self, counter: int) -> bool:
    self.last = counter
    return counter == self.sync_point


def _stop_step(start: int, num_steps: int) -> int | None:
  """The step at which a training loop from `start` stops for preemption (None: it trains to the end)."""
  with PreemptionWatcher() as watcher:
    for step in range(start + 1, num_steps + 1):
      if watcher.reached(step):
        return step
  return None


def test_with_the_service_a_notice_before_the_first_step_stops_at_it(monkeypatch):
  """A notice during a resumed run's start-up, or between two stages, must stop the next loop at its first step:
  the service's sync point counts calls, and a loop that passed the step number (starting at 21 after a
  stage that reached 40) would never meet it and train on until the scheduler kills the job."""
  service = _Service()
  monkeypatch.setattr(preemption, "_distributed_service_running", lambda: True)
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point",
                      service.reached_preemption_sync_point)
  assert _stop_step(0, 40) is None  # the first stage, never signalled
  service.notice()  # e.g. while the second stage restores its checkpoint of step 20
  assert _stop_step(20, 40) == 21
  service.notice()  # mid-run: the next step
  assert _stop_step(21, 40) == 22


# ----------------------------------------------------------------------------- the command, killed

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _complete(directory: str, step: int) -> bool:
  return os.path.exists(os.path.join(directory, str(step), "commit_success.txt"))


def _writing(directory: str) -> bool:
  return os.path.isdir(directory) and any(".orbax-checkpoint-tmp" in name for name in os.listdir(directory))


def _last_logged_step(path: str) -> int:
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return 0
  for line in reversed(lines):  # the last line may be half written
    try:
      return json.loads(line)["step"]
    except (ValueError, KeyError):
      continue
  return 0


def _saved_state(step_dir: str) -> dict[str, np.ndarray]:
  """Every leaf of a checkpoint's train state, by path (typed keys as their key data)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Orbax: no target shardings given, read them from the checkpoint
    with ocp.PyTreeCheckpointer() as checkpointer:
      tree = checkpointer.restore(os.path.join(step_dir, "state"))
  def host(x):
    return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
  return {jax.tree_util.keystr(path): host(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_checkpoint(actual_dir: str, expected_dir: str) -> None:
  actual, expected = _saved_state(actual_dir), _saved_state(expected_dir)
  assert sorted(actual) == sorted(expected)
  for name in expected:  # params, opt_state, ema_params, step, rng, skipped counts
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
  for item in ("data/process_0-of-1.json",):  # the data iterator's position
    with open(os.path.join(actual_dir, item)) as a, open(os.path.join(expected_dir, item)) as b:
      assert a.read() == b.read(), item


def test_killed_and_preempted_training_resumes_bit_for_bit(trained, compilation_cache_dir, tmp_path):
  """`python -m flowar_jax train`, stage both: SIGKILL mid-VAE, SIGKILL while FlowAR's first checkpoint is
  written, SIGTERM mid-FlowAR, SIGKILL during the final sampling, then a damaged newest checkpoint; each
  time the same command again. The end equals the uninterrupted `trained` run bit for bit."""
  _, reference, _ = trained
  config_file = tmp_path / "config.py"
  config_file.write_text(f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom conftest import trained_config\n\n\n"
                         f"def get_config():\n  return trained_config()\n")
  workdir, log = str(tmp_path / "run"), str(tmp_path / "log.txt")
  flowar_dir, vae_dir = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "vae", "checkpoints")
  # The runs load the programs the `trained` run compiled: the same executables, so the same numbers.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **compilation_cache_env(compilation_cache_dir))

  cpu_seconds = []

  def run(stop_when=None, sig=signal.SIGKILL) -> tuple[int, str]:
    """(exit status, output) of the command, sent `sig` as soon as `stop_when()` holds."""
    with open(log, "a") as out:
      out.write(f"\n===== run, {sig.name} when {stop_when and stop_when.__name__}\n")
      out.flush()
      start = out.tell()
      cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
      proc = subprocess.Popen([sys.executable, "-m", "flowar_jax", "train", "--config", str(config_file),
                               "--workdir", workdir], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
      started = time.monotonic()
      while proc.poll() is None and time.monotonic() - started < 600:
        if stop_when is not None and stop_when():
          proc.send_signal(sig)
          break
        time.sleep(0.005)
      status = proc.wait(timeout=600)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds.append(used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime)
    with open(log) as f:
      f.seek(start)
      return status, f.read()

  def vae_checkpoint_20():
    return _complete(vae_dir, 20)

  def flowar_checkpoint_20_being_written():
    return _writing(flowar_dir) or _complete(flowar_dir, 20)

  def flowar_past_step_25():
    return _last_logged_step(os.path.join(workdir, "metrics.jsonl")) >= 25

  def flowar_done():
    return _complete(flowar_dir, 40)

  status, output = run(vae_checkpoint_20)
  assert status == -signal.SIGKILL, output[-3000:]
  status, output = run(flowar_checkpoint_20_being_written)
  assert status == -signal.SIGKILL, output[-3000:]
  assert _complete(vae_dir, 40) and not _complete(flowar_dir, 40)

  status, output = run(flowar_past_step_25, sig=signal.SIGTERM)
  assert status == EXIT_CODE, output[-3000:]
  preempted = max(int(name) for name in os.listdir(flowar_dir) if name.isdigit() and _complete(flowar_dir, int(name)))
  assert 25 <= preempted < 40, preempted  # the step it was at, not the last periodic one (20)
  assert f"preempted: saved the checkpoint of step {preempted}" in output

  status, output = run(flowar_done)
  assert status == -signal.SIGKILL, output[-3000:]
  assert not os.path.exists(os.path.join(workdir, "samples", "samples.npz"))

  for path in glob.glob(os.path.join(flowar_dir, "40", "state", "**", "d", "*"), recursive=True):
    with open(path, "r+b") as f:
      f.truncate(7)  # the newest checkpoint is damaged: the run goes back to the preemption checkpoint
  status, output = run()
  assert status == 0, output[-3000:]
  assert "checkpoint 40 in" in output and "is damaged" in output, output[-3000:]
  print("CPU seconds of the five runs:", " ".join(f"{seconds:.0f}" for seconds in cpu_seconds))

  _assert_same_checkpoint(os.path.join(vae_dir, "40"), os.path.join(reference, "vae", "checkpoints", "40"))
  _assert_same_checkpoint(os.path.join(flowar_dir, "40"), os.path.join(reference, "checkpoints", "40"))
  with np.load(os.path.join(workdir, "samples", "samples.npz")) as got, \
       np.load(os.path.join(reference, "samples", "samples.npz")) as expected:
    np.testing.assert_array_equal(got["images"], expected["images"])


def test_measured_latent_scale_is_the_same_on_every_resume(trained, tmp_path):
  """`vae.latent_scale = 0`: a run killed before FlowAR's first checkpoint measures the scale again and gets the
  same number (from the latent cache or by encoding); once a checkpoint exists, its stored scale is used."""
  from flowar_jax.runs.loaders import load_vae  # pylint: disable=g-import-not-at-top
  from flowar_jax.training import generator_stage  # pylint: disable=g-import-not-at-top
  config, reference, _ = trained
  config = config.copy_and_resolve_references()
  config.vae.latent_scale = 0.0
  config.vae_checkpoint = os.path.join(reference, "vae")
  vae = load_vae(config, str(tmp_path))
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  first = generator_stage.resolve_latent_scale(config, vae, workdir).vae.latent_scale  # encodes, writes the cache
  assert first > 0 and os.path.exists(os.path.join(workdir, "latent_cache", "manifest.json"))
  assert generator_stage.resolve_latent_scale(config, vae, workdir).vae.latent_scale == first  # from the cache
  config.data.cache_latents = False
  assert generator_stage.resolve_latent_scale(config, vae, workdir).vae.latent_scale == first  # encoded afresh
  stored = config.copy_and_resolve_references()
  stored.vae.latent_scale = 0.5
  with Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
    checkpointer.save(3, {"w": np.zeros(2, np.float32)}, config=stored)
  assert generator_stage.resolve_latent_scale(config, vae, workdir).vae.latent_scale == 0.5
