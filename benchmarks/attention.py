"""Scale-causal attention: the Pallas kernels against XLA's masked attention, forward and forward+backward.

  python benchmarks/attention.py [--sides 16,32,64] [--batch 4] [--heads 16] [--head_dim 64]
                                 [--dtype bfloat16] [--dropout 0.0] [--repeats 20] [--tpu_aot] [--json OUT]

For each schedule (1, 2, 4, ..., S) (L = 341, 1365, 5461 for S = 16, 32, 64) it compares

  xla_dense   `jax.nn.dot_product_attention(implementation='xla')` with the dense [L, L] scale-causal mask
  reference   flowar_jax's jnp reference (the `xla` attention impl: dense scores plus the hash dropout)
  pallas      `scale_causal_attention(impl='pallas')`: the Mosaic kernels on TPU, the Triton ones on GPU

and prints, per implementation, the median wall time of the forward and of forward+backward (after a
warm-up compile and run) and the compiled program's temporary memory (`memory_analysis()`), then ratios
against xla_dense (> 1 means the kernels are faster or smaller). Memory comes from the compiler, so its
growth in L shows without running anything: `--tpu_aot` compiles all three for a v5e TPU ahead of time
(needs libtpu, the `tpu` extra) and reports those figures on any host. On a CPU the kernels only run
interpreted, so their timings are not printed there: kernel timings need a GPU or TPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from flowar_jax.kernels import ScaleCausalMask, scale_causal_attention
from flowar_jax.kernels.dropout import seed_from_rng
from flowar_jax.kernels.reference import reference_attention
from flowar_jax.scales import ScaleSchedule


def schedule_up_to(side: int) -> ScaleSchedule:
  sides, s = [], 1
  while s <= side:
    sides.append(s)
    s *= 2
  return ScaleSchedule(tuple(sides))


def implementations(mask: ScaleCausalMask, dropout: float):
  """name -> attention function (q, k, v) -> out; dropout (where supported) from a fixed key."""
  rng = jax.random.key(0) if dropout > 0 else None

  def xla_dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[None, None], implementation="xla")

  def reference(q, k, v):
    seed = seed_from_rng(rng) if rng is not None else None
    return reference_attention(q, k, v, mask, dropout_rate=dropout, seed=seed).astype(q.dtype)

  def pallas(q, k, v):
    return scale_causal_attention(q, k, v, mask, impl="pallas", dropout_rate=dropout, rng=rng)

  return {"xla_dense": xla_dense, "reference": reference, "pallas": pallas}


def forward_and_backward(attention):
  def loss(q, k, v):
    return jnp.sum(attention(q, k, v).astype(jnp.float32))

  return jax.grad(loss, argnums=(0, 1, 2))


def temp_bytes(fn, args) -> int:
  return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def median_seconds(fn, args, repeats: int) -> float:
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def tpu_aot_memory(fn, shape, dtype) -> int:
  """Temporary bytes of `fn` compiled ahead of time for one v5e chip."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")  # one chip of it
  mesh = jax.sharding.Mesh(np.array(topology.devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  x = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    return temp_bytes(fn, (x, x, x))


def run(args) -> list[dict]:
  dtype = jnp.dtype(args.dtype)
  platform = jax.default_backend()
  kernels_run = platform in ("tpu", "gpu")
  device = jax.devices()[0].device_kind
  rows = []
  for side in args.sides:
    mask = ScaleCausalMask.from_schedule(schedule_up_to(side))
    shape = (args.batch, mask.q_len, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    for name, attention in implementations(mask, args.dropout).items():
      if name == "xla_dense" and args.dropout > 0:
        continue  # jax.nn.dot_product_attention has no dropout
      row = {"L": mask.q_len, "impl": name, "device": device, "batch": args.batch, "heads": args.heads,
             "head_dim": args.head_dim, "dtype": dtype.name, "dropout": args.dropout}
      backward = forward_and_backward(attention)
      if args.tpu_aot:
        row["device"] = "TPU v5e (ahead-of-time compile)"
        row["fwd_temp_mib"] = tpu_aot_memory(attention, shape, dtype) / 2**20
        row["fwd_bwd_temp_mib"] = tpu_aot_memory(backward, shape, dtype) / 2**20
      elif name != "pallas" or kernels_run:
        row["fwd_temp_mib"] = temp_bytes(attention, (q, k, v)) / 2**20
        row["fwd_bwd_temp_mib"] = temp_bytes(backward, (q, k, v)) / 2**20
      if not args.tpu_aot and (name != "pallas" or kernels_run):
        row["fwd_ms"] = 1e3 * median_seconds(attention, (q, k, v), args.repeats)
        row["fwd_bwd_ms"] = 1e3 * median_seconds(backward, (q, k, v), args.repeats)
      rows.append(row)
      print(format_row(row), flush=True)
  return rows


def format_row(row: dict) -> str:
  def cell(key, fmt):
    return fmt.format(row[key]) if key in row else "-"
  return (f"L={row['L']:5d} {row['impl']:10s} fwd {cell('fwd_ms', '{:9.3f}')} ms  fwd+bwd "
          f"{cell('fwd_bwd_ms', '{:9.3f}')} ms  temp fwd {cell('fwd_temp_mib', '{:9.1f}')} MiB  fwd+bwd "
          f"{cell('fwd_bwd_temp_mib', '{:9.1f}')} MiB")


def print_ratios(rows: list[dict]) -> None:
  baseline = "xla_dense" if any(r["impl"] == "xla_dense" for r in rows) else "reference"
  print(f"\n{baseline} vs pallas (time ratios > 1: the kernels are faster)")
  for length in sorted({r["L"] for r in rows}):
    by_impl = {r["impl"]: r for r in rows if r["L"] == length}
    base, kernel = by_impl.get(baseline), by_impl.get("pallas")
    if base is None or kernel is None:
      continue
    parts = []
    for key in ("fwd_ms", "fwd_bwd_ms"):
      if key in base and key in kernel:
        parts.append(f"{key[:-3]} time {base[key] / kernel[key]:6.2f}x")
    for key in ("fwd_temp_mib", "fwd_bwd_temp_mib"):
      if key in base and key in kernel:  # temporaries can be 0 (all fused), so print both
        parts.append(f"{key[:-9]} temp {base[key]:.1f} -> {kernel[key]:.1f} MiB")
    print(f"L={length:5d}  " + ("  ".join(parts) if parts else "no kernel figures on this platform"))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sides", default="16,32,64", help="finest side of each (1, 2, 4, ..., S) schedule")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--dropout", type=float, default=0.0)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--tpu_aot", action="store_true", help="memory from an ahead-of-time v5e compile")
  parser.add_argument("--json", default="", help="also write the rows to this JSON file")
  args = parser.parse_args()
  args.sides = [int(s) for s in args.sides.split(",")]
  print(f"platform {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; "
        f"batch {args.batch}, heads {args.heads}, head dim {args.head_dim}, {args.dtype}, dropout {args.dropout}")
  if jax.default_backend() not in ("tpu", "gpu") and not args.tpu_aot:
    print("the Pallas kernels only run interpreted on this platform: their timings need a GPU or TPU")
  rows = run(args)
  print_ratios(rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
