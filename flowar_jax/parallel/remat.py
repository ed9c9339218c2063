"""Rematerialisation per transformer block (`config.model.remat`): trade recomputation for activation memory.

  none                              keep every activation for the backward pass (fastest, most memory)
  full                              keep only each block's inputs; recompute the block in the backward pass
  dots_saveable                     keep matmul outputs, recompute the elementwise ops between them
  dots_with_no_batch_dims_saveable  keep weight matmuls (no batch dims), recompute attention scores and the rest

Remat only acts where a program is differentiated; programs that never are (the sampler) run their blocks
without it (`flowar_jax.models.flow_head.FlowHead.velocity(remat=False)`), so their code is the same whatever
the policy.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def check_remat(policy: str) -> None:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat must be one of {REMAT_POLICIES}, got {policy!r}")


def remat(fn: Callable[..., Any], policy: str) -> Callable[..., Any]:
  """`fn(module, *args)` rematerialised under `policy` (unchanged for 'none'); values are unchanged.

  `args` must be JAX values (pytrees of arrays or None); `fn` must not update the module's variables (the
  blocks do not: dropout keys are arguments). The module's variables enter `jax.checkpoint` as arguments and
  nothing is written back, so this works at any trace level: on a module built outside an enclosing
  `lax.scan` (the sampler's ODE loop) as well as on one merged inside it. (`nnx.remat` writes the variables
  back after the call, which flax refuses across trace levels.)
  """
  check_remat(policy)
  if policy == "none":
    return fn
  saveable = None if policy == "full" else getattr(jax.checkpoint_policies, policy)

  def rematerialised(module: nnx.Module, *args: Any) -> Any:
    graphdef, state = nnx.split(module)
    pure = lambda state, *args: fn(nnx.merge(graphdef, state), *args)
    return jax.checkpoint(pure, policy=saveable)(state, *args)

  return rematerialised
