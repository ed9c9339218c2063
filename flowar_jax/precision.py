"""Matrix-product precision: float32 throughout, or bfloat16 products with float32 accumulation.

With `compute_dtype('bfloat16')` active while a function is traced, every matrix product of the model
(linear layers, the attention projections and the attention scores and values) casts its operands to
bfloat16, accumulates in float32 and returns float32; so does its backward pass (the incoming gradient is
cast to bfloat16, the products accumulate in float32). Everything else stays float32: parameters (master
weights), optimizer state, EMA, residual streams, norms, softmax, the loss and the sampler's ODE state.
The bf16 units of accelerators (MXU, tensor cores, a CPU's AMX) then run all the FLOPs, while nothing that
sums many small terms or carries state across steps rounds to bfloat16.

The mode is read when a function is traced, so set it around the traced call: the FlowAR loss of the train
step does (`config.model.compute_dtype`), and so does the sampler (`SamplingSettings.compute_dtype`, from
`config.sampling.compute_dtype`).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_PRODUCT_DTYPE = contextvars.ContextVar("flowar_product_dtype", default=jnp.float32)

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


@contextlib.contextmanager
def compute_dtype(name: str) -> Iterator[None]:
  """Traces inside this context compute matrix products in `name` ('float32' | 'bfloat16')."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}")
  token = _PRODUCT_DTYPE.set(COMPUTE_DTYPES[name])
  try:
    yield
  finally:
    _PRODUCT_DTYPE.reset(token)


def product_dtype() -> jnp.dtype:
  """The operand dtype of matrix products in the current trace."""
  return _PRODUCT_DTYPE.get()


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: DimensionNumbers, precision=None,
                preferred_element_type=None, **kwargs) -> jax.Array:
  """`lax.dot_general` under the active compute dtype (signature of `nnx.Linear`'s `dot_general`).

  float32: the plain product. bfloat16: float32 operands are cast to bfloat16, the result is float32.
  """
  if product_dtype() == jnp.float32 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  return _bf16_dot_general(lhs, rhs, _normalise(dimension_numbers))


def _normalise(dimension_numbers: DimensionNumbers) -> tuple:
  (lc, rc), (lb, rb) = dimension_numbers
  return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))


def _pinned_transpose(x: jax.Array, order: Sequence[int]) -> jax.Array:
  """`jnp.transpose`, behind an optimization barrier on CPUs.

  XLA's CPU compiler runs bf16 products only in the layouts its matrix kernels (YNNPACK) take, the lhs as
  [batch..., free..., contracting...]; a transpose it folds into a product may leave it one it runs on
  float32 copies (or, folded late, cannot run). The barrier keeps the attention products' transposes apart
  in the early passes, which measured faster; elsewhere the compiler folds transposes freely.
  """
  order = list(order)
  if order == list(range(x.ndim)):
    return x
  plain = lambda y: jnp.transpose(y, order)
  pinned = lambda y: jax.lax.optimization_barrier(jnp.transpose(y, order))
  return jax.lax.platform_dependent(x, cpu=pinned, default=plain)


