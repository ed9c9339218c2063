"""`compile`: the training step(s) and the sampler compiled ahead of time for a TPU topology, on any host.

  python -m flowar_jax compile --config configs/flowar_h.py --topology v5p:4x4x4 [--config.key=value ...]

The topology's devices come from libtpu (`jax.experimental.topologies`), so this runs on a CPU-only
machine with the `tpu` extra installed. The mesh is `config.mesh` over the topology's chips and the state
is built abstractly with its shardings (`jax.eval_shape`, nothing is allocated), exactly as training
builds it. For each program it reports, per chip:

  HBM     arguments + outputs - aliased (donated) + temporaries, from XLA's memory_analysis();
          the program must fit in the chip's HBM (HBM_GIB)
  FLOPs   XLA's cost_analysis() of the per-chip program, times the chips: FLOPs per step, including
          the frozen VAE encoder (unless latents are cached), elementwise work and remat recomputation

and, for the FlowAR training step, the analytic model FLOPs (`flowar_jax.models.flops`), and the seconds
this host took to lower (trace) and to compile each program. Every program is lowered before any is
compiled, so a program that cannot be traced fails in seconds rather than after the others' compiles.
The sampler runs its blocks without rematerialisation whatever `config.model.remat` says (nothing in it is
differentiated), so its program is the same under every remat policy.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import topologies

from flowar_jax.config import latent_side, trains_generator, trains_tokenizer, validate_config
from flowar_jax.config_text import encoder_widths, is_text
from flowar_jax.models import flops
from flowar_jax.models.params import split_params
from flowar_jax.models.registry import build_model, build_vae
from flowar_jax.models.vae_trainable import VAETrainable
from flowar_jax.parallel import logical
from flowar_jax.parallel.batch import round_up_to_data_parallel
from flowar_jax.parallel.mesh import MESH_AXES, resolve_mesh_shape
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.sampling.generate import settings_from
from flowar_jax.sampling.sampler import image_sampler
from flowar_jax.text.base import TextEncoding
from flowar_jax.training import generator_stage, vae_stage, vq_stage
from flowar_jax.training.codebook import codebook_update
from flowar_jax.training.optimizer import flowar_optimizer
from flowar_jax.training.state import init_train_state, make_train_step

HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}  # per chip
_GIB = 2**30
# The TPU compiler refuses a program whose temporaries exceed HBM; its message carries both sizes.
_COMPILER_OOM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM")


class DoesNotFit(ValueError):
  """A program needs more HBM per chip than the topology's chips have."""


def _quiet_libtpu() -> None:
  """On a host without TPUs, keeps libtpu from querying the cloud metadata server and printing warnings, and
  lets several processes load it at once (it only compiles here; its lock guards TPU devices).

  Must run before JAX initialises its backends; does nothing on a TPU VM.
  """
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                      ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"), ("TF_CPP_MIN_LOG_LEVEL", "2")):
    os.environ.setdefault(name, value)
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # run on the CPU; compile for the TPU topology


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  """'v5p:4x4x4' -> ('v5p', (4, 4, 4)); a clear error for anything else."""
  match = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", topology.strip())
  if not match or match.group(1) not in HBM_GIB:
    raise ValueError(f"--topology must look like GENERATION:AxBxC with GENERATION one of {sorted(HBM_GIB)} "
                     f"(e.g. v5e:2x2, v5p:4x4x4), got {topology!r}")
  return match.group(1), tuple(int(x) for x in match.group(2).split("x"))


@dataclasses.dataclass(frozen=True)
class Program:
  """A program to compile: `lower()` lowers it for `args` (abstract, sharded) at `batch_size`.

  `batch_flag` is the config flag that sets its batch; `remat` whether `config.model.remat` changes it (the
  FlowAR train step: its backbone and flow-head blocks are rematerialised; the VAE and the sampler are not).
  """
  name: str
  lower: Callable[[], jax.stages.Lowered]
  args: Any
  batch_size: int
  batch_flag: str
  remat: bool = False
  model_flops: float | None = None  # analytic, per step, all chips


@dataclasses.dataclass(frozen=True)
class ProgramReport:
  """One compiled program; byte counts and FLOPs are per chip. When the compiler refused the program for
  lack of HBM, `compiled` is False, `temp_bytes` is the compiler's figure and the FLOPs are unknown (NaN)."""
  name: str
  batch_size: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops_per_chip: float
  chips: int
  lower_seconds: float  # tracing and lowering to StableHLO, on this host
  compile_seconds: float  # XLA's compile for the topology, on this host
  batch_flag: str = "--config.batch_size"
  remat: bool = False
  model_flops: float | None = None
  compiled: bool = True

  @property
  def hbm_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def flops_per_step(self) -> float:
    return self.flops_per_chip * self.chips


