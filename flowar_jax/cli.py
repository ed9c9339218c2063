"""Command line: `python -m flowar_jax COMMAND --config CONFIG[:ARG] [--config.key=value ...] --workdir DIR`.

`python -m flowar_jax --help` lists the commands (`COMMANDS` below), `python -m flowar_jax COMMAND --help` a
command's flags. A mistake a user can fix (a path, a flag, a config value) ends in one line naming it and
exit code 2, without a traceback unless `--verbose` (or `-v N`) asks for one.

`train`, `sample` and `evaluate` start multi-process JAX first when the launch environment asks for it
(`flowar_jax.parallel.distributed`: TPU pods, SLURM, or explicit JAX_COORDINATOR_ADDRESS).
"""
from __future__ import annotations

import logging as std_logging
import os
import re
import sys
import traceback
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from flowar_jax.commands.flag_errors import USAGE_EXIT_CODE, parse_flags
from flowar_jax.commands.help_text import Command, closest, command_help, command_list
from flowar_jax.models.time_grid import SOLVERS
from flowar_jax.runs.fs import use_storage_emulator

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/digits.py (a preset) or "
                                          "configs/sweeps/FILE.py:ARG", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (local or gs://): checkpoints, logs and samples")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "number of images")
_SEED = flags.DEFINE_integer("seed", 0, "sample i draws its noise from (seed, i)")
_CFG = flags.DEFINE_float("cfg", None, "classifier-free guidance scale, 1 disables it (default: config.sampling.cfg)")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "FlowAR: ODE steps per scale (default: config.sampling.num_steps);"
                                 " HART: the residual head's steps, diffusion or flow (default: "
                                 "config.model.residual.num_steps)")
_GUIDANCE = flags.DEFINE_float("guidance", None, "guidance applies where t <= this (default: "
                               "config.sampling.guidance)")
_SOLVER = flags.DEFINE_enum("solver", None, list(SOLVERS), "ODE solver (default: config.sampling.solver)")
_SCALE_STEPS = flags.DEFINE_list("scale_steps", None, "ODE steps at each scale, coarsest first, in place of "
                                  "--num_steps (default: config.sampling.scale_steps)")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                                   "dtype of the matrix products (default: config.sampling.compute_dtype)")
_TOP_K = flags.DEFINE_integer("top_k", None, "VAR, HART: sample among the k likeliest codes, 0 = all (default: "
                              "config.sampling.top_k)")
_TOP_P = flags.DEFINE_float("top_p", None, "VAR, HART: nucleus sampling threshold, 0 = off (default: "
                             "config.sampling.top_p)")
_LABELS = flags.DEFINE_list("labels", None, "class labels, repeated to num_samples (default: every class in turn)")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "text-to-image: a prompt (repeatable), e.g. "
                                    "\"a 4 to the left of a 9\"")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "text-to-image: a file of prompts, one per line")
_BATCH = flags.DEFINE_integer("batch_size", None, "images per compiled batch (default: config.sampling.batch_size)")
_USE_EMA = flags.DEFINE_boolean("use_ema", None, "sample with the EMA weights (default: yes)")
_FROM_TORCH = flags.DEFINE_string("from_torch", None, "official FlowAR or VAR checkpoint (.pth, .safetensors or "
                                  ".npz): a path, an http(s) URL or a Hugging Face OWNER/REPO/FILE, e.g. "
                                  "OliverRen/FlowAR/FlowAR-S.pth (downloaded once, then cached)")
_VAE_TORCH = flags.DEFINE_string("vae_torch", None, "the tokenizer's checkpoint: MAR's KL-16 VAE, VAR's VQVAE or "
                                 "HART's hybrid tokenizer (.pth, .ckpt or .npz; a path, URL or Hugging Face "
                                 "OWNER/REPO/FILE); without it, sampling needs --config.vae_checkpoint")
_TRUST_PICKLE = flags.DEFINE_boolean("trust_pickle", False, "read torch files with full unpickling, for trusted "
                                     "files that hold Python objects besides tensors")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2 or v5p:4x4x4")
