"""Running a stack of identical blocks: each rematerialised (`remat`), optionally as one `lax.scan`.

A Python loop traces and compiles every block separately; a scan over the blocks' stacked parameters
compiles the block once, which cuts compile time and compile memory roughly by the depth (FlowAR-H's
30 backbone and 12 head blocks). The values are the same either way, and both run inside an enclosing loop
over blocks built outside it (the flow head inside the sampler's ODE `lax.scan`): the scan merges each
block's slice of the stack in its body, and `remat` passes the block's variables as arguments.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flowar_jax.parallel.logical import AxisNames, constrain
from flowar_jax.parallel.remat import remat


def run_blocks(blocks: Sequence[nnx.Module], x: jax.Array, *shared: Any, per_block: Sequence[Any] | None = None,
               remat_policy: str = "none", scan: bool = False, names: AxisNames | None = None) -> jax.Array:
  """x -> block_n(... block_1(x, *shared, per_block[0]) ...).

  Args:
    blocks: modules of one class and structure, called as `block(x, *shared[, per_block[i]])`.
    x: the stream passed from block to block (e.g. `[B, L, D]`).
    shared: arguments every block gets.
    per_block: one extra trailing argument per block (e.g. dropout keys, or Nones), or None for none.
    remat_policy: one of `REMAT_POLICIES`, applied to each block ('none' where nothing is differentiated).
    scan: run the blocks as a `lax.scan` over their stacked parameters.
    names: logical axis names to constrain `x` to after every block.
  """
  block_call = type(blocks[0]).__call__
  # The shared arguments are closed over, so that static ones (e.g. a mask description) need not be JAX types.
  call = remat(lambda block, x, *extra: block_call(block, x, *shared, *extra), remat_policy)

  def apply(block, x, extra):
    out = call(block, x, *extra)
    return out if names is None else constrain(out, names)

  extras = [() if per_block is None else (per_block[i],) for i in range(len(blocks))]
  if not scan or len(blocks) < 2:
    for block, extra in zip(blocks, extras):
      x = apply(block, x, extra)
    return x
  graphdef, _ = nnx.split(blocks[0])
  states = jax.tree.map(_stack_variables, *[nnx.split(block)[1] for block in blocks], is_leaf=_is_variable)
  stacked_extras = jax.tree.map(lambda *leaves: jnp.stack(leaves), *extras)

  def body(x, inputs):
    state, extra = inputs
    return apply(nnx.merge(graphdef, state), x, extra), None

  x, _ = jax.lax.scan(body, x, (states, stacked_extras))
  return x


def check_scan_mesh(scan: bool, data: int, fsdp: int, tensor: int) -> None:
  """Refuses `model.scan_blocks` on meshes that split data, fsdp and tensor all at once.

  On such meshes (e.g. 2 x 2 x 2) XLA's partitioner computed wrong values for the scanned flow head at the
  coarse scales (1 and 4 tokens) in our tests, on CPU, with both Shardy and GSPMD; every other mesh tested
  (8x1x1, 2x4x1, 1x4x2, 4x1x2, 1x1x8) matched one device.
  """
  if scan and data > 1 and fsdp > 1 and tensor > 1:
    raise ValueError(f"config.model.scan_blocks is not supported on a mesh that splits data ({data}), fsdp ({fsdp}) "
                     f"and tensor ({tensor}) at once: XLA computes wrong values for the scanned blocks there; "
                     f"set one of them to 1 or turn scan_blocks off")


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _stack_variables(*variables: Any) -> Any:
  """One variable (or array) per block -> the stacked `[depth, ...]` one, laid out like each block's copy.

  The constraint keeps a parameter's FSDP / tensor sharding (its logical names, depth unsharded) through
  the stack, so the scan slices sharded parameters instead of gathering them.
  """
  if not _is_variable(variables[0]):
    return jnp.stack(variables)
  stacked = jnp.stack([v[...] for v in variables])
  names = variables[0].get_metadata().get("out_sharding")
  if names is not None:
    stacked = constrain(stacked, (None, *names))
  return variables[0].replace(stacked)
