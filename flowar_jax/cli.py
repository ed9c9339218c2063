"""Command line: `python -m flowar_jax COMMAND --config CONFIG[:ARG] [--config.key=value ...] --workdir DIR`.

Commands: train, sample, evaluate (FID, sFID, IS, precision/recall, digits metric), summary, convert (official
PyTorch weights -> WORKDIR), compile (ahead of time for a TPU topology: `compile --config CONFIG --topology
v5p:4x4x4`).

`train`, `sample` and `evaluate` start multi-process JAX first when the launch environment asks for it
(`flowar_jax.parallel.distributed`: TPU pods, SLURM, or explicit JAX_COORDINATOR_ADDRESS).
"""
from __future__ import annotations

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from flowar_jax.commands.flag_errors import USAGE_EXIT_CODE, parse_flags
from flowar_jax.runs.fs import use_storage_emulator

COMMANDS = ("train", "sample", "evaluate", "summary", "convert", "compile")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/digits.py), with "
                                          "--config.key=value overrides.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "sample / evaluate: number of images (default "
                                    "config.sampling.num_samples / config.eval.num_samples).")
_SEED = flags.DEFINE_integer("seed", 0, "sample: sample i uses noise from (seed, i).")
_CFG = flags.DEFINE_float("cfg", None, "sample: classifier-free guidance scale (1 disables it).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "sample: ODE steps per scale.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "sample: CFG applies where t <= guidance.")
_SOLVER = flags.DEFINE_enum("solver", None, ["euler", "heun"], "sample: ODE solver.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                                   "sample: dtype of the matrix products (default: sampling.compute_dtype).")
_LABELS = flags.DEFINE_list("labels", None, "sample: class labels, repeated to num_samples (default: all).")
_BATCH = flags.DEFINE_integer("batch_size", None, "sample: images per compiled batch.")
_USE_EMA = flags.DEFINE_boolean("use_ema", None, "sample: use the EMA weights (default: yes). convert: take the "
                                 "file's EMA weights (default: when it holds them).")
_FROM_TORCH = flags.DEFINE_string("from_torch", None, "convert: official FlowAR checkpoint (.pth, .safetensors, .npz).")
_VAE_TORCH = flags.DEFINE_string("vae_torch", None, "convert: MAR's KL-16 VAE checkpoint (kl16.ckpt or .npz).")
_TRUST_PICKLE = flags.DEFINE_boolean("trust_pickle", False, "convert: read torch files with full unpickling, "
                                     "for trusted files that hold Python objects besides tensors.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "compile: TPU topology, e.g. v5e:2x2 or v5p:4x4x4.")
_SAMPLER = flags.DEFINE_boolean("sampler", True, "compile: also compile the sampler.")
_METRICS = flags.DEFINE_list("metrics", None, "evaluate: fid, sfid, is, precision, recall, digits (default "
                             "config.eval.metrics).")
_REFERENCE = flags.DEFINE_string("reference", None, "evaluate: ADM-layout reference .npz or dataset:train / "
                                 "dataset:eval (default config.eval.reference).")
_INCEPTION = flags.DEFINE_string("inception_weights", None, "evaluate: FID Inception weights (.pth, .npz or the "
                                 "TF graph .pb; default config.eval.inception_weights, else ~/.cache/flowar_jax).")


class _QuietOrbax(std_logging.Filter):
  """Drops Orbax's routine warnings (e.g. 'directory is read only' when sampling); keeps its errors."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.ERROR or "orbax" not in record.pathname


def _need(value, name: str):
  if value is None:
    raise app.UsageError(f"--{name} is required for this command")
  return value


def _default(value, fallback):
  return fallback if value is None else value


def _parse_labels(raw: list[str] | None) -> list[int] | None:
  if raw is None:
    return None
  try:
    return [int(x) for x in raw]
  except ValueError as e:
    raise ValueError(f"--labels must be comma-separated integers, got {','.join(raw)!r}") from e


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: flowar-jax {{{'|'.join(COMMANDS)}}} --config CONFIG --workdir DIR "
                         f"(got {' '.join(argv[1:]) or 'no command'})")
  command = argv[1]
  if not flags.FLAGS["verbosity"].present:
    # Library logs only on request (-v 0): Orbax alone writes dozens of lines per checkpoint.
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_QuietOrbax())
  from flowar_jax.training.nonfinite import NonFiniteError  # pylint: disable=g-import-not-at-top
  from flowar_jax.training.preemption import EXIT_CODE, Preempted  # pylint: disable=g-import-not-at-top
  try:
    if command in ("train", "sample", "evaluate"):
      from flowar_jax.parallel.distributed import initialize_from_environment
      initialize_from_environment()
    if command == "summary":
      from flowar_jax.commands.summary import summarize
      print(summarize(_need(_CONFIG.value, "config")))
    elif command == "train":
      from flowar_jax.commands import train
      train.run(_need(_CONFIG.value, "config"), _need(_WORKDIR.value, "workdir"))
    elif command == "compile":
      from flowar_jax.commands import compile as compile_command
      compile_command.run(_need(_CONFIG.value, "config"), _need(_TOPOLOGY.value, "topology"), sampler=_SAMPLER.value)
    elif command == "convert":
      from flowar_jax.commands import convert
      convert.run(_need(_CONFIG.value, "config"), _need(_WORKDIR.value, "workdir"),
                  flowar_path=_need(_FROM_TORCH.value, "from_torch"), vae_path=_VAE_TORCH.value, use_ema=_USE_EMA.value,
                  trust_pickle=_TRUST_PICKLE.value)
    elif command == "evaluate":
      from flowar_jax.commands import evaluate, sample
      workdir = _need(_WORKDIR.value, "workdir")
      config = _CONFIG.value or sample.stored_config(workdir)
      settings = sample.settings_from(config, cfg=_CFG.value, num_steps=_NUM_STEPS.value,
                                      guidance=_GUIDANCE.value, solver=_SOLVER.value,
                                      compute_dtype=_COMPUTE_DTYPE.value)
      evaluate.run(config, workdir, num_samples=_default(_NUM_SAMPLES.value, config.eval.num_samples),
                   seed=_SEED.value, settings=settings,
                   batch_size=_default(_BATCH.value, config.sampling.batch_size),
                   use_ema=_default(_USE_EMA.value, config.sampling.use_ema), metrics=_METRICS.value,
                   reference=_REFERENCE.value, inception_weights=_INCEPTION.value)
    else:
      from flowar_jax.commands import sample
      workdir = _need(_WORKDIR.value, "workdir")
      config = _CONFIG.value or sample.stored_config(workdir)
      settings = sample.settings_from(config, cfg=_CFG.value, num_steps=_NUM_STEPS.value,
                                      guidance=_GUIDANCE.value, solver=_SOLVER.value,
                                      compute_dtype=_COMPUTE_DTYPE.value)
      sample.sample_to_workdir(config, workdir, num_samples=_default(_NUM_SAMPLES.value, config.sampling.num_samples),
                               seed=_SEED.value, settings=settings, labels=_parse_labels(_LABELS.value),
                               batch_size=_default(_BATCH.value, config.sampling.batch_size),
                               use_ema=_default(_USE_EMA.value, True))
  except Preempted as e:  # a checkpoint is saved; exit non-zero so that the scheduler reruns the command
    print(f"flowar-jax {command}: {e}", file=sys.stderr)
    sys.exit(EXIT_CODE)
  except NonFiniteError as e:
    print(f"flowar-jax {command}: error: {e}", file=sys.stderr)
    sys.exit(1)
  except (ValueError, FileNotFoundError, NotADirectoryError, ImportError) as e:
    print(f"flowar-jax {command}: error: {e}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def run() -> None:
  """Console-script entry point (`flowar-jax`)."""
  use_storage_emulator()
  app.run(main, flags_parser=parse_flags)
