"""flowar_jax against the official PyTorch FlowAR on this machine, in one run: training and sampling speed at
the same sizes, as ratios of medians.

  python benchmarks/versus_official.py --official /path/to/FlowAR --official_python /path/to/torch-venv/bin/python
      [--preset reduced] [--batch 16] [--rounds 3] [--dtypes float32,bfloat16] [--json figures.json]

Each round runs, one after another in fresh processes: the official code (`official_throughput.py`, training
and sampling), then `train_throughput.py` and `sample_throughput.py` for each compute dtype. Rounds interleave
the implementations so that a slow spell of a shared machine hits them alike; the figures are the medians
over rounds of each process's own median. Prints one JSON line per process and a summary table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(command: list[str]) -> dict:
  """Runs a benchmark process and returns the JSON object of its last line of output."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
  if done.returncode != 0 or not lines:
    raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
  result = json.loads(lines[-1])
  print(json.dumps(result), flush=True)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--official", required=True, help="checkout of the official FlowAR repository")
  parser.add_argument("--official_python", required=True, help="a Python with torch installed")
  parser.add_argument("--preset", default="reduced")
  parser.add_argument("--batch", type=int, default=16, help="training batch")
  parser.add_argument("--sample_batch", type=int, default=16)
  parser.add_argument("--num_steps", type=int, default=25)
  parser.add_argument("--cfg", type=float, default=4.0)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=5, help="timed repetitions within each process")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="flowar_jax compute dtypes to measure")
  parser.add_argument("--json", help="also write the summary to this file")
  args = parser.parse_args()

  sizes = ["--preset", args.preset]
  sampling = ["--num_steps", str(args.num_steps), "--cfg", str(args.cfg)]
  dtypes = args.dtypes.split(",")
  train_s = {name: [] for name in ["official"] + dtypes}
  sample_s = {name: [] for name in ["official"] + dtypes}
  ours: dict = {}
  for _ in range(args.rounds):
    official = run_json([args.official_python, os.path.join(HERE, "official_throughput.py"), "--official",
                         args.official, *sizes, "--batch", str(args.batch), "--sample_batch", str(args.sample_batch),
                         "--repeats", str(args.repeats), *sampling])
    train_s["official"].append(official["step_s"])
    sample_s["official"].append(official["sample_s_per_img"])
    for dtype in dtypes:
      common = [*sizes, "--compute_dtype", dtype, "--repeats", str(args.repeats)]
      train = run_json([sys.executable, os.path.join(HERE, "train_throughput.py"), *common, "--batch",
                        str(args.batch)])
      sample = run_json([sys.executable, os.path.join(HERE, "sample_throughput.py"), *common, "--batch",
                         str(args.sample_batch), *sampling])
      train_s[dtype].append(train["step_s"])
      sample_s[dtype].append(sample["s_per_img"])
      ours[dtype] = train

  median = lambda xs: statistics.median(xs)
  summary = {"device": ours[dtypes[0]]["device"], "preset": args.preset, "batch": args.batch,
             "sample_batch": args.sample_batch, "num_steps": args.num_steps, "cfg": args.cfg, "rounds": args.rounds}
  print(f"\n{'':>22} {'train s/step':>12} {'imgs/s':>8} {'vs official':>11} {'sample s/img':>13} {'vs official':>11}")
  for name in ["official"] + dtypes:
    step, per_image = median(train_s[name]), median(sample_s[name])
    train_ratio = median(train_s["official"]) / step
    sample_ratio = median(sample_s["official"]) / per_image
    label = "official (PyTorch)" if name == "official" else f"flowar_jax {name}"
    print(f"{label:>22} {step:12.3f} {args.batch / step:8.2f} {train_ratio:10.2f}x {per_image:13.4f} {sample_ratio:10.2f}x")
    summary[name] = {"train_step_s": step, "train_imgs_per_s": round(args.batch / step, 2),
                     "train_vs_official": round(train_ratio, 3), "sample_s_per_img": per_image,
                     "sample_vs_official": round(sample_ratio, 3),
                     "train_step_s_rounds": train_s[name], "sample_s_per_img_rounds": sample_s[name]}
    if name != "official":
      flops = ours[name]["model_gflop_per_step"] * 1e9
      limit = ours[name].get("matmul_gflops_float32")
      if limit:  # the float32 matrix-product limit, measured in this run
        summary[name]["fraction_of_float32_matmul_limit"] = round(flops / (limit * 1e9) / step, 3)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main()