_SAMPLER = flags.DEFINE_boolean("sampler", True, "also compile the sampler")
_METRICS = flags.DEFINE_list("metrics", None, "any of fid, sfid, is, precision, recall, digits, or alignment (text runs) (default: "
                             "config.eval.metrics)")
_REFERENCE = flags.DEFINE_string("reference", None, "ADM-layout reference .npz, or dataset:train / dataset:eval "
                                 "(default: config.eval.reference)")
_INCEPTION = flags.DEFINE_string("inception_weights", None, "FID Inception weights (.pth, .npz or the TF graph "
                                 ".pb; default: config.eval.inception_weights, else ~/.cache/flowar_jax)")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
_PORT = flags.DEFINE_integer("port", 8000, "port to listen on (0: any free port)")
_CFG_CHOICES = flags.DEFINE_list("cfg_choices", None, "guidance scales the page offers, one compiled sampler each "
                                 "(default: 1 and --cfg)")
_MAX_SAMPLES = flags.DEFINE_integer("max_samples", None, "most images one request may ask for (default: 4 batches)")
_IMAGE = flags.DEFINE_string("image", None, "image to edit (PNG, JPEG, ...; local or gs://)")
_MASK = flags.DEFINE_string("mask", None, "mask image of the same size: white pixels are generated")
_BOX = flags.DEFINE_string("box", None, "generate a box instead of a mask: y0,x0,y1,x1 in fractions of the image")
_OUTPAINT = flags.DEFINE_string("outpaint", None, "grow the canvas by L,R,T,B pixels and generate the new area")
_LABEL = flags.DEFINE_integer("label", None, "class to generate under (default: none, unconditional)")
_OUT = flags.DEFINE_string("out", None, "output directory (default: WORKDIR/edits)")
_BLEND = flags.DEFINE_boolean("blend", False, "paste the original's pixels back outside the mask")
_FEATHER = flags.DEFINE_integer("feather", 2, "edit: fade into the original over this many kept pixels next to "
                                "the mask (0: paste it back exactly; -1: keep the decode as it is)")
_RESAMPLE = flags.DEFINE_integer("resample", None, "edit, FlowAR: resampling rounds per scale inside the ODE (the "
                                 "generated tokens noised back to --resample_from and denoised again next to the "
                                 "kept ones; default: 0, none)")
_RESAMPLE_FROM = flags.DEFINE_float("resample_from", None, "edit, FlowAR: the flow time in (0, 1] each resampling "
                                    "round starts from (default: 0.5)")
_VERBOSE = flags.DEFINE_boolean("verbose", False, "library logs, and a traceback with an error (as -v 0)")

_METAVARS = {"config": "CONFIG[:ARG]", "workdir": "DIR", "num_samples": "N", "labels": "L1,L2,...", "prompt": "TEXT",
             "prompts_file": "FILE", "scale_steps": "N1,N2,...",
             "metrics": "M1,M2,...", "from_torch": "FILE|URL|HF_ID", "vae_torch": "FILE|URL|HF_ID",
             "inception_weights": "FILE", "topology": "GEN:AxB[xC]", "reference": "REF", "cfg_choices": "C1,C2,...",
             "host": "ADDR", "port": "PORT", "max_samples": "N", "image": "FILE", "mask": "FILE",
             "box": "Y0,X0,Y1,X1", "outpaint": "L,R,T,B", "label": "L", "out": "DIR", "resample": "R",
             "resample_from": "T"}
_SAMPLING = ("cfg", "num_steps", "scale_steps", "guidance", "solver", "top_k", "top_p", "compute_dtype", "batch_size",
             "use_ema")
_STORED_CONFIG = "config file (default: the config stored with WORKDIR's checkpoint)"

