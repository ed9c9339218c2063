"""Moving batches between host memory and global arrays split over the mesh's data-parallel axes.

Two ways in: each process holds only its share of the global batch (training: grain reads a
per-process shard), or every process holds the same whole batch (evaluation passes, sampling labels).
One way out: every process gets the whole result in host memory.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from flowar_jax.parallel.plan import ShardingPlan


def global_batch(plan: ShardingPlan, local_batch: Any) -> Any:
  """This process's rows `[B / num_processes, ...]` of every leaf -> global arrays `[B, ...]` split by 'batch'.

  Process p's rows become rows p * B/P ... (p + 1) * B/P - 1 of the global batch (in a single process,
  the whole batch).
  """
  sharding = plan.batch_sharding()
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def replicated_batch(plan: ShardingPlan, batch: Any) -> Any:
  """The same whole batch `[B, ...]` on every process -> global arrays split by 'batch'."""
  sharding = plan.batch_sharding()

  def to_global(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(to_global, batch)


def to_host(tree: Any) -> Any:
  """Global (possibly multi-process) arrays -> whole numpy arrays on every process."""

  def gather(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(gather, tree)


def round_up_to_data_parallel(plan: ShardingPlan, batch_size: int) -> int:
  """The smallest multiple of the data-parallel size that is >= `batch_size`."""
  size = plan.data_parallel_size
  return -(-batch_size // size) * size
