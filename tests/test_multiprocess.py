"""Two JAX processes on localhost, joined by jax.distributed, train together and agree with one device.

Each process runs tests/multiprocess_run.py with 2 fake CPU devices (4 in the job).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.multiprocess


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def multiprocess(tmp_path_factory):
  """tests/multiprocess_run.py in 2 processes x 2 CPU devices joined by jax.distributed on localhost, and
  alone on one device (the reference), all at once -> (workdir, [process 0, process 1, reference] reports)."""
  workdir = tmp_path_factory.mktemp("multiprocess")
  port = _free_port()
  base = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
              # -O0 halves the CPU compile time; both sides of the comparison compile alike.
              XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
  envs = [dict(base, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
          for i in range(2)]
  envs.append(dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"))
  for env in envs[2:]:
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
      env.pop(name, None)
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_run.py"), str(workdir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in envs]
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
    assert proc.returncode == 0 and lines, (out[-3000:], err[-6000:])
    reports.append(json.loads(lines[-1]))
  return workdir, reports


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