COMMANDS = {
    "train": Command(
        "train the stages config.stage names (vae, the model, or both) in WORKDIR; rerunning resumes",
        "Trains the tokenizer (vae), the generator (flowar, var or hart) or both (config.stage) and samples from the "
        "result. Rerunning the same command resumes from the newest complete checkpoint in WORKDIR, data position "
        "included.",
        required=("config", "workdir"),
        notes={"workdir": "run directory (local or gs://): checkpoints/, vae/, metrics.jsonl, samples/"}),
    "sample": Command(
        "images from WORKDIR's checkpoint, by class or by prompt -> WORKDIR/samples/",
        "Samples from the newest FlowAR, VAR or HART checkpoint in WORKDIR (trained, or written by `convert`) and "
        "its tokenizer; writes WORKDIR/samples/samples.npz and grid*.png. A text-conditional FlowAR samples from "
        "--prompt or --prompts_file (and writes prompts.json).",
        required=("workdir",), optional=("config", "num_samples", "labels", "prompt", "prompts_file", "seed") + _SAMPLING,
        notes={"config": _STORED_CONFIG, "num_samples": "number of images (default: config.sampling.num_samples); "
               "with prompts, images per prompt (default: config.sampling.num_samples / the number of prompts)"}),
    "evaluate": Command(
        "FID, sFID, IS, precision/recall or the digits metric of WORKDIR's checkpoint",
        "Samples from the newest FlowAR, VAR or HART checkpoint in WORKDIR and scores the samples; writes "
        "WORKDIR/eval/<settings>/report.json. Rerunning continues from the last saved shard.",
        required=("workdir",),
        optional=("config", "metrics", "reference", "inception_weights", "num_samples", "seed") + _SAMPLING,
        notes={"config": _STORED_CONFIG, "num_samples": "number of images (default: config.eval.num_samples)",
               "use_ema": "sample with the EMA weights (default: config.sampling.use_ema)"}),
    "edit": Command(
        "inpaint, outpaint or class-edit an image with WORKDIR's checkpoint -> WORKDIR/edits/",
        "Keeps the image's tokens outside the mask at every scale and generates the rest (docs/editing.md). "
        "Give exactly one of --mask, --box or --outpaint; writes edits.npz, edit_###.png and grid.png.",
        required=("workdir", "image"),
        optional=("mask", "box", "outpaint", "label", "out", "blend", "feather", "resample", "resample_from",
                  "config", "num_samples", "seed") + _SAMPLING,
        notes={"config": _STORED_CONFIG, "num_samples": "number of edits (default: 8)",
               "workdir": "run directory holding the FlowAR or VAR checkpoint (trained or converted)"}),
    "summary": Command(
        "parameters per module of a config's generator (FlowAR, VAR or HART) and tokenizer (nothing is allocated)",
        "Prints the parameter count of each generator module, the total, and the tokenizer's.",
        required=("config",)),
    "convert": Command(
        "official PyTorch FlowAR / VAR weights and their tokenizer, or HART's tokenizer -> checkpoints in WORKDIR",
        "Converts the official FlowAR-S/L/H weights (and MAR's KL-16 VAE), VAR's (and its VQVAE), or HART's hybrid "
        "tokenizer (--vae_torch only: HART's official transformer is text-conditional) into WORKDIR, which "
        "`sample`, `evaluate` and `train` then read. Give --from_torch, --vae_torch or both. See docs/convert.md "
        "and docs/hart.md.",
        required=("config", "workdir"), optional=("from_torch", "vae_torch", "use_ema", "trust_pickle"),
        notes={"config": "config of the converted model, e.g. configs/flowar_s.py, var_d16.py, hart_digits.py",
               "workdir": "run directory to write the converted checkpoint to",
               "use_ema": "take the file's EMA weights (default: when it holds them)"}),
    "compile": Command(
        "compile training (and sampling) ahead of time for a TPU topology; print HBM and FLOPs",
        "Compiles the config's training step(s) and sampler for a TPU topology through libtpu, on any host, "
        "and prints each program's HBM per chip and FLOPs. See docs/tpu_pods.md.",
        required=("config", "topology"), optional=("sampler",)),
    "serve": Command(
        "a browser demo of WORKDIR's checkpoint: pick classes, cfg and seed, get a grid",
        "Serves a page at http://HOST:PORT/ that requests class-conditional grids from WORKDIR's newest FlowAR "
        "checkpoint. Requests wait in one queue and run one at a time on a fixed batch size, one compiled "
        "sampler per --cfg_choices value, all compiled before the server listens.",
        required=("workdir",),
        optional=("config", "host", "port", "cfg_choices", "max_samples") + _SAMPLING,
        notes={"config": _STORED_CONFIG, "workdir": "run directory holding the FlowAR checkpoint (trained or converted)",
               "cfg": "the page's default guidance scale (default: config.sampling.cfg)",
               "batch_size": "images per compiled batch (default: min(8, config.sampling.batch_size))"}),
}


