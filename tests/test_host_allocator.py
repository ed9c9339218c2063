"""The heap setting for XLA:CPU's large buffers: a 64 MiB block comes from the heap once it is applied, from a
mapping of its own before, and FLOWAR_JAX_CPU_HEAP=0 leaves malloc alone. Each case runs in a fresh process,
since the setting lasts for the life of the process."""
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints (applied, growth of the [heap] mapping in bytes) around one 64 MiB allocation.
_PROBE = """
import sys
import numpy as np
from flowar_jax.host_allocator import keep_large_buffers_on_heap

def heap_bytes():
  total = 0
  with open("/proc/self/maps") as maps:
    for line in maps:
      if line.rstrip().endswith("[heap]"):
        start, stop = (int(v, 16) for v in line.split()[0].split("-"))
        total += stop - start
  return total

applied = keep_large_buffers_on_heap() if sys.argv[1] == "apply" else False
before = heap_bytes()
block = np.ones(64 << 20, np.uint8)
print(applied, heap_bytes() - before)
"""


def _probe(mode: str, **env: str) -> tuple[bool, int]:
  done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                        env=dict(os.environ, PYTHONPATH=ROOT, **env))
  applied, growth = done.stdout.split()
  return applied == "True", int(growth)


pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc",
                                reason="the setting is glibc's")


def test_large_blocks_come_from_the_heap_once_applied():
  applied, growth = _probe("apply")
  assert applied
  assert growth > 48 << 20  # the heap had some free room at its top already


def test_large_blocks_are_mapped_apart_by_default():
  applied, growth = _probe("leave")
  assert not applied
  assert growth < 16 << 20


def test_opt_out_leaves_malloc_alone():
  applied, growth = _probe("apply", FLOWAR_JAX_CPU_HEAP="0")
  assert not applied
  assert growth < 16 << 20
