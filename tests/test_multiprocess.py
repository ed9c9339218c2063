"""Two JAX processes on localhost, joined by jax.distributed, train together and agree with one device, and
resume bit for bit after a preemption that signals both.

Each process runs tests/multiprocess_run.py with 2 fake CPU devices (4 in the job).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from flowar_jax.training.preemption import EXIT_CODE

pytestmark = pytest.mark.multiprocess


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _environments(processes: int = 2, devices: int = 2) -> list[dict[str, str]]:
  """One environment per process of a job joined by jax.distributed on localhost (none for one process)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             # -O0 halves the CPU compile time; both sides of the comparison compile alike.
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  if processes == 1:
    return [env]
  port = _free_port()
  return [dict(env, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(i)) for i in range(processes)]


def _start(envs, *args) -> list[subprocess.Popen]:
  return [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_run.py"), *map(str, args)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in envs]


def _reports(procs, returncode=0) -> list[dict]:
  """Each process's last REPORT line, once all have exited with `returncode` (else the outputs)."""
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=900))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  reports = []
  for proc, (out, err) in zip(procs, outputs):
    lines = [line[len("REPORT "):] for line in out.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == returncode and lines, (proc.returncode, out[-3000:], err[-6000:])
    reports.append(json.loads(lines[-1]))
  return reports


@pytest.fixture(scope="module")
def multiprocess(tmp_path_factory):
  """tests/multiprocess_run.py in 2 processes x 2 CPU devices joined by jax.distributed on localhost, and
  alone on one device (the reference), all at once -> (workdir, [process 0, process 1, reference] reports)."""
  workdir = tmp_path_factory.mktemp("multiprocess")
  procs = _start(_environments() + _environments(processes=1, devices=1), workdir)
  return workdir, _reports(procs)


def test_two_processes_train_together_and_agree(multiprocess):
  _, (first, second, one_device) = multiprocess
  assert (first["process"], second["process"]) == (0, 1)
  assert first["processes"] == 2 and first["devices"] == 4
  assert first["losses"] == second["losses"]  # one program, one global loss
  # Each process fed its half of every batch: the same 5 losses as one device on the whole batches.
  np.testing.assert_allclose(first["losses"], one_device["losses"], rtol=1e-5, atol=1e-6)
  assert first["losses"][0] != first["losses"][-1]
  # The multi-host checkpoint, restored onto another mesh (data=2, fsdp=2), is bit-identical.
  assert first["restore_max_diff"] == second["restore_max_diff"] == 0.0


def test_multiprocess_sampler_gathers_every_sample(multiprocess):
  _, (first, second, one_device) = multiprocess
  assert np.array(first["samples"]).shape == (10, 4, 4, 4)
  assert first["samples"] == second["samples"]
  np.testing.assert_allclose(first["samples"], one_device["samples"], atol=1e-5)


def test_multiprocess_command_writes_once(multiprocess):
  """`train` (VAE stage) in both processes: one metrics file written by process 0, one checkpoint."""
  workdir, _ = multiprocess
  vae_dir = os.path.join(workdir, "command", "vae")
  with open(os.path.join(vae_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if "loss" in line]
  assert [r["step"] for r in records] == [1, 2]  # not doubled by process 1
  assert os.path.isdir(os.path.join(vae_dir, "checkpoints", "2"))


def test_two_processes_preempted_together_resume_bit_for_bit(multiprocess, tmp_path):
  """Both processes get SIGTERM (as a TPU maintenance event or a spot reclaim delivers it to every host) while
  process 0 is past step 2 and process 1 is inside step 3: they agree on one step, both save it and exit with
  the preemption code; the same command then finishes the run bit for bit like the uninterrupted one."""
  workdir, _ = multiprocess
  reference = os.path.join(workdir, "library")  # the library path's checkpoint of the same 5 steps
  procs = _start(_environments(), tmp_path, "preemptible", reference)
  ready = os.path.join(tmp_path, "waiting_for_sigterm")
  deadline = time.monotonic() + 600
  while not os.path.exists(ready) and time.monotonic() < deadline and all(p.poll() is None for p in procs):
    time.sleep(0.01)
  for proc in procs:  # a few milliseconds apart, as separate hosts would get it
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
  first, second = _reports(procs, returncode=EXIT_CODE)
  assert first["first_run"] and first["preempted_at"] == second["preempted_at"]
  stopped = first["preempted_at"]
  assert 2 < stopped < 5, stopped  # after the signal, before the last step: a preemption checkpoint
  checkpoints = os.path.join(tmp_path, "preemptible", "checkpoints")
  assert sorted(os.listdir(checkpoints)) == [str(stopped)]  # one step, saved by both processes together
  assert sorted(name for name in os.listdir(os.path.join(checkpoints, str(stopped), "data"))
                if name.startswith("process_")) == ["process_0-of-2.json", "process_1-of-2.json"]

  first, second = _reports(_start(_environments(), tmp_path, "preemptible", reference))  # the same command
  assert not first["first_run"] and first["step"] == second["step"] == 5
  assert first["leaves"] > 0 and first["differing_leaves"] == second["differing_leaves"] == 0
