"""flowar_jax against the official PyTorch FlowAR on this machine, in one run: training and sampling speed at
the same sizes and at matched precision, as ratios of medians.

  python benchmarks/versus_official.py --official /path/to/FlowAR --official_python /path/to/torch-venv/bin/python
      [--preset reduced] [--batch 16] [--rounds 3] [--precisions float32,bfloat16] [--json figures.json]

Each precision pairs the two implementations at the same arithmetic:
  float32:  the official code in float32 against flowar_jax with compute_dtype float32;
  bfloat16: the official training forward and `sample_tokens` under `torch.autocast("cpu", torch.bfloat16)`
            (bf16 products, as its engine samples under CUDA autocast) against flowar_jax with compute_dtype
            bfloat16 (bf16 product operands, float32 accumulation and everything else float32).
Each round runs, one after another in fresh processes and for each precision: the official code
(`official_throughput.py`, training and sampling), `train_throughput.py` and `sample_throughput.py`; the order of
the implementations alternates between rounds, so that a slow spell of a shared machine hits them alike. The
figures are the medians over rounds of each process's own median; the ratios are official time over flowar_jax
time (above 1: flowar_jax is faster). Prints one JSON line per process and a summary table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PRECISIONS = ("float32", "bfloat16")


# glibc's malloc with large blocks kept on the heap: the setting flowar_jax's command line makes for itself
# (flowar_jax/host_allocator.py), given to the official process from outside with --official_malloc heap.
HEAP_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"


def run_json(command: list[str], extra_env: dict[str, str] | None = None) -> dict:
  """Runs a benchmark process and returns the JSON object of its last line of output."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), **(extra_env or {}))
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
  parser.add_argument("--precisions", default="float32,bfloat16",
                      help="matched precisions to compare, from " + ",".join(PRECISIONS))
  parser.add_argument("--malloc", choices=("heap", "default"), default="heap",
                      help="flowar_jax's processes: large CPU buffers on the heap, as its command line runs "
                           "(heap), or glibc's own rules (default)")
  parser.add_argument("--official_malloc", choices=("default", "heap"), default="default",
                      help="the official process: as it ships (default), or with the same heap setting, through "
                           "GLIBC_TUNABLES")
  parser.add_argument("--json", help="also write the summary to this file")
  args = parser.parse_args()
  precisions = args.precisions.split(",")
  unknown = sorted(set(precisions) - set(PRECISIONS))
  if unknown:
    parser.error(f"--precisions: unknown {unknown}; choose from {list(PRECISIONS)}")

  sizes = ["--preset", args.preset]
  sampling = ["--num_steps", str(args.num_steps), "--cfg", str(args.cfg)]
  # (implementation, precision) -> per-round figures
  train_s = {(who, p): [] for who in ("official", "flowar_jax") for p in precisions}
  sample_s = {key: [] for key in train_s}
  rss = {key: [] for key in train_s}
  loads = []
  device = None
  for index in range(args.rounds):
    for precision in precisions:
      def official():
        out = run_json([args.official_python, os.path.join(HERE, "official_throughput.py"), "--official",
                        args.official, *sizes, "--batch", str(args.batch), "--sample_batch", str(args.sample_batch),
                        "--repeats", str(args.repeats), "--autocast", precision, *sampling],
                       {"GLIBC_TUNABLES": HEAP_TUNABLES} if args.official_malloc == "heap" else None)
        train_s["official", precision].append(out["step_s"])
        sample_s["official", precision].append(out["sample_s_per_img"])
        rss["official", precision].append(out["peak_rss_mb"])
        loads.append(out["load_1m"])

      def ours():
        nonlocal device
        common = [*sizes, "--compute_dtype", precision, "--repeats", str(args.repeats), "--malloc", args.malloc]
        train = run_json([sys.executable, os.path.join(HERE, "train_throughput.py"), *common, "--batch",
                          str(args.batch), "--no_matmul_rate"])
        sample = run_json([sys.executable, os.path.join(HERE, "sample_throughput.py"), *common, "--batch",
                           str(args.sample_batch), *sampling])
        train_s["flowar_jax", precision].append(train["step_s"])
        sample_s["flowar_jax", precision].append(sample["s_per_img"])
        rss["flowar_jax", precision].append(max(train["peak_rss_mb"], sample["peak_rss_mb"]))
        device = train["device"]
        loads.extend([train["load_1m"], sample["load_1m"]])

      for run in ((official, ours) if index % 2 == 0 else (ours, official)):
        run()

  median = statistics.median
  summary = {"device": device, "preset": args.preset, "batch": args.batch, "sample_batch": args.sample_batch,
             "num_steps": args.num_steps, "cfg": args.cfg, "rounds": args.rounds, "repeats": args.repeats,
             "malloc": args.malloc, "official_malloc": args.official_malloc,
             "cpus": os.cpu_count(), "load_1m_median": median(loads), "load_1m_max": max(loads)}
  print(f"\n{'':>30} {'train s/step':>12} {'imgs/s':>8} {'vs official':>11} {'sample s/img':>13} "
        f"{'vs official':>11} {'peak RSS MB':>11}")
  for precision in precisions:
    official_train, official_sample = median(train_s["official", precision]), median(sample_s["official", precision])
    for who in ("official", "flowar_jax"):
      key = (who, precision)
      step, per_image = median(train_s[key]), median(sample_s[key])
      train_ratio, sample_ratio = official_train / step, official_sample / per_image
      label = f"official {'autocast bf16' if precision == 'bfloat16' else 'float32'}" if who == "official" \
          else f"flowar_jax {precision}"
      print(f"{label:>30} {step:12.3f} {args.batch / step:8.2f} {train_ratio:10.2f}x {per_image:13.4f} "
            f"{sample_ratio:10.2f}x {max(rss[key]):11.0f}")
      summary[f"{who}_{precision}"] = {
          "train_step_s": step, "train_imgs_per_s": round(args.batch / step, 2),
          "train_vs_official": round(train_ratio, 3), "sample_s_per_img": per_image,
          "sample_vs_official": round(sample_ratio, 3), "peak_rss_mb": max(rss[key]),
          "train_step_s_rounds": train_s[key], "sample_s_per_img_rounds": sample_s[key]}
  print(f"1-minute load average over the runs: median {median(loads):.1f}, max {max(loads):.1f} "
        f"on {os.cpu_count()} CPUs")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main()
