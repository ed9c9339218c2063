"""Keeps XLA:CPU's large buffers on the C heap, where they are reused, instead of fresh pages per call.

glibc's malloc serves every request of 32 MiB or more with its own `mmap` and unmaps it on `free`. XLA:CPU
allocates each program's large temporaries and outputs anew on every call, so such a buffer (the flow head's
MLP activations of the last scale, `[B * 2 * 256, 1024]` float32 at batch 16 with CFG, is exactly 32 MiB) is
faulted in page by page each time: a product that runs in 2 ms on the heap takes 13 to 15 ms on fresh
pages (benchmarks/malloc_products.py). Turning off malloc's mmap path and its trimming keeps freed blocks in
the heap for the next call. The cost is that memory freed at the peak is not returned to the system until
the process exits, which a training or sampling process would need again anyway.

Applied by the command line for runs on the CPU backend (and by the CPU benchmarks); set
FLOWAR_JAX_CPU_HEAP=0 to leave malloc as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt's int parameter takes
_OPT_OUT = "FLOWAR_JAX_CPU_HEAP"


def keep_large_buffers_on_heap() -> bool:
  """Sets glibc's malloc to serve large blocks from the heap and never trim it; -> whether it did (False on
  another C library, or when FLOWAR_JAX_CPU_HEAP=0). Only later allocations are affected."""
  if os.environ.get(_OPT_OUT, "1") == "0":
    return False
  name = ctypes.util.find_library("c")
  if name is None:
    return False
  libc = ctypes.CDLL(name)
  if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
    return False  # not glibc: its allocator has its own rules
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def keep_large_buffers_on_heap_for_cpu() -> bool:
  """`keep_large_buffers_on_heap` when JAX's default backend is the CPU (accelerator hosts keep malloc's
  defaults: their large buffers live in device memory); -> whether it was applied."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend() == "cpu" and keep_large_buffers_on_heap()
