"""What the throughput benchmarks share: model sizes from flags, timing, and the device's matrix-product rate."""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import ml_collections

from benchmarks.timing import median_seconds
from flowar_jax.config import base_config

# name -> (width, depth per stack, heads, head variant, head depth, head width); `reduced` is the small model
# the CPU comparisons with the official code use, the rest are the released sizes.
SIZES = {
    "reduced": (256, 2, 4, "v1", 1, 256),
    "S": (768, 6, 12, "v1", 2, 1024),
    "B": (1024, 6, 16, "v1", 4, 1024),
    "L": (1024, 8, 16, "v2", 12, 1024),
    "H": (1536, 15, 16, "v2", 12, 1536),
}

# Dense bf16 peak FLOP/s per chip, for model FLOPs utilisation (MFU) on accelerators.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def add_model_flags(parser: argparse.ArgumentParser, default_batch: int) -> None:
  parser.add_argument("--preset", choices=sorted(SIZES), default="reduced",
                      help="model size; the flags below override its parts")
  parser.add_argument("--width", type=int)
  parser.add_argument("--depth", type=int, help="blocks per backbone stack")
  parser.add_argument("--heads", type=int)
  parser.add_argument("--head_variant", choices=("v1", "v2"))
  parser.add_argument("--head_depth", type=int)
  parser.add_argument("--head_width", type=int)
  parser.add_argument("--scales", default="1,2,4,8,16", help="scale sides; the last is the latent side")
  parser.add_argument("--batch", type=int, default=default_batch)
  parser.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--attention_impl", choices=("xla", "pallas", "auto"), default="xla")
  parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (the median is reported)")
  parser.add_argument("--malloc", choices=("heap", "default"), default="heap",
                      help="heap: large CPU buffers stay on the C heap, as the command line sets it "
                           "(flowar_jax/host_allocator.py); default: glibc's own rules")


def apply_malloc(args: argparse.Namespace) -> bool:
  """The `--malloc` choice, before anything large is allocated; -> whether the heap setting is on."""
  from flowar_jax.host_allocator import keep_large_buffers_on_heap_for_cpu  # pylint: disable=g-import-not-at-top
  return args.malloc == "heap" and keep_large_buffers_on_heap_for_cpu()


def model_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The full config for the flags (ImageNet classes, 16 latent channels)."""
  width, depth, heads, variant, head_depth, head_width = SIZES[args.preset]
  c = base_config()
  c.model.width = args.width or width
  c.model.depth = args.depth or depth
  c.model.num_heads = args.heads or heads
  c.model.head.variant = args.head_variant or variant
  c.model.head.depth = args.head_depth or head_depth
  c.model.head.width = args.head_width or head_width
  c.model.scales = tuple(int(s) for s in args.scales.split(","))
  c.data.image_size = c.model.scales[-1] * 16  # the KL-16 VAE's stride
  c.model.compute_dtype = args.compute_dtype
  c.model.attention_impl = args.attention_impl
  c.batch_size = args.batch
  return c


def matmul_rate(dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a `size`^3 matrix product on the default device: the practical limit a model step can reach.

  bf16 operands accumulate in (and return) float32, as the model's products do (`flowar_jax.precision`)."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  product = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  seconds, _ = median_seconds(lambda: product(a, b).block_until_ready(), repeats)
  return 2 * size ** 3 / seconds


def peak_flops() -> float | None:
  """The device's dense bf16 peak from its kind, or None (e.g. a CPU)."""
  kind = jax.devices()[0].device_kind
  for name, peak in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name):
      return peak
  return None


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled program, from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))
