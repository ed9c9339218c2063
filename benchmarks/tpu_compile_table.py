"""The docs' TPU table: for each preset, the smallest slice (of those given) on which its train step fits.

  python benchmarks/tpu_compile_table.py --presets s,l,h --topologies v5p:2x2x1,v5p:2x2x2,v5p:2x2x4 \
      --remat none,full [--batch_size 2048] [--config.key=value ...]

For each preset, topologies are tried smallest first and, on each, the remat policies in the order given;
the first (topology, remat) whose programs fit is a row of the markdown table printed at the end. Every
attempt is compiled ahead of time through libtpu on this host (`flowar_jax compile`), each in its own
process (libtpu keeps memory between compiles), and its one-line result is printed as it finishes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD = """
import json, sys
from absl import flags
from ml_collections import config_flags
from flowar_jax.commands import compile as compile_command
config_flags.DEFINE_config_file("config", None, "", lock_config=True)
topology = sys.argv[1]
flags.FLAGS([sys.argv[0], *sys.argv[2:]])
report = compile_command.compile_for_topology(flags.FLAGS.config, topology, sampler=False)
print(compile_command.format_report(report), file=sys.stderr)
print("RESULT " + json.dumps({"fits": report.fits, "chips": report.chips, "programs": [
    dict(name=p.name, hbm=p.hbm_bytes, temp=p.temp_bytes, args=p.argument_bytes, flops=p.flops_per_step,
         model_flops=p.model_flops, seconds=p.compile_seconds) for p in report.programs]}))
"""


def attempt(preset: str, topology: str, remat: str, overrides: list[str]) -> dict:
  args = [f"--config={ROOT}/configs/flowar_{preset}.py", f"--config.model.remat={remat}", "--config.stage=flowar",
          *overrides]
  result = subprocess.run([sys.executable, "-c", _CHILD, topology, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), check=False)
  lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
  if result.returncode or not lines:
    return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
  return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--presets", default="s,l,h")
  parser.add_argument("--topologies", required=True, help="comma-separated, smallest first")
  parser.add_argument("--remat", default="none,full", help="policies to try per topology, in order")
  args, overrides = parser.parse_known_args()
  rows = []
  for preset in args.presets.split(","):
    found = None
    for topology in args.topologies.split(","):
      for remat in args.remat.split(","):
        result = attempt(preset, topology, remat, overrides)
        print(f"flowar_{preset} {topology} remat={remat}: {json.dumps(result)}", flush=True)
        if result.get("fits"):
          found = (topology, remat, result)
          break
      if found:
        break
    if found:
      topology, remat, result = found
      step = result["programs"][0]
      rows.append(f"| FlowAR-{preset.upper()} | {topology} ({result['chips']} chips) | {remat} | "
                  f"{step['hbm'] / 2**30:.1f} | {step['flops']:.3g} | {step['model_flops']:.3g} | "
                  f"{step['model_flops'] / step['flops']:.2f} |")
    else:
      rows.append(f"| FlowAR-{preset.upper()} | none of {args.topologies} | - | - | - | - | - |")
  print("| preset | smallest v5p slice | remat | HBM per chip (GiB) | FLOPs per step (XLA) | model FLOPs per step "
        "| model / XLA |")
  print("|---|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  main()