@dataclasses.dataclass(frozen=True)
class CompileReport:
  topology: str
  chips: int
  mesh: dict
  remat: str
  hbm_capacity_bytes: int
  programs: list[ProgramReport]
  scanned: bool = False  # config.model.scan_blocks

  @property
  def fits(self) -> bool:
    return all(p.compiled and p.hbm_bytes <= self.hbm_capacity_bytes for p in self.programs)


def _per_chip_bytes(args: Any) -> int:
  """Bytes of one chip's shards of the abstract arguments (the largest shard where shards differ)."""
  total = 0
  for leaf in jax.tree.leaves(args):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def _lower(program: Program, log: Callable[[str], None]) -> tuple[jax.stages.Lowered, float]:
  start = time.perf_counter()
  lowered = program.lower()
  seconds = time.perf_counter() - start
  log(f"{program.name}: lowered in {seconds:.2f} s")
  return lowered, seconds


def _compile(program: Program, lowered: jax.stages.Lowered, lower_seconds: float, chips: int,
             log: Callable[[str], None]) -> ProgramReport:
  report = functools.partial(ProgramReport, program.name, program.batch_size, chips=chips,
                             lower_seconds=lower_seconds, batch_flag=program.batch_flag, remat=program.remat,
                             model_flops=program.model_flops)
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (JaxRuntimeError; re-raised unless it is the OOM)
    match = _COMPILER_OOM.search(str(e))
    if not match:
      raise
    seconds = time.perf_counter() - start
    log(f"{program.name}: the compiler stopped at its HBM limit after {seconds:.2f} s")
    temp = int(float(match.group(1)) * 1024 ** ("KMGT".index(match.group(2)) + 1))
    return report(argument_bytes=_per_chip_bytes(program.args), output_bytes=0, alias_bytes=0, temp_bytes=temp,
                  flops_per_chip=float("nan"), compile_seconds=seconds, compiled=False)
  seconds = time.perf_counter() - start
  log(f"{program.name}: compiled in {seconds:.2f} s")
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0]
  return report(argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
                alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
                flops_per_chip=float(cost.get("flops", 0.0)), compile_seconds=seconds)


def _train_programs(config: ml_collections.ConfigDict, plan: ShardingPlan) -> list[Program]:
  """The training steps `config.stage` runs, as the stages build them."""

  def batch_of(batch_size: int, **shapes):
    sharding = plan.batch_sharding()
    return {key: jax.ShapeDtypeStruct((batch_size,) + shape, dtype, sharding=sharding)
            for key, (shape, dtype) in shapes.items()}

  def step_program(name, batch_flag, model_factory, tx, schedule, ema_decay, loss_fn, batch, context, remat=False,
                   model_flops=None, post_update=None):
    state = plan.abstract(jax.eval_shape(lambda: init_train_state(model_factory(), tx, config.seed)))
    graphdef, _ = split_params(nnx.eval_shape(model_factory))
    step = make_train_step(graphdef, loss_fn, tx, ema_decay, schedule, plan=plan,
                           state_shardings=jax.tree.map(lambda x: x.sharding, state),
                           context_shardings=jax.tree.map(lambda x: x.sharding, context), post_update=post_update)
    args = (state, batch, context)
    return Program(name, lambda: step.lower(*args), args, jax.tree.leaves(batch)[0].shape[0], batch_flag, remat,
                   model_flops)

  size, channels = config.data.image_size, config.vae.get("in_channels", 3)
  images = ((size, size, channels), jnp.float32)
  labels = ((), jnp.int32)
  programs = []
  flowar = config.model.name == "flowar"
  if trains_tokenizer(config) and flowar:
    tx, schedule = vae_stage.vae_optimizer(config.vae.train)
    programs.append(step_program(
        "vae train step", "--config.vae.train.batch_size",
        functools.partial(VAETrainable, config, config.seed), tx, schedule, vae_stage.VAE_EMA_DECAY,
        vae_stage.vae_stage_loss(config.vae.train),
        batch_of(config.vae.train.batch_size, image=images, label=labels), None))
  if trains_tokenizer(config) and not flowar:
    train = config.vae.train
    tx, schedule = vq_stage.vq_optimizer(train)
    programs.append(step_program(
        "vq train step", "--config.vae.train.batch_size", functools.partial(vq_stage.vq_trainable, config, config.seed),
        tx, schedule, vq_stage.VQ_EMA_DECAY, vq_stage.vq_stage_loss(train, config.vae.vocab_size),
        batch_of(train.batch_size, image=images, label=labels), None, post_update=codebook_update(train)))
  if trains_generator(config):
    vae_graphdef, vae_params = split_params(nnx.eval_shape(functools.partial(build_vae, config)))
    tx, schedule = flowar_optimizer(config.optimizer, config.batch_size, config.num_train_steps)
    text = _text_batch_shapes(config) if is_text(config) else {}
    if flowar and config.data.cache_latents:
      side = latent_side(config)
      batch = batch_of(config.batch_size, moments=((side, side, 2 * config.vae.latent_channels), jnp.float32),
                       label=labels, **text)
    else:
      batch = batch_of(config.batch_size, image=images, label=labels, **text)
    loss_fn = generator_stage.generator_loss_fn(vae_graphdef, config, _text_null(config) if is_text(config) else None)
    programs.append(step_program(
        f"{config.model.name} train step", "--config.batch_size", functools.partial(build_model, config, config.seed),
        tx, schedule, config.optimizer.ema_decay, loss_fn, batch,
        plan.abstract(vae_params), remat=True,
        model_flops=float(flops.training_flops_per_step(config)) if flowar else None))
  return programs


