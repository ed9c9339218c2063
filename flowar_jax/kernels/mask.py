"""The scale-causal mask, described by segment boundaries instead of an L x L table.

FlowAR's mask is a per-query prefix: a token of scale s sees every key before the end of scale s. Over the
query index the visible prefix length is a nondecreasing step function with one step per scale, so a
handful of integers describe the whole mask, and every block-level question (is this (q block, kv block)
tile empty, partly visible, or fully visible?) has a closed-form answer from the same integers. Kernels
evaluate those answers in their own scalar code; nothing of size L x L is ever built on the host.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flowar_jax.scales import ScaleSchedule


@dataclasses.dataclass(frozen=True)
class ScaleCausalMask:
  """Query rows `[q_starts[s], q_starts[s + 1])` see keys `[0, kv_ends[s])`.

  `q_starts[0] == 0`, `q_starts` strictly increasing below `q_len`; `kv_ends` nondecreasing, positive, and
  ending at `kv_len`, so every query sees at least one key and every key is seen by some query. Hashable,
  so it can be a static argument of a jitted function.
  """

  q_starts: tuple[int, ...]
  kv_ends: tuple[int, ...]
  q_len: int
  kv_len: int

  def __post_init__(self):
    q_starts, kv_ends = tuple(int(s) for s in self.q_starts), tuple(int(e) for e in self.kv_ends)
    object.__setattr__(self, "q_starts", q_starts)
    object.__setattr__(self, "kv_ends", kv_ends)
    if not q_starts or len(q_starts) != len(kv_ends):
      raise ValueError(f"mask needs one kv end per segment, got q_starts {q_starts} and kv_ends {kv_ends}")
    if q_starts[0] != 0 or any(b <= a for a, b in zip(q_starts, q_starts[1:])) or q_starts[-1] >= self.q_len:
      raise ValueError(f"mask q_starts must rise strictly from 0 and stay below q_len {self.q_len}, "
                       f"got {q_starts}")
    if kv_ends[0] < 1 or any(b < a for a, b in zip(kv_ends, kv_ends[1:])) or kv_ends[-1] != self.kv_len:
      raise ValueError(f"mask kv_ends must be positive, nondecreasing and end at kv_len {self.kv_len}, "
                       f"got {kv_ends}")

  @classmethod
  def from_schedule(cls, schedule: ScaleSchedule) -> "ScaleCausalMask":
    """The backbone's mask: scale s sees scales 0..s (the same rule as `ScaleSchedule.visibility`)."""
    offsets = schedule.offsets
    return cls(offsets[:-1], offsets[1:], schedule.num_tokens, schedule.num_tokens)

  @classmethod
  def full(cls, q_len: int, kv_len: int) -> "ScaleCausalMask":
    """No masking: every query sees all `kv_len` keys (the KV-cached decode step)."""
    return cls((0,), (kv_len,), q_len, kv_len)

  @property
  def num_segments(self) -> int:
    return len(self.q_starts)

  def kv_end(self, rows):
    """Visible prefix length of query `rows` (int scalar or array, traced or not); rows past `q_len`
    (padding) see every key."""
    # Strongly typed constants: Pallas Triton lowers a weakly typed literal in a select with the
    # predicate's type.
    end = np.int32(self.kv_ends[0])
    for start, kv_end in zip(self.q_starts[1:], self.kv_ends[1:]):
      end = jnp.where(rows >= start, np.int32(kv_end), end)
    return jnp.broadcast_to(end, jnp.shape(rows))

  def first_row_seeing(self, key_bound, inclusive: bool):
    """The first query row whose visible prefix is > `key_bound` (or >= when `inclusive`); `q_len` when
    no row qualifies. `key_bound` is an int scalar, traced or not."""
    row = np.int32(self.q_len)
    for start, kv_end in reversed(list(zip(self.q_starts, self.kv_ends))):
      sees = kv_end >= key_bound if inclusive else kv_end > key_bound
      row = jnp.where(sees, np.int32(start), row)
    return row

  # Block-level structure for q blocks of `bq` rows and kv blocks of `bk` keys. Every function takes a
  # block index (a Python int or a traced int32 scalar) and returns a block count or block index.

  def kv_blocks_active(self, q_block, bq: int, bk: int):
    """Number of kv blocks q block `q_block` must visit: the rest are empty and skipped."""
    last_row = jnp.minimum((q_block + 1) * bq, self.q_len) - 1
    return _div(self.kv_end(last_row) + bk - 1, bk)

  def kv_blocks_full(self, q_block, bq: int, bk: int):
    """Number of leading kv blocks every row of q block `q_block` sees entirely (no mask needed)."""
    return _div(self.kv_end(q_block * bq), bk)

  def q_block_first_active(self, kv_block, bq: int, bk: int):
    """First q block that sees any key of kv block `kv_block`; every later q block does too."""
    return _div(self.first_row_seeing(kv_block * bk, inclusive=False), bq)

  def q_block_first_full(self, kv_block, bq: int, bk: int):
    """First q block whose every row sees all `bk` keys of kv block `kv_block` (no mask needed from there)."""
    return _div(self.first_row_seeing((kv_block + 1) * bk, inclusive=True) + bq - 1, bq)

  def kv_end_array(self) -> np.ndarray:
    """[q_len] int32: each query's visible prefix length (O(L) host data)."""
    return np.repeat(np.asarray(self.kv_ends, np.int32),
                     np.diff(np.asarray(self.q_starts + (self.q_len,))))

  def dense(self) -> jnp.ndarray:
    """[q_len, kv_len] bool, built on the device from the O(L) prefix lengths (reference and XLA path)."""
    return jnp.arange(self.kv_len)[None, :] < jnp.asarray(self.kv_end_array())[:, None]

  def block_census(self, bq: int, bk: int) -> dict[str, int]:
    """How many (q block, kv block) tiles are full, partial and empty (skipped), for docs and benchmarks."""
    nq, nk = -(-self.q_len // bq), -(-self.kv_len // bk)
    active = sum(int(self.kv_blocks_active(i, bq, bk)) for i in range(nq))
    full = sum(int(self.kv_blocks_full(i, bq, bk)) for i in range(nq))
    return {"full": full, "partial": active - full, "empty": nq * nk - active}


def _div(a, b: int):
  """a // b for non-negative a; truncating division, which Triton and Mosaic lower for traced scalars
  (floor division's sign fix-up is not lowered everywhere)."""
  return jax.lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))
