"""FlowAR training throughput: images/s of the jitted, donated train step on cached latents.

  python benchmarks/train_throughput.py [--preset reduced|S|B|L|H] [--batch 16] [--compute_dtype bfloat16]
      [--remat full] [--width .. --depth .. --heads .. --head_depth .. --head_width ..]

Prints the median step time over `--repeats` timed steps (after compile and one warm-up step), images/s,
the step's model FLOPs (`flowar_jax.models.flops`; XLA's count is printed too), and how close the step comes to the device's limit: on a CPU the
measured rate of a large matrix product in float32 and in the step's dtype (`matmul_limit_fraction_*`), on a TPU or GPU the
chip's bf16 peak (`mfu`).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.throughput_common import (add_model_flags, apply_malloc, compiled_flops,  # noqa: E402
                                          matmul_rate, median_seconds, model_config, peak_flops)
from benchmarks.timing import report  # noqa: E402
from flowar_jax import precision  # noqa: E402
from flowar_jax.config import validate_config  # noqa: E402
from flowar_jax.models.flops import training_flops_per_step  # noqa: E402
from flowar_jax.models.params import split_params  # noqa: E402
from flowar_jax.models.registry import build_model  # noqa: E402
from flowar_jax.training.optimizer import flowar_optimizer  # noqa: E402
from flowar_jax.training.state import init_train_state, make_train_step  # noqa: E402


def latent_loss_fn(compute_dtype: str):
  def loss_fn(model, batch, rng, context, step):  # pylint: disable=unused-argument
    with precision.compute_dtype(compute_dtype):
      return model.loss(batch["latent"], batch["label"], rng)
  return loss_fn


def add_train_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--remat", default="none", help="remat policy (flowar_jax.parallel.remat)")
  parser.add_argument("--latent_channels", type=int, default=16)


def compiled_train_step(args: argparse.Namespace):
  """(compiled train step, a call that runs one step and blocks on it, model FLOPs per step, config, number of
  parameters) for the flags."""
  config = model_config(args)
  if args.remat != "none":
    config.model.remat = args.remat
  validate_config(config)
  config.vae.latent_channels = args.latent_channels
  model = build_model(config)
  graphdef, params = split_params(model)
  tx, schedule = flowar_optimizer(config.optimizer, config.batch_size, 1000)
  state = init_train_state(model, tx, seed=0)
  del model
  step = make_train_step(graphdef, latent_loss_fn(args.compute_dtype), tx, config.optimizer.ema_decay, schedule)
  side = config.model.scales[-1]
  batch = {
      "latent": jax.random.normal(jax.random.key(1), (args.batch, side, side, args.latent_channels)),
      "label": jax.random.randint(jax.random.key(2), (args.batch,), 0, config.model.num_classes),
  }
  compiled = step.lower(state, batch, None).compile()
  flops = training_flops_per_step(config)  # model FLOPs: what the step must compute, as for MFU
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch, None)
    jax.block_until_ready(metrics["loss"])

  return compiled, one_step, flops, config, sum(x.size for x in jax.tree.leaves(params))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(parser, default_batch=16)
  add_train_flags(parser)
  parser.add_argument("--no_matmul_rate", action="store_true", help="skip measuring the CPU's matrix-product rate")
  parser.add_argument("--json", help="also write the figures to this file")
  args = parser.parse_args()
  heap = apply_malloc(args)

  compiled, one_step, flops, config, num_params = compiled_train_step(args)
  seconds, times = median_seconds(one_step, args.repeats)
  out = {
      "device": jax.devices()[0].device_kind, "preset": args.preset, "params_m": round(num_params / 1e6, 2),
      "batch": args.batch, "tokens": sum(s * s for s in config.model.scales), "compute_dtype": args.compute_dtype,
      "malloc": "heap" if heap else "default",
      "remat": args.remat, "step_s": round(seconds, 4), "step_s_all": [round(t, 4) for t in times],
      "imgs_per_s": round(args.batch / seconds, 2), "model_gflop_per_step": round(flops / 1e9, 1),
      "xla_gflop_per_step": round(compiled_flops(compiled) / 1e9, 1),
  }
  out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
  peak = peak_flops()
  if peak is None and not args.no_matmul_rate:  # a CPU: the rate of a large product, in float32 and the step's dtype
    for dtype in dict.fromkeys(("float32", args.compute_dtype)):
      rate = matmul_rate(jnp.dtype(dtype))
      out.update({f"matmul_gflops_{dtype}": round(rate / 1e9, 1),
                  f"matmul_limit_step_s_{dtype}": round(flops / rate, 4),
                  f"matmul_limit_fraction_{dtype}": round(flops / rate / seconds, 3)})
  elif peak is not None:
    out.update(peak_tflops=peak / 1e12, mfu=round(flops / seconds / peak, 3))
  report(out, args.json)


if __name__ == "__main__":
  main()