def _text_batch_shapes(config: ml_collections.ConfigDict) -> dict:
  """A text batch's prompt encodings (`flowar_jax.data.text_batches`): key -> (per-example shape, dtype)."""
  states_width, pooled_width = encoder_widths(config.text)
  t = config.text.max_length
  return {"text_states": ((t, states_width), jnp.float32), "text_mask": ((t,), jnp.bool_),
          "text_pooled": ((pooled_width,), jnp.float32)}


def _text_null(config: ml_collections.ConfigDict) -> TextEncoding:
  """A stand-in for the empty prompt's encoding, shaped as the encoder gives it: compiling needs its shape
  only, so the encoder (e.g. CLIP-L's weights) is never built."""
  shapes = _text_batch_shapes(config)
  return TextEncoding(*(np.zeros((1, *shapes[key][0]), shapes[key][1])
                        for key in ("text_states", "text_mask", "text_pooled")))


def _sampler_program(config: ml_collections.ConfigDict, plan: ShardingPlan) -> Program:
  model = nnx.eval_shape(functools.partial(build_model, config))
  vae = nnx.eval_shape(functools.partial(build_vae, config))
  scale = (config.vae.latent_scale or 1.0) if config.model.name == "flowar" else 1.0
  null = _text_null(config) if is_text(config) else None
  sampler = image_sampler(model, vae, settings_from(config), scale, plan, null=null)
  batch = round_up_to_data_parallel(plan, config.sampling.batch_size)
  return Program("sampler", lambda: sampler.lower(batch), sampler.lower_args(batch), batch,
                 "--config.sampling.batch_size")


