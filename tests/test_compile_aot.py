"""`compile`: ahead-of-time compilation for a TPU topology on this CPU, through libtpu (the `tpu` extra), under
every remat policy and `scan_blocks` setting; and the remat/sampler invariants it relies on."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from flowar_jax.commands import compile as compile_command
from flowar_jax.models.flow_head import HeadBlockV1
from flowar_jax.models.registry import build_model
from flowar_jax.models.rope import rope_tables
from flowar_jax.parallel.remat import REMAT_POLICIES, remat
from flowar_jax.sampling.generate import settings_from
from flowar_jax.sampling.sampler import Sampler

pytestmark = pytest.mark.tpu_aot
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'); it compiles for TPU topologies ahead of time")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5e:2x2"


def flowar_config(policy: str = "none", scan: bool = False):
  """The tiny FlowAR stage on data 2 x fsdp 2, two blocks per stack (a stack of one is never scanned)."""
  config = tiny_config()
  config.stage = "flowar"
  config.mesh.data, config.mesh.fsdp = 2, 2
  config.model.depth = config.model.head.depth = 2
  config.model.remat, config.model.scan_blocks = policy, scan
  return config


@functools.lru_cache(maxsize=None)
def compiled(policy: str, scan: bool, sampler: bool = True) -> compile_command.CompileReport:
  """One compile per setting, shared by the tests that need it."""
  return compile_command.compile_for_topology(flowar_config(policy, scan), TOPOLOGY, sampler=sampler)


@pytest.fixture(scope="module")
def report():
  return compiled("none", False)


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


def _table_seconds(text: str) -> dict[str, tuple[float, float]]:
  """program -> (lower s, compile s), read back from `format_report`'s table (the two columns before 'fits')."""
  lines = text.splitlines()
  assert lines[1].split()[-5:] == ["lower", "s", "compile", "s", "fits"], lines[1]
  rows = [line for line in lines[2:] if line.split()[-1] in ("yes", "NO")]
  return {line[:20].strip(): (float(line.split()[-3]), float(line.split()[-2])) for line in rows}


@needs_libtpu
def test_report_shows_each_programs_lower_and_compile_seconds(report):
  seconds = _table_seconds(compile_command.format_report(report))
  assert set(seconds) == {"flowar train step", "sampler"}
  for program in report.programs:
    assert program.lower_seconds > 0 and program.compile_seconds > 0
    assert seconds[program.name] == pytest.approx((program.lower_seconds, program.compile_seconds), abs=0.006)
    assert min(seconds[program.name]) > 0


@needs_libtpu
@pytest.mark.parametrize("scan", [False, True])
def test_every_remat_policy_lowers_and_leaves_the_sampler_alone(scan):
  """The train step and the sampler trace under every policy; the policy changes every train step and never
  the sampler (nothing is differentiated there), so one sampler compile per scan setting covers them all."""
  texts = {}
  for policy in REMAT_POLICIES:
    config = flowar_config(policy, scan)
    programs = compile_command.programs_for(config, compile_command.topology_plan(config, TOPOLOGY))
    texts[policy] = {p.name: p.lower().as_text() for p in programs}
  assert len({t["sampler"] for t in texts.values()}) == 1
  assert len({t["flowar train step"] for t in texts.values()}) == len(REMAT_POLICIES)


# Each TPU compile of the tiny step takes tens of seconds here, so rather than the 8-way cross product every
# policy compiles once, with scan off and on each covered (the lowering test above traces all 8). The sampler
# compiles once per scan setting, since its program is the same under every policy.
@needs_libtpu
@pytest.mark.parametrize("policy,scan,sampler", [
    ("full", False, True), ("dots_saveable", True, True), ("dots_with_no_batch_dims_saveable", False, False)])
def test_remat_policy_compiles_train_step_and_sampler(policy, scan, sampler):
  result = compiled(policy, scan, sampler)
  assert result.remat == policy and result.scanned == scan
  assert [p.name for p in result.programs] == ["flowar train step"] + (["sampler"] if sampler else [])
  assert all(p.compiled and p.flops_per_chip > 0 and p.compile_seconds > 0 for p in result.programs) and result.fits
  compile_command.check_fits(result)


@needs_libtpu
def test_too_big_is_a_clear_error(report):
  tiny_chips = dataclasses.replace(report, hbm_capacity_bytes=1024)
  with pytest.raises(compile_command.DoesNotFit, match=r"flowar train step needs [\d.]+ GiB of HBM per chip but a "
                     r"v5e:2x2 chip has 0 GiB: turn on rematerialisation \(--config.model.remat=full\)"):
    compile_command.check_fits(tiny_chips)


@needs_libtpu
def test_advised_remat_compiles(report):
  """The flags the error advises for the train step give a config that compiles, sampler included."""
  with pytest.raises(compile_command.DoesNotFit) as error:
    compile_command.check_fits(dataclasses.replace(report, hbm_capacity_bytes=1024))
  remat_flags = [f for f in re.findall(r"--config\.([\w.]+)=(\S+?)[),]", str(error.value)) if f[0] == "model.remat"]
  assert remat_flags == [("model.remat", "full")]
  advised = compiled(remat_flags[0][1], False, True)
  assert advised.remat == "full" and [p.name for p in advised.programs] == ["flowar train step", "sampler"]
  assert advised.fits


