"""Sharded training on 8 fake CPU devices equals one device; checkpoints move between meshes.

The work runs once, in a subprocess (tests/sharded_run.py) started with
XLA_FLAGS=--xla_force_host_platform_device_count=8, so this process keeps its single device.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_with_devices(script: str, args: list[str], devices: int, timeout: int = 900) -> dict:
  """Runs tests/SCRIPT in a fresh Python with `devices` CPU devices; returns the JSON after 'REPORT '."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             # Both sides of every comparison compile alike; -O0 halves the CPU compile time of these tests.
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
  """5 FlowAR steps (VAE encoder in the step, dropout on) give one device's losses on (data, fsdp, tensor);
  the (2, 4, 1) run also scans its blocks and rematerialises them."""
  losses, reference = report["losses"][mesh], report["losses"]["1"]
  assert len(losses) == len(reference) == 5
  np.testing.assert_allclose(losses[:2], reference[:2], rtol=1e-6)
  # Sharding reorders float32 sums (about 1e-7 relative); Adam's normalised updates of parameters whose
  # gradients sit at that level can grow it to about 1e-4 within a few steps. A sharding error (another
  # dropout mask, a missing reduction) moves the loss by 1e-2 and more.
  np.testing.assert_allclose(losses, reference, rtol=5e-4)
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

