"""Rematerialisation per transformer block (`config.model.remat`): trade recomputation for activation memory.

  none                              keep every activation for the backward pass (fastest, most memory)
  full                              keep only each block's inputs; recompute the block in the backward pass
  dots_saveable                     keep matmul outputs, recompute the elementwise ops between them
  dots_with_no_batch_dims_saveable  keep weight matmuls (no batch dims), recompute attention scores and the rest
"""
from __future__ import annotations

from typing import Callable, TypeVar

import jax
from flax import nnx

F = TypeVar("F", bound=Callable)

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def check_remat(policy: str) -> None:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat must be one of {REMAT_POLICIES}, got {policy!r}")


def remat(fn: F, policy: str) -> F:
  """`fn(module, *args)` rematerialised under `policy` (unchanged for 'none'); values are unchanged."""
  check_remat(policy)
  if policy == "none":
    return fn
  saveable = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
  return nnx.remat(fn, policy=saveable)