def test_advice_names_only_what_changes_the_program():
  step = compile_command.ProgramReport("flowar train step", 8, 1, 1, 0, 1, 1.0, 4, 0.1, 0.1, remat=True)
  sampler = dataclasses.replace(step, name="sampler", batch_flag="--config.sampling.batch_size", remat=False)
  def report(remat, fsdp):
    return compile_command.CompileReport("v5e:2x2", 4, {"data": 4 // fsdp, "fsdp": fsdp, "tensor": 1}, remat, 0,
                                         [step, sampler])
  assert compile_command.advice(report("none", 1), step) == [
      "turn on rematerialisation (--config.model.remat=full)",
      "shard the state (--config.mesh.fsdp=-1 --config.mesh.data=1)", "lower the batch (--config.batch_size)",
      "use more chips"]
  assert compile_command.advice(report("dots_saveable", 1), step)[0].startswith("rematerialise more than dots_saveable")
  assert compile_command.advice(report("full", 4), step) == ["lower the batch (--config.batch_size)", "use more chips"]
  assert compile_command.advice(report("none", 4), sampler) == [  # remat does not change the sampler
      "lower the batch (--config.sampling.batch_size)", "use more chips"]


@pytest.mark.parametrize("policy", REMAT_POLICIES[1:])
def test_remat_runs_a_module_built_outside_an_enclosing_scan(policy):
  """Inside a lax.scan (the sampler's ODE loop) a block from the enclosing trace is rematerialised without
  writing its variables back across trace levels; values and gradients are those without remat."""
  block = HeadBlockV1(32, 2, 4.0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 4, 32))
  t_emb, c = jnp.ones((2, 1, 32)), jnp.full((2, 4, 32), 0.5)
  cos, sin = rope_tables(2, 2, 16)  # the 2 x 2 tokens of a scale, head_dim 16

  def run(fn, x):
    def step(x, _):
      return fn(block, x), None
    return jnp.sum(jax.lax.scan(step, x, None, length=2)[0] ** 2)

  call = lambda block, x: block(x, t_emb, c, None, cos, sin)
  plain, rematerialised = functools.partial(run, call), functools.partial(run, remat(call, policy))
  np.testing.assert_allclose(jax.jit(rematerialised)(x), jax.jit(plain)(x), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(rematerialised))(x), jax.jit(jax.grad(plain))(x), rtol=1e-5, atol=1e-6)


def test_sampling_is_the_same_with_and_without_remat():
  """The same weights sample the same images whether or not the config rematerialises (blocks unscanned,
  where the flow head's blocks are called from inside the ODE's lax.scan)."""
  images = {}
  for policy in ("none", "full"):
    config = tiny_config()
    config.model.remat = policy
    images[policy] = Sampler(build_model(config, 0), settings_from(config))(np.arange(4), seed=3)
  assert images["none"].shape == (4, 4, 4, 4)
  np.testing.assert_array_equal(images["full"], images["none"])


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


@needs_libtpu
def test_var_stages_compile_and_its_sampler_lowers():
  """VAR's two stages (the VQ tokenizer, then VAR) compile for v5e:2x2 over data 2 x fsdp 2 with their HBM
  figures; its sampler lowers for the same mesh."""
  from flowar_jax.config_files import load_config  # pylint: disable=g-import-not-at-top
  config = load_config(os.path.join(ROOT, "configs", "var_digits.py"),
                       {"mesh.data": 2, "mesh.fsdp": 2, "batch_size": 8, "vae.train.batch_size": 8,
                        "sampling.batch_size": 8, "vae.vocab_size": 32})
  report = compile_command.compile_for_topology(config, TOPOLOGY, sampler=False)
  assert [p.name for p in report.programs] == ["vq train step", "var train step"] and report.fits
  assert all(0 < p.hbm_bytes < report.hbm_capacity_bytes and p.flops_per_step > 0 for p in report.programs)
  assert "var train step" in compile_command.format_report(report)
  plan = compile_command.topology_plan(config, TOPOLOGY)
  (sampler,) = [p for p in compile_command.programs_for(config, plan) if p.name == "sampler"]
  out = sampler.lower().out_info
  assert (out.shape, out.dtype) == ((8, 16, 16, 3), jnp.uint8)  # the images, one batch over the data chips


@needs_libtpu
def test_hart_train_step_compiles_and_its_sampler_lowers():
  """HART's generator step (categorical loss plus the residual head on self-drawn codes) compiles for v5e:2x2
  over data 2 x fsdp 2 with its HBM figures; its sampler (codes, then the residual head) lowers for the same
  mesh."""
  from flowar_jax.config_files import load_config  # pylint: disable=g-import-not-at-top
  config = load_config(os.path.join(ROOT, "configs", "hart_digits.py"),
                       {"stage": "hart", "mesh.data": 2, "mesh.fsdp": 2, "batch_size": 8, "sampling.batch_size": 8,
                        "vae.vocab_size": 32, "model.width": 64, "model.residual.width": 32})
  report = compile_command.compile_for_topology(config, TOPOLOGY, sampler=False)
  (step,) = report.programs
  assert step.name == "hart train step" and report.fits
  assert 0 < step.hbm_bytes < report.hbm_capacity_bytes and step.flops_per_step > 0
  plan = compile_command.topology_plan(config, TOPOLOGY)
  (sampler,) = [p for p in compile_command.programs_for(config, plan) if p.name == "sampler"]
  out = sampler.lower().out_info
  assert (out.shape, out.dtype) == ((8, 16, 16, 3), jnp.uint8)