def _product(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> jax.Array:
  """bf16 x bf16 -> float32 `dot_general`, with the lhs transposed to [batch..., free..., contracting...].

  float32 output: a bf16-output product takes much slower paths on CPUs, and accelerators accumulate in
  float32 anyway.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  free = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
  order = list(lb) + free + list(lc)
  lhs = _pinned_transpose(lhs, order)
  position = {d: i for i, d in enumerate(order)}
  lc, lb = tuple(position[d] for d in lc), tuple(position[d] for d in lb)
  return jax.lax.dot_general(lhs, rhs, ((lc, rc), (lb, rb)), preferred_element_type=jnp.float32)


def _forward_product(lhs16: jax.Array, rhs16: jax.Array, dimension_numbers) -> jax.Array:
  """The forward product. One whose lhs is not laid out [batch..., free..., contracting...] runs on float32
  copies of the bf16 operands on CPUs (same values): the compiler folds the transpose back into a product
  it cannot run in bf16. Every product of the model has that layout; other platforms take any in bf16."""
  (lc, _), (lb, _) = dimension_numbers
  free = [d for d in range(lhs16.ndim) if d not in lc and d not in lb]
  if list(lb) + free + list(lc) == list(range(lhs16.ndim)):
    return _product(lhs16, rhs16, dimension_numbers)
  in_float32 = lambda a, b: jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dimension_numbers)
  return jax.lax.platform_dependent(lhs16, rhs16, cpu=in_float32,
                                    default=lambda a, b: _product(a, b, dimension_numbers))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> jax.Array:
  return _forward_product(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), dimension_numbers)


def _forward(lhs, rhs, dimension_numbers):
  lhs16, rhs16 = lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)
  return _forward_product(lhs16, rhs16, dimension_numbers), (lhs16, rhs16)  # saves half the bytes of float32


def _backward(dimension_numbers, saved, grad):
  """The two transposed products, each in the operand order that gives the operand's own layout (every
  product of the model has one)."""
  lhs16, rhs16 = saved
  grad = grad.astype(jnp.bfloat16)
  (lc, rc), (lb, rb) = dimension_numbers
  lhs_free = [d for d in range(lhs16.ndim) if d not in lc and d not in lb]
  rhs_free = [d for d in range(rhs16.ndim) if d not in rc and d not in rb]
  batch = tuple(range(len(lb)))  # the output is laid out [batch..., lhs free..., rhs free...]
  grad_lhs_free = tuple(range(len(lb), len(lb) + len(lhs_free)))
  grad_rhs_free = tuple(range(len(lb) + len(lhs_free), grad.ndim))
  # d lhs: grad and rhs contracted over the rhs's free dimensions; its other dimensions are the lhs's
  # contracting ones, in the rhs's order.
  d_lhs = _operand_gradient(grad, grad_rhs_free, rhs16, rhs_free, batch, rb,
                            own_batch=lb, own_free=lhs_free, own_contract=lc, other_contract=rc)
  d_rhs = _operand_gradient(grad, grad_lhs_free, lhs16, lhs_free, batch, lb,
                            own_batch=rb, own_free=rhs_free, own_contract=rc, other_contract=lc)
  return d_lhs, d_rhs


def _operand_gradient(grad, grad_dims, other, other_free, grad_batch, other_batch, *, own_batch, own_free,
                      own_contract, other_contract) -> jax.Array:
  """The gradient of one operand: `grad` contracted with the `other` operand over the other's free dims."""
  ndim = len(own_batch) + len(own_free) + len(own_contract)
  other_rest = [d for d in range(other.ndim) if d not in other_free and d not in other_batch]
  from_other = [own_contract[list(other_contract).index(d)] for d in other_rest]
  # grad first: [batch..., own free..., rest of other...]; other first: [batch..., rest of other..., own free...]
  grad_first = list(own_batch) + list(own_free) + from_other
  other_first = list(own_batch) + from_other + list(own_free)
  identity = list(range(ndim))
  if other_first == identity and grad_first != identity:
    return _product(other, grad, ((tuple(other_free), tuple(grad_dims)), (tuple(other_batch), tuple(grad_batch))))
  return _transposed_product(grad, other, ((tuple(grad_dims), tuple(other_free)), (tuple(grad_batch),
                                                                                  tuple(other_batch))),
                             [grad_first.index(d) for d in identity])


def _transposed_product(lhs16: jax.Array, rhs16: jax.Array, dimension_numbers, order: list[int]) -> jax.Array:
  """`_product` with its result transposed by `order`. When that is not the identity, CPUs run it on float32
  copies (same values): the compiler would fold the transpose into a bf16 product it cannot run."""
  in_bf16 = lambda a, b: jnp.transpose(_product(a, b, dimension_numbers), order)
  if order == list(range(len(order))):
    return _product(lhs16, rhs16, dimension_numbers)
  in_float32 = lambda a, b: jnp.transpose(
      jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dimension_numbers), order)
  return jax.lax.platform_dependent(lhs16, rhs16, cpu=in_float32, default=in_bf16)


_bf16_dot_general.defvjp(_forward, _backward)

