"""One matrix product of the flow head's shape, with glibc's default malloc and with large buffers kept on the
heap (flowar_jax/host_allocator.py), each in a fresh process:

  python benchmarks/malloc_products.py [--shapes 8192x256x1024,8192x256x768] [--repeats 15]
      [--torch_python /path/to/torch-venv/bin/python]

An [M, K] x [K, N] product with bf16 operands and float32 output (as `compute_dtype=bfloat16` runs) allocates
its M * N * 4 byte output on every call; at 32 MiB and above glibc maps fresh pages for it. Prints the median
milliseconds and GFLOP/s of each shape under each setting; with --torch_python, also PyTorch's `nn.Linear`
of the same shape under `torch.autocast("cpu", torch.bfloat16)` (2 threads), as the official code runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(shape: tuple[int, int, int], repeats: int, heap: bool) -> float:
  """Median seconds of one jitted product in this process."""
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if heap:
    sys.path.insert(0, os.path.dirname(HERE))
    from flowar_jax.host_allocator import keep_large_buffers_on_heap  # pylint: disable=g-import-not-at-top
    if not keep_large_buffers_on_heap():
      raise RuntimeError("this C library does not take the heap setting")
  m, k, n = shape
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
  product = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  product(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    product(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


_TORCH_CHILD = """
import sys, time
import numpy as np
import torch
torch.set_num_threads(2)
m, k, n = map(int, sys.argv[1].split("x"))
x, layer = torch.randn(m, k), torch.nn.Linear(k, n)
times = []
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
  layer(x)
  for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    layer(x)
    times.append(time.perf_counter() - start)
print(float(np.median(times)))
"""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default="8192x256x1024,8192x256x768,4096x256x1024",
                      help="comma-separated MxKxN")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--torch_python", help="a Python with torch: also time nn.Linear under bf16 autocast")
  parser.add_argument("--child", help=argparse.SUPPRESS)  # 'MxKxN,heap|default': measure in this process
  args = parser.parse_args()
  if args.child:
    shape, malloc = args.child.split(",")
    print(json.dumps({"seconds": measure(tuple(map(int, shape.split("x"))), args.repeats, malloc == "heap")}))
    return
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  print(f"{'M x K x N':>16} {'output MiB':>10} {'malloc':>8} {'ms':>8} {'GFLOP/s':>8}")
  for shape in args.shapes.split(","):
    m, k, n = map(int, shape.split("x"))
    for malloc in ("default", "heap") + (("torch",) if args.torch_python else ()):
      if malloc == "torch":
        done = subprocess.run([args.torch_python, "-c", _TORCH_CHILD, shape, str(args.repeats)],
                              capture_output=True, text=True, check=True)
        seconds = float(done.stdout.strip().splitlines()[-1])
      else:
        done = subprocess.run([sys.executable, __file__, "--child", f"{shape},{malloc}", "--repeats",
                               str(args.repeats)], capture_output=True, text=True, env=env, check=True)
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
      rate = 2 * m * k * n / seconds / 1e9
      print(f"{shape:>16} {m * n * 4 / 2**20:10.0f} {malloc:>8} {seconds * 1e3:8.2f} {rate:8.0f}", flush=True)


if __name__ == "__main__":
  main()
