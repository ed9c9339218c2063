"""Sharded training on 8 fake CPU devices equals one device; checkpoints move between meshes; two
jax.distributed processes on localhost train together and agree with one device.

The work runs in subprocesses (tests/sharded_run.py with XLA_FLAGS=--xla_force_host_platform_device_count=8,
tests/multiprocess_run.py twice), so the test process keeps its single device.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_with_devices(script: str, args: list[str], devices: int, timeout: int = 900) -> dict:
  """Runs tests/SCRIPT in a fresh Python with `devices` CPU devices; returns the JSON after 'REPORT '."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             # Both sides of every comparison compile alike; -O0 halves the CPU compile time of the tests.
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
  result = subprocess.run([sys.executable, os.path.join(HERE, script), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
  reports = [line[len("REPORT "):] for line in result.stdout.splitlines() if line.startswith("REPORT ")]
  assert result.returncode == 0 and reports, (result.stdout[-3000:], result.stderr[-6000:])
  return json.loads(reports[-1])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  return run_with_devices("sharded_run.py", [str(tmp_path_factory.mktemp("sharded"))], devices=8)


@pytest.mark.parametrize("mesh", ["8x1x1", "2x4x1", "2x2x2"])
def test_losses_match_one_device(report, mesh):
  """5 FlowAR steps (VAE encoder in the step, dropout on) give one device's losses on (data, fsdp, tensor)."""
  losses, reference = report["losses"][mesh], report["losses"]["1"]
  assert len(losses) == len(reference) == 5
  np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-6)
  assert reference[0] != reference[-1]  # the steps did update the model


def test_fsdp_and_tensor_shardings_are_applied(report):
  specs = report["fsdp_specs"]  # the (2, 4, 1) run: parameters, EMA and Adam moments split over fsdp
  kernel = "['backbone']['encoder_blocks'][0]['mlp']['fc1_g']['kernel']"
  split = "P('fsdp', 'tensor')"  # tensor has size 1 here, so it divides the 85 hidden units
  assert specs[f".params{kernel}.value"] == split
  assert specs[f".ema_params{kernel}.value"] == split
  assert any(k.endswith(f".mu{kernel}.value") and v == split for k, v in specs.items())
  assert specs[".step"] == "P()"
  restored = report["restore"]["specs"]  # restored onto (2, 2, 2): heads over tensor, embed over fsdp
  assert restored[".params['backbone']['encoder_blocks'][0]['attn']['proj']['kernel'].value"] == "P('tensor', 'fsdp')"
  # The tiny MLP's 85 hidden units do not divide by tensor=2: that dimension falls back to replicated.
  assert restored[f".params{kernel}.value"] == "P('fsdp', None)"


def test_checkpoint_restores_onto_another_mesh(report):
  restored = report["restore"]
  assert restored["step"] == 5
  assert restored["max_diff"] == 0.0  # every leaf of the (2, 4, 1) state, bit for bit on (2, 2, 2)


def test_sharded_sampler_matches_one_device(report):
  assert report["sample_max_diff"] < 1e-5  # (2, 2, 2): 10 labels padded to a multiple of the 4 data-parallel devices


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def multiprocess(tmp_path_factory):
  """tests/multiprocess_run.py in 2 processes x 2 CPU devices joined by jax.distributed on localhost."""
  workdir = tmp_path_factory.mktemp("multiprocess")
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_run.py"), str(workdir)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
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


@pytest.mark.multiprocess
def test_two_processes_train_together_and_agree(report, multiprocess):
  _, (first, second) = multiprocess
  assert (first["process"], second["process"]) == (0, 1)
  assert first["processes"] == 2 and first["devices"] == 4
  assert first["losses"] == second["losses"]  # one program, one global loss
  # Each process fed its half of every batch: the same 5 losses as one device on the whole batches.
  np.testing.assert_allclose(first["losses"], report["losses"]["1"], rtol=1e-5, atol=1e-6)
  # The multi-host checkpoint, restored onto another mesh (data=2, fsdp=2), is bit-identical.
  assert first["restore_max_diff"] == second["restore_max_diff"] == 0.0


@pytest.mark.multiprocess
def test_multiprocess_command_writes_once(multiprocess):
  """`train` in both processes: one metrics file written by process 0, checkpoints of both stages, samples."""
  workdir, _ = multiprocess
  command = os.path.join(workdir, "command")
  for path, steps in ((os.path.join(command, "vae", "metrics.jsonl"), 2), (os.path.join(command, "metrics.jsonl"), 2)):
    with open(path) as f:
      records = [json.loads(line) for line in f if "loss" in line]
    assert [r["step"] for r in records] == list(range(1, steps + 1)), path  # not doubled by process 1
  for directory in (os.path.join(command, "vae", "checkpoints", "2"), os.path.join(command, "checkpoints", "2")):
    assert os.path.isdir(directory), directory
  with np.load(os.path.join(command, "samples", "samples.npz")) as f:
    assert f["images"].shape == (8, 16, 16, 3)