class _UsageError(Exception):
  """A command line that cannot run as given (a missing or misplaced flag)."""


class _QuietOrbax(std_logging.Filter):
  """Drops Orbax's routine warnings (e.g. 'directory is read only' when sampling); keeps its errors."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.ERROR or "orbax" not in record.pathname


def _prog(argv0: str) -> str:
  return "flowar-jax" if os.path.basename(argv0) == "flowar-jax" else "python -m flowar_jax"


def _fail(message: str, command: str | None = None) -> NoReturn:
  print(f"flowar-jax{' ' + command if command else ''}: error: {message}", file=sys.stderr)
  sys.exit(USAGE_EXIT_CODE)


def _check_command(name: str) -> str:
  if name not in COMMANDS:
    guess = closest(name, list(COMMANDS))
    hint = f"did you mean {guess!r}?" if guess else f"the commands are {', '.join(COMMANDS)}"
    _fail(f"unknown command {name!r}; {hint} (--help lists them)")
  return name


def _positionals(argv: list[str]) -> list[str]:
  """The non-flag arguments of an unparsed command line (a flag's separate value is not one)."""
  found, args = [], iter(argv[1:])
  for arg in args:
    if arg == "--":
      found.extend(args)
    elif arg.startswith("-") and len(arg) > 1:
      name = arg.lstrip("-")
      if "=" not in name and (name.startswith("config.") or (name in flags.FLAGS and not flags.FLAGS[name].boolean)):
        next(args, None)
    else:
      found.append(arg)
  return found


def _bare_verbose(argv: list[str]) -> list[str]:
  """`-v` without a level (absl's -v takes one) means --verbose."""
  out = []
  for i, arg in enumerate(argv):
    level = argv[i + 1] if i + 1 < len(argv) else ""
    out.append("--verbose" if arg == "-v" and not re.fullmatch(r"-?\d+", level) else arg)
  return out


def _parse(argv: list[str]) -> list[str]:
  """Flag parsing for `app.run`: our help instead of absl's, then absl's parsing (mistakes exit 2)."""
  argv = _bare_verbose(argv)
  words = set(argv[1:argv.index("--")] if "--" in argv else argv[1:])
  full = bool(words & {"--helpfull", "-helpfull"})
  if full or words & {"-h", "-?", "--help", "-help", "--helpshort", "-helpshort"}:
    positionals = _positionals(argv)
    prog = _prog(argv[0])
    if positionals:
      name = _check_command(positionals[0])
      print(command_help(prog, name, COMMANDS[name], flags.FLAGS, _METAVARS), end="")
    else:
      print(command_list(prog, COMMANDS), end="")
    if full:
      print(f"\nall flags:\n{flags.FLAGS.get_help()}")
    sys.exit(0)
  return parse_flags(argv)


def _check_flags(command: str) -> None:
  """Every flag the command needs is given, and no flag given belongs only to other commands."""
  spec = COMMANDS[command]
  ours = {name for other in COMMANDS.values() for name in other.flags}
  for name in sorted(ours - set(spec.flags)):
    if flags.FLAGS[name].present:
      users = ", ".join(other for other, s in COMMANDS.items() if name in s.flags)
      raise _UsageError(f"--{name} does not apply to {command} (it is a flag of {users})")
  for name in spec.required:
    if flags.FLAGS[name].value is None:
      raise _UsageError(f"--{name} is required (`{command} --help` lists the flags)")


def _default(value, fallback):
  return fallback if value is None else value


def _parse_labels(raw: list[str] | None) -> list[int] | None:
  if raw is None:
    return None
  try:
    return [int(x) for x in raw]
  except ValueError as e:
    raise ValueError(f"--labels must be comma-separated integers, got {','.join(raw)!r}") from e


def _parse_floats(name: str, raw: list[str]) -> list[float]:
  try:
    return [float(x) for x in raw]
  except ValueError as e:
    raise ValueError(f"--{name} must be comma-separated numbers, got {','.join(raw)!r}") from e


def _check_checkpoint(workdir: str) -> None:
  """`sample` and `evaluate` read a generator's checkpoint: say how to get one before anything else runs."""
  from flowar_jax.runs.checkpointing import checkpoint_exists  # pylint: disable=g-import-not-at-top
  from flowar_jax.runs.workdir import checkpoint_dir  # pylint: disable=g-import-not-at-top
  if not checkpoint_exists(checkpoint_dir(workdir)):
    raise FileNotFoundError(f"no model checkpoint in {checkpoint_dir(workdir)!r}: train one into that workdir "
                            f"(`train --workdir`) or convert official weights into it (`convert --workdir`)")


def _stored_run():
  """(workdir, config, sampling settings) of a command that samples from WORKDIR's checkpoint: the config is
  --config or the one stored with the checkpoint, the settings its sampling section with the flags' overrides."""
  from flowar_jax.runs.stored_config import stored_config
  from flowar_jax.sampling.generate import settings_from
  workdir = _WORKDIR.value
  _check_checkpoint(workdir)
  config = _CONFIG.value or stored_config(workdir)
  settings = settings_from(config, cfg=_CFG.value, num_steps=_NUM_STEPS.value, guidance=_GUIDANCE.value,
                           solver=_SOLVER.value, compute_dtype=_COMPUTE_DTYPE.value, top_k=_TOP_K.value,
                           top_p=_TOP_P.value, scale_steps=_parse_scale_steps(_SCALE_STEPS.value))
  return workdir, config, settings


def _run(command: str) -> None:
  if command in ("train", "sample", "evaluate", "edit"):
    from flowar_jax.parallel.distributed import initialize_from_environment
    initialize_from_environment()
  if command in ("train", "sample", "evaluate", "edit", "serve"):
    from flowar_jax.host_allocator import keep_large_buffers_on_heap_for_cpu
    keep_large_buffers_on_heap_for_cpu()
  if command == "summary":
    from flowar_jax.commands.summary import summarize
    print(summarize(_CONFIG.value))
  elif command == "train":
    from flowar_jax.commands import train
    train.run(_CONFIG.value, _WORKDIR.value)
  elif command == "compile":
    from flowar_jax.commands import compile as compile_command
    compile_command.run(_CONFIG.value, _TOPOLOGY.value, sampler=_SAMPLER.value)
  elif command == "convert":
    from flowar_jax.commands import convert
    convert.run(_CONFIG.value, _WORKDIR.value, flowar_path=_FROM_TORCH.value, vae_path=_VAE_TORCH.value,
                use_ema=_USE_EMA.value, trust_pickle=_TRUST_PICKLE.value)
  elif command == "serve":
    from flowar_jax.commands import serve
    workdir, config, settings = _stored_run()
    choices = tuple(_parse_floats("cfg_choices", _CFG_CHOICES.value)) if _CFG_CHOICES.value else None
    serve.run(config, workdir, settings=settings, cfg_choices=choices,
              batch_size=_default(_BATCH.value, min(8, config.sampling.batch_size)),
              max_samples=_MAX_SAMPLES.value, use_ema=_default(_USE_EMA.value, True), host=_HOST.value,
              port=_PORT.value)
  elif command == "evaluate":
    from flowar_jax.commands import evaluate
    workdir, config, settings = _stored_run()
    evaluate.run(config, workdir, num_samples=_default(_NUM_SAMPLES.value, config.eval.num_samples),
                 seed=_SEED.value, settings=settings,
                 batch_size=_default(_BATCH.value, config.sampling.batch_size),
                 use_ema=_default(_USE_EMA.value, config.sampling.use_ema), metrics=_METRICS.value,
                 reference=_REFERENCE.value, inception_weights=_INCEPTION.value)
  elif command == "edit":
    from flowar_jax.commands import edit
    edit_settings = edit.edit_settings(feather=_FEATHER.value, resample=_RESAMPLE.value,
                                       resample_from=_RESAMPLE_FROM.value)  # flag errors before the checkpoint's
    workdir, config, settings = _stored_run()
    edit.run(config, workdir, image=_IMAGE.value, mask=_MASK.value, box=_BOX.value, outpaint=_OUTPAINT.value,
             label=_LABEL.value, out=_OUT.value, num_samples=_default(_NUM_SAMPLES.value, 8), seed=_SEED.value,
             settings=settings, batch_size=_default(_BATCH.value, config.sampling.batch_size),
             use_ema=_default(_USE_EMA.value, True), blend_original=_BLEND.value,
             edit=edit_settings)
  else:
    from flowar_jax.commands import sample
    workdir, config, settings = _stored_run()
    sample.run(config, workdir, seed=_SEED.value, labels=_parse_labels(_LABELS.value),
               num_samples=_NUM_SAMPLES.value, batch_size=_BATCH.value, use_ema=_USE_EMA.value, settings=settings,
               prompts=_PROMPT.value, prompts_file=_PROMPTS_FILE.value)


def _parse_scale_steps(values: list[str] | None) -> tuple[int, ...] | None:
  if values is None:
    return None
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise ValueError(f"--scale_steps takes whole step counts, one per scale (e.g. 4,4,8), got {','.join(values)}") from None


def _known_errors() -> list[tuple[tuple[type[BaseException], ...], int, str]]:
  """(error types, exit code, label): errors that end a command with one line instead of a traceback.

  Exit codes as docs/reliability.md lists them: preempted after a checkpoint (the scheduler reruns the
  command), training stopped by non-finite steps or by storage that kept failing to read a checkpoint (1), and anything the user fixes in the command line,
  a path or the config (2).
  """
  from flowar_jax.training.nonfinite import NonFiniteError  # pylint: disable=g-import-not-at-top
  from flowar_jax.training.preemption import EXIT_CODE, Preempted  # pylint: disable=g-import-not-at-top
  from flowar_jax.runs.checkpointing import CheckpointStorageError  # pylint: disable=g-import-not-at-top
  return [((Preempted,), EXIT_CODE, ""), ((NonFiniteError, CheckpointStorageError), 1, "error: "),
          ((_UsageError, ValueError, OSError, ImportError), USAGE_EXIT_CODE, "error: ")]


def _one_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  return lines[0] + (" (... -v shows the rest)" if len(lines) > 1 else "")


def main(argv: list[str]) -> None:
  positionals = argv[1:]
  if not positionals:
    print(command_list(_prog(argv[0]), COMMANDS), end="", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)
  command = _check_command(positionals[0])
  if len(positionals) > 1:
    _fail(f"unexpected argument {positionals[1]!r} (flags start with --)", command)
  verbose = _VERBOSE.value or flags.FLAGS["verbosity"].present
  if not verbose:
    # Library logs only on request: Orbax alone writes dozens of lines per checkpoint.
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_QuietOrbax())
  try:
    _check_flags(command)
    _run(command)
  except Exception as error:  # pylint: disable=broad-except  # only the known types end quietly; others re-raise
    for types, code, label in _known_errors():
      if isinstance(error, types):
        if verbose:
          traceback.print_exc()
        print(f"flowar-jax {command}: {label}{_one_line(error)}", file=sys.stderr)
        sys.exit(code)
    raise


def run() -> None:
  """Console-script entry point (`flowar-jax`)."""
  use_storage_emulator()
  app.run(main, flags_parser=_parse)
