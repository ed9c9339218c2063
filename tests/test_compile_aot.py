"""`compile`: ahead-of-time compilation for a TPU topology on this CPU, through libtpu (the `tpu` extra)."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from flowar_jax.commands import compile as compile_command

pytestmark = pytest.mark.tpu_aot
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'); it compiles for TPU topologies ahead of time")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
  config = tiny_config()
  config.stage = "flowar"
  config.mesh.data, config.mesh.fsdp = 2, 2
  return compile_command.compile_for_topology(config, "v5e:2x2")


@needs_libtpu
def test_tiny_config_compiles_for_v5e_2x2(report):
  assert report.chips == 4 and report.mesh == {"data": 2, "fsdp": 2, "tensor": 1}
  assert report.hbm_capacity_bytes == 16 * 2**30
  assert [p.name for p in report.programs] == ["flowar train step", "sampler"]
  step, sampler = report.programs
  assert 0 < step.hbm_bytes < report.hbm_capacity_bytes and report.fits
  assert step.argument_bytes > 0 and step.flops_per_chip > 0
  # XLA's count includes what the model FLOPs leave out (VAE encoder, elementwise work), never less.
  assert step.flops_per_step > step.model_flops > 0
  assert sampler.batch_size == 12  # 10 samples rounded up to the 4 data-parallel chips
  text = compile_command.format_report(report)
  assert "topology v5e:2x2: 4 chips, 16 GiB HBM per chip" in text and "flowar train step" in text


@needs_libtpu
def test_too_big_is_a_clear_error(report):
  tiny_chips = dataclasses.replace(report, hbm_capacity_bytes=1024)
  with pytest.raises(compile_command.DoesNotFit, match=r"needs 0\.0 GiB of HBM per chip but a v5e:2x2 chip has "
                     r"0 GiB: turn on rematerialisation \(--config.model.remat=full\)"):
    compile_command.check_fits(tiny_chips)


@pytest.mark.parametrize("topology", ["v5e", "v9:2x2", "v5p:4x4x"])
def test_malformed_topology_is_named(topology):
  with pytest.raises(ValueError, match="--topology must look like GENERATION:AxBxC"):
    compile_command.parse_topology(topology)


def test_cli_names_a_malformed_topology():
  result = subprocess.run([sys.executable, "-m", "flowar_jax", "compile", "--config", "configs/digits.py",
                           "--topology", "v5p-8"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert result.returncode == 2, result.stderr
  assert "flowar-jax compile: error: --topology must look like GENERATION:AxBxC" in result.stderr
