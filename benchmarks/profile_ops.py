"""Where the time of a compiled training step or sampling call goes, op by op, on the device it runs on.

  python benchmarks/profile_ops.py --mode sample|train [--preset reduced] [--compute_dtype bfloat16]
      [--batch 16] [--num_steps 25 --cfg 4.0] [--repeats 2] [--top 25] [--json ops.json]

Compiles the same program as `sample_throughput.py` or `train_throughput.py`, runs it `--repeats` times under
`jax.profiler.trace` and reads the trace's per-op events (one per executed HLO op: a product, a fusion, a copy).
Each op is named by what it computes and where the model builds it: its class ('product bf16' for a dot with
bf16 operands, 'elementwise', 'reduction', 'transpose/copy', ...) and the source line of the model code that
emitted it, with the enclosing function. Prints the share of the summed op time of the top rows and of
each class. An op's time is the median of its executions times their number (robust to preemption on a shared
machine); ops may overlap on a thread pool, so shares are of the summed op time, not of wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.sample_throughput import add_sampling_flags, compiled_sampler  # noqa: E402
from benchmarks.throughput_common import add_model_flags, apply_malloc  # noqa: E402
from benchmarks.timing import report  # noqa: E402
from benchmarks.train_throughput import compiled_train_step  # noqa: E402

CONTAINERS = {"while", "call", "conditional"}  # their events span the ops of their bodies
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z\-]+)\((.*)$")


def _table(text: str, name: str) -> list[str]:
  """The lines of one of the compiled HLO text's debug tables (FileNames, FunctionNames, FileLocations,
  StackFrames)."""
  start = text.find("\n" + name + "\n")
  if start < 0:
    return []
  return text[start + len(name) + 2:].split("\n\n")[0].splitlines()


def stack_frames(text: str) -> dict[int, list[tuple[str, str, int]]]:
  """{stack frame id: [(file, function, line), ...] innermost first} from the compiled HLO text's tables."""
  files = {int(i): n.strip('"') for i, n in (l.split(None, 1) for l in _table(text, "FileNames") if l.strip())}
  funcs = {int(i): n.strip('"') for i, n in (l.split(None, 1) for l in _table(text, "FunctionNames") if l.strip())}
  locations, parents = {}, {}
  for line in _table(text, "FileLocations"):
    m = re.match(r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", line)
    if m:
      locations[int(m[1])] = (files[int(m[2])], funcs[int(m[3])], int(m[4]))
  frames = {}
  for line in _table(text, "StackFrames"):
    m = re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", line)
    if m:
      frames[int(m[1])] = (int(m[2]), int(m[3]) - 1)  # the printed parent id is one past the parent's id
  chains = {}
  for frame in frames:
    chain, f = [], frame
    while f in frames and len(chain) < 64:
      location, parent = frames[f]
      chain.append(locations[location])
      f = parent
    chains[frame] = chain
  return chains


def parse_hlo(text: str) -> tuple[dict, dict]:
  """Compiled HLO text -> ({instruction: (opcode, result type, operands text, called computation,
  model code)}, {computation: [(name, opcode, result type, operands text) of its instructions]})."""
  chains = stack_frames(text)
  instructions, computations = {}, collections.defaultdict(list)
  current = None
  for line in text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if header and " = " not in line:
      current = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, result, opcode, rest = match.groups()
    calls = re.search(r"calls=%?([\w.\-]+)", rest)
    frame = re.search(r"stack_frame_id=(\d+)", rest)
    instructions[name] = (opcode, result, rest, calls.group(1) if calls else None,
                          where(chains.get(int(frame.group(1)), []) if frame else []))
    computations[current].append((name, opcode, result, rest))
  return instructions, computations


def where(chain: list[tuple[str, str, int]]) -> str:
  """The innermost two frames of flowar_jax's model and sampling code that built an op, as
  'function (file:line) < caller (file:line)'."""
  own = [(f, fn, line) for f, fn, line in chain
         if "/flowar_jax/" in f and not f.endswith(("precision.py", "/parallel/blocks.py", "/parallel/logical.py"))]
  parts = [f"{fn} ({os.path.basename(f)}:{line})" for f, fn, line in own[:2]]
  return " < ".join(parts) or "?"


def describe(name: str, instructions: dict, computations: dict) -> tuple[str, str]:
  """(class, model code) of an executed op: what it computes, from its opcode and, for a fusion, the ops it
  fuses; where the model builds it. A fusion of several products (XLA:CPU fuses chains of products and their
  elementwise neighbours into one kernel) names the code of each product."""
  opcode, result, rest, calls, place = instructions.get(name, ("?", "", "", None, "?"))
  inner = computations.get(calls, []) if calls else [(name, opcode, result, rest)]
  types = {n: r for n, _, r, _ in inner}
  dots = [(n, text) for n, o, _, text in inner if o in ("dot", "convolution")]
  if dots:
    lhs = re.match(r"\s*%?([\w.\-]+)", dots[0][1])
    dtype = types.get(lhs.group(1), "?") if lhs and calls else "?"  # an unfused product's operands are outside
    kind = f"product {dtype.split('[')[0]}" + (f" x{len(dots)}" if len(dots) > 1 else "")
    if len(dots) > 1:
      place = " + ".join(dict.fromkeys(instructions[n][4].split(" < ")[0] for n, _ in dots if n in instructions))
    return kind, place
  opcodes = {o for _, o, _, _ in inner} - {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}
  if opcode == "custom-call" or "custom-call" in opcodes:
    return "custom-call", place
  if opcodes <= {"copy", "transpose", "broadcast", "reshape", "slice", "concatenate", "pad", "convert",
                 "dynamic-slice", "dynamic-update-slice"}:
    return "data movement", place
  if opcodes & {"reduce", "reduce-window"}:
    return "reduction (+elementwise)", place
  if opcodes & {"exponential", "tanh", "erf", "log", "rsqrt", "sine", "cosine", "logistic", "power"}:
    return "elementwise (transcendental)", place
  return "elementwise", place


def op_times(call, repeats: int) -> tuple[dict, float]:
  """Runs `call` `repeats` times under the profiler: ({op name: microseconds}, wall seconds).

  An op's time is the median of its executions times their number: an op in a loop body runs hundreds of times
  per call, and the median keeps a spell of preemption on a shared machine (one execution that lost a time
  slice) from being charged to whatever op it fell in."""
  with tempfile.TemporaryDirectory() as directory:
    start = time.perf_counter()
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      for _ in range(repeats):
        call()
    wall = time.perf_counter() - start
    path = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  durations = collections.defaultdict(list)
  for event in events:
    if event.get("ph") == "X":
      durations[event["name"]].append(event.get("dur", 0.0))
  return {name: statistics.median(d) * len(d) for name, d in durations.items()}, wall


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(parser, default_batch=16)
  add_sampling_flags(parser)
  parser.add_argument("--remat", default="none", help="remat policy (flowar_jax.parallel.remat)")
  parser.add_argument("--mode", choices=("sample", "train"), default="sample")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--json", help="also write the figures to this file")
  parser.set_defaults(repeats=2)
  args = parser.parse_args()
  heap = apply_malloc(args)

  if args.mode == "sample":
    compiled, call, _ = compiled_sampler(args)
  else:
    compiled, call, *_ = compiled_train_step(args)
  call()  # warm-up
  instructions, computations = parse_hlo(compiled.as_text())
  times, wall = op_times(call, args.repeats)
  rows = collections.Counter()  # (class, model code) -> microseconds
  classes = collections.Counter()
  for name, micros in times.items():
    if name not in instructions or instructions[name][0] in CONTAINERS:
      continue  # runtime and Python events, and loops whose bodies are counted op by op
    kind, place = describe(name, instructions, computations)
    rows[kind, place] += micros
    classes[kind.split(" x")[0]] += micros
  total = sum(rows.values())
  print(f"{args.mode}, {args.compute_dtype}: {wall / args.repeats:.3f} s per call (wall, profiled), "
        f"summed op time {total / 1e6 / args.repeats:.3f} s per call")
  print(f"\n{'share':>6} {'s/call':>7}  {'class':<28} model code")
  for (kind, place), micros in rows.most_common(args.top):
    print(f"{micros / total:6.1%} {micros / 1e6 / args.repeats:7.3f}  {kind:<28} {place}")
  print(f"\n{'share':>6} {'s/call':>7}  class")
  for kind, micros in classes.most_common():
    print(f"{micros / total:6.1%} {micros / 1e6 / args.repeats:7.3f}  {kind}")
  report({"mode": args.mode, "preset": args.preset, "compute_dtype": args.compute_dtype, "batch": args.batch,
          "malloc": "heap" if heap else "default",
          "wall_s_per_call": round(wall / args.repeats, 4), "op_s_per_call": round(total / 1e6 / args.repeats, 4),
          "classes": {k: round(v / total, 4) for k, v in classes.most_common()},
          "top": [[k, p, round(v / total, 4)] for (k, p), v in rows.most_common(args.top)]}, args.json)


if __name__ == "__main__":
  main()