def topology_plan(config: ml_collections.ConfigDict, topology: str) -> ShardingPlan:
  """The sharding plan of `config.mesh` over the chips of `topology` (described by libtpu; nothing allocated).

  Raises ValueError for a malformed topology or a config that does not suit its chips (batch or mesh sizes).
  """
  parse_topology(topology)
  _quiet_libtpu()
  try:
    description = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # pylint: disable=broad-except  (libtpu's errors are long; keep the gist)
    raise ValueError(f"libtpu cannot describe topology {topology!r} (is the `tpu` extra installed?): "
                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
  chips = len(description.devices)
  validate_config(config, chips, num_slices=1)
  ici, _ = resolve_mesh_shape(config.mesh, chips, 1)
  return ShardingPlan(topologies.make_mesh(description, ici, MESH_AXES), logical.parse_rules(config.sharding.rules))


def programs_for(config: ml_collections.ConfigDict, plan: ShardingPlan, *, sampler: bool = True) -> list[Program]:
  """The training step(s) of `config.stage` and, for a FlowAR stage, the sampler, over `plan`."""
  programs = _train_programs(config, plan)
  if sampler and trains_generator(config):
    programs.append(_sampler_program(config, plan))
  return programs


def compile_for_topology(config: ml_collections.ConfigDict, topology: str, *, sampler: bool = True,
                         log: Callable[[str], None] | None = None) -> CompileReport:
  """Compiles what `config` trains (and the sampler) for `topology` and measures it; see the module doc.

  `log`, when given, gets a line as each program is lowered and as each is compiled.

  Raises ValueError for a malformed topology or a config that does not suit its chips (batch or mesh sizes).
  """
  generation, _ = parse_topology(topology)
  plan = topology_plan(config, topology)
  chips = plan.mesh.size
  programs = programs_for(config, plan, sampler=sampler)
  log = log or (lambda line: None)
  lowered = [_lower(p, log) for p in programs]  # all first: a tracing error surfaces before any long compile
  reports = [_compile(p, *lowered_p, chips, log) for p, lowered_p in zip(programs, lowered)]
  return CompileReport(topology, chips, dict(plan.mesh.shape), config.model.remat,
                       HBM_GIB[generation] * _GIB, reports, scanned=bool(config.model.get("scan_blocks", False)))


def format_report(report: CompileReport) -> str:
  """A plain-text table of the report, one row per program."""
  mesh = " x ".join(f"{k}={v}" for k, v in report.mesh.items())
  lines = [f"topology {report.topology}: {report.chips} chips, {report.hbm_capacity_bytes / _GIB:.0f} GiB HBM "
           f"per chip; mesh {mesh}; remat {report.remat}",
           f"{'program':<20}{'batch':>7}{'HBM/chip GiB':>14}{'args':>8}{'temps':>8}{'FLOPs/step':>12}"
           f"{'model FLOPs':>13}{'lower s':>9}{'compile s':>11}  fits"]
  for p in report.programs:
    model = f"{p.model_flops:.3g}" if p.model_flops else "-"
    fits = "yes" if p.compiled and p.hbm_bytes <= report.hbm_capacity_bytes else "NO"
    hbm = f"{p.hbm_bytes / _GIB:.2f}" + ("" if p.compiled else "+")
    lines.append(f"{p.name:<20}{p.batch_size:>7}{hbm:>14}{p.argument_bytes / _GIB:>8.2f}"
                 f"{p.temp_bytes / _GIB:>8.2f}{p.flops_per_step:>12.3g}{model:>13}{p.lower_seconds:>9.2f}"
                 f"{p.compile_seconds:>11.2f}  {fits}")
  if report.scanned:
    lines.append("scan_blocks: XLA's cost analysis counts each scanned block once, not once per layer, so FLOPs/step "
                 "is a lower bound (model FLOPs are analytic)")
  lines.append("lower s, compile s: seconds on this host to trace and lower, and to compile, each program")
  if not all(p.compiled for p in report.programs):
    lines.append("+ the TPU compiler stopped at its HBM limit: the temporaries alone exceed it (outputs not counted)")
  return "\n".join(lines)


def advice(report: CompileReport, program: ProgramReport) -> list[str]:
  """What would shrink `program` that `report`'s config does not already do, each with its flags.

  Remat is offered only for a program it changes (the FlowAR train step) and only below `full`; sharding the
  state only when the mesh does not already put every chip on fsdp.
  """
  options = []
  if program.remat and report.remat != "full":
    options.append("turn on rematerialisation (--config.model.remat=full)" if report.remat == "none" else
                   f"rematerialise more than {report.remat} (--config.model.remat=full)")
  if report.mesh.get("fsdp") != report.chips:
    options.append("shard the state (--config.mesh.fsdp=-1 --config.mesh.data=1)")
  options.append(f"lower the batch ({program.batch_flag})")
  return options + ["use more chips"]


def check_fits(report: CompileReport) -> None:
  """Raises DoesNotFit naming the largest program's HBM need, the chip's capacity, and what to change."""
  too_big = [p for p in report.programs if not p.compiled or p.hbm_bytes > report.hbm_capacity_bytes]
  if too_big:
    worst = max(too_big, key=lambda p: p.hbm_bytes)
    options = advice(report, worst)
    raise DoesNotFit(
        f"{worst.name} needs {'more than ' if not worst.compiled else ''}{worst.hbm_bytes / _GIB:.1f} GiB of HBM "
        f"per chip but a {report.topology} chip has {report.hbm_capacity_bytes / _GIB:.0f} GiB: "
        f"{', '.join(options[:-1])}, or {options[-1]}")


def run(config: ml_collections.ConfigDict, topology: str, *, sampler: bool = True) -> CompileReport:
  """Compiles, prints the table, and raises DoesNotFit (naming need vs capacity) when a program does not fit."""
  report = compile_for_topology(config, topology, sampler=sampler,
                                log=lambda line: print(line, file=sys.stderr, flush=True))
  print(format_report(report), flush=True)
  check_fits(report)
  return report
