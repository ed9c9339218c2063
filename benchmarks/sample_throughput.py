"""FlowAR sampling throughput: images/s of the compiled sampler (KV-cached AR pass, per-scale ODE, CFG).

  python benchmarks/sample_throughput.py [--preset reduced|S|B|L|H] [--batch 16] [--num_steps 25] [--cfg 4.0]
      [--guidance 0.9] [--solver euler|heun] [--compute_dtype bfloat16]

Times latent generation (the VAE decode is a fixed cost per image that both implementations share) on random
weights: the median over `--repeats` calls after compile and one warm-up call. Prints seconds per image,
images/s, the model FLOPs per image (`flowar_jax.models.flops`, counting every ODE step) and the rate they
run at, and on a TPU or GPU the FLOPs utilisation.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.throughput_common import (add_model_flags, apply_malloc, median_seconds, model_config,  # noqa: E402
                                          peak_flops)
from benchmarks.timing import report  # noqa: E402
from flowar_jax.config import validate_config  # noqa: E402
from flowar_jax.models.flops import sampling_flops_per_image  # noqa: E402
from flowar_jax.models.registry import build_model  # noqa: E402
from flowar_jax.models.time_grid import SOLVERS  # noqa: E402
from flowar_jax.sampling.sampler import Sampler, SamplingSettings  # noqa: E402


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--num_steps", type=int, default=25)
  parser.add_argument("--cfg", type=float, default=4.0)
  parser.add_argument("--guidance", type=float, default=0.9)
  parser.add_argument("--solver", choices=SOLVERS, default="euler")
  parser.add_argument("--scale_steps", default="", help="ODE steps per scale, coarsest first (e.g. 4,4,8,8,16)")
  parser.add_argument("--latent_channels", type=int, default=16)


def compiled_sampler(args: argparse.Namespace):
  """(compiled sampling program, a call that runs it once and blocks on it, model FLOPs per call) for the flags."""
  config = model_config(args)
  config.vae.latent_channels = args.latent_channels
  validate_config(config)
  settings = SamplingSettings(cfg=args.cfg, guidance=args.guidance, num_steps=args.num_steps, solver=args.solver,
                              compute_dtype=args.compute_dtype,
                              scale_steps=tuple(int(n) for n in args.scale_steps.split(",") if n))
  sampler = Sampler(build_model(config), settings)
  labels = sampler.check_labels(np.arange(args.batch) % config.model.num_classes)
  compiled = sampler.lower(args.batch).compile()
  flops = sampling_flops_per_image(config, settings) * args.batch  # XLA's count sees each loop body once
  state = sampler.lower_args(args.batch)[0]
  seed, first = np.int32(0), np.int32(0)
  return compiled, lambda: jax.block_until_ready(compiled(state, labels, seed, first)), flops


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(parser, default_batch=16)
  add_sampling_flags(parser)
  parser.add_argument("--json", help="also write the figures to this file")
  args = parser.parse_args()
  heap = apply_malloc(args)

  _, call, flops = compiled_sampler(args)
  seconds, times = median_seconds(call, args.repeats)
  out = {
      "device": jax.devices()[0].device_kind, "preset": args.preset, "batch": args.batch,
      "num_steps": args.num_steps, "cfg": args.cfg, "guidance": args.guidance, "solver": args.solver,
      "scale_steps": args.scale_steps,
      "compute_dtype": args.compute_dtype, "malloc": "heap" if heap else "default",
      "call_s": round(seconds, 4), "call_s_all": [round(t, 4) for t in times],
      "s_per_img": round(seconds / args.batch, 5), "imgs_per_s": round(args.batch / seconds, 2),
      "model_gflop_per_img": round(flops / args.batch / 1e9, 2), "model_gflops": round(flops / seconds / 1e9, 1),
  }
  out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
  peak = peak_flops()
  if peak is not None:
    out.update(peak_tflops=peak / 1e12, mfu=round(flops / seconds / peak, 3))
  report(out, args.json)


if __name__ == "__main__":
  main()
