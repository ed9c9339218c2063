"""Scale-causal flash attention kernels for TPU (Pallas Mosaic): forward, dq, and dk/dv.

Layout inside the kernels is `[B, H, L, Dh]` (sequence on sublanes, head dim on lanes). Grids iterate the
reduction axis last ("arbitrary"); for an empty tile the kv (or q) index map repeats the previous block, so
the pipeline issues no copy, and `pl.when` skips the compute. Only partially visible tiles build the
element mask. The per-row log-sum-exp and delta travel as rows `[B, H, 1, L]` (compact in HBM) and are
turned into columns inside the kernel once per q block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flowar_jax.kernels.flash import BlockSizes, FlashConfig, round_up
from flowar_jax.kernels.tiles import NN, NT, ZERO, dot, dropout_keep, dropped, scores

DEFAULT_BLOCK_SIZES = BlockSizes(q=128, kv=128, q_bwd=128, kv_bwd=128)
# Real compiles need sublane-aligned blocks; interpret mode takes any size.
_SUBLANES = 8

def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def _row_to_col(row: jax.Array) -> jax.Array:
  """(1, n) -> (n, 1) via a diagonal select and lane reduction (no transpose relayout needed)."""
  n = row.shape[1]
  return jnp.sum(jnp.where(_iota((n, n), 0) == _iota((n, n), 1), row, ZERO), axis=1, keepdims=True)


def _col_to_row(col: jax.Array) -> jax.Array:
  """(n, 1) -> (1, n), the inverse of `_row_to_col`."""
  n = col.shape[0]
  return jnp.sum(jnp.where(_iota((n, n), 0) == _iota((n, n), 1), col, ZERO), axis=0, keepdims=True)


def _batch_head(params_ref, b, h):
  """Global batch * heads + head index of this program (the dropout hash key), across shards."""
  return (b + params_ref[1]) * params_ref[3] + h + params_ref[2]


# ----------------------------------------------------------------------------------------------- forward


def _fwd_kernel(params_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, *,
                config: FlashConfig, bq: int, bk: int, num_kv_blocks: int):
  b, h, i, j = (pl.program_id(axis) for axis in range(4))
  mask, rate = config.mask, config.dropout_rate

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def visit(masked: bool):
    v = v_ref[...]
    rows, cols = i * bq + _iota((bq, bk), 0), j * bk + _iota((bq, bk), 1)
    s = scores(q_ref[...], k_ref[...], rows, cols, config, masked)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_next)
    alpha = jnp.exp(m_prev - m_next)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    if rate > 0.0:
      p = jnp.where(dropout_keep(rows, cols, params_ref[0], _batch_head(params_ref, b, h), config), p, ZERO)
    acc_ref[...] = alpha * acc_ref[...] + dot(p.astype(v.dtype), v, NN)
    m_ref[...] = m_next

  num_full, num_active = mask.kv_blocks_full(i, bq, bk), mask.kv_blocks_active(i, bq, bk)
  pl.when(j < num_full)(lambda: visit(masked=False))
  pl.when(jnp.logical_and(j >= num_full, j < num_active))(lambda: visit(masked=True))

  @pl.when(j == num_kv_blocks - 1)
  def _finish():
    l = l_ref[...]
    scale = 1.0 / (1.0 - rate) if rate > 0.0 else 1.0
    o_ref[...] = (acc_ref[...] * (scale / l)).astype(o_ref.dtype)
    lse_ref[...] = _col_to_row(m_ref[...] + jnp.log(l))


def _to_kernel_layout(x: jax.Array, length: int, head_dim: int) -> jax.Array:
  """[B, L, H, D] -> [B, H, length, head_dim], zero-padded."""
  x = jnp.swapaxes(x, 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, head_dim - x.shape[3])))


def _from_kernel_layout(x: jax.Array, length: int, head_dim: int) -> jax.Array:
  return jnp.swapaxes(x[:, :, :length, :head_dim], 1, 2)


def _geometry(config: FlashConfig, q: jax.Array):
  """Block sizes, padded lengths and padded head dim for this call."""
  mask = config.mask
  blocks = config.block_sizes.clipped(mask.q_len, mask.kv_len, lambda n: round_up(n, _SUBLANES))
  q_pad, kv_pad = blocks.padded_lengths(mask.q_len, mask.kv_len)
  if not config.interpret:
    # q blocks are the lane dim of the log-sum-exp rows, kv blocks the sublane dim of k and v.
    for size, whole, unit in ((blocks.q, q_pad, 128), (blocks.q_bwd, q_pad, 128), (blocks.kv, kv_pad, _SUBLANES),
                              (blocks.kv_bwd, kv_pad, _SUBLANES)):
      if size % unit and size != whole:
        raise ValueError(f"TPU attention blocks {blocks}: q blocks must be multiples of 128 and kv blocks of "
                         f"{_SUBLANES} (or span the padded sequence, {q_pad} queries, {kv_pad} keys)")
  return blocks, q_pad, kv_pad, padded_head_dim(q.shape[-1])


def padded_head_dim(head_dim: int) -> int:
  """Head dims below a full lane row keep their size (the block spans the whole axis); larger ones are
  padded to whole 128-lane rows."""
  return head_dim if head_dim <= 128 else round_up(head_dim, 128)


def _compiler_params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def forward(config: FlashConfig, q, k, v, params):
  """-> out `[B, Lq, H, Dh]`, lse `[B, H, 1, Lq_pad]` float32."""
  mask = config.mask
  batch, _, heads, head_dim = q.shape
  blocks, q_pad, kv_pad, dp = _geometry(config, q)
  bq, bk = blocks.q, blocks.kv
  nq, nk = q_pad // bq, kv_pad // bk
  qt, kt, vt = (_to_kernel_layout(x, n, dp) for x, n in ((q, q_pad), (k, kv_pad), (v, kv_pad)))

  def kv_index(b, h, i, j, params_ref):
    del params_ref
    return b, h, jnp.minimum(j, mask.kv_blocks_active(i, bq, bk) - 1), 0

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(batch, heads, nq, nk),
      in_specs=[
          pl.BlockSpec((None, None, bq, dp), lambda b, h, i, j, _: (b, h, i, 0)),
          pl.BlockSpec((None, None, bk, dp), kv_index),
          pl.BlockSpec((None, None, bk, dp), kv_index),
      ],
      out_specs=[
          pl.BlockSpec((None, None, bq, dp), lambda b, h, i, j, _: (b, h, i, 0)),
          pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, _: (b, h, 0, i)),
      ],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, dp), jnp.float32)],
  )
  kernel = functools.partial(_fwd_kernel, config=config, bq=bq, bk=bk, num_kv_blocks=nk)
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, 1, q_pad), jnp.float32)],
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=config.interpret,
      name="scale_causal_attention_fwd",
  )(params, qt, kt, vt)
  return _from_kernel_layout(out, mask.q_len, head_dim), lse


# ---------------------------------------------------------------------------------------------- backward


def _dq_kernel(params_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               lse_col_ref, delta_col_ref, acc_ref, *, config: FlashConfig, bq: int, bk: int,
               num_kv_blocks: int):
  b, h, i, j = (pl.program_id(axis) for axis in range(4))
  mask, rate = config.mask, config.dropout_rate

  @pl.when(j == 0)
  def _init():
    lse_col_ref[...] = _row_to_col(lse_ref[...])
    delta_col_ref[...] = _row_to_col(delta_ref[...])
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def visit(masked: bool):
    k = k_ref[...]
    rows, cols = i * bq + _iota((bq, bk), 0), j * bk + _iota((bq, bk), 1)
    p = jnp.exp(scores(q_ref[...], k, rows, cols, config, masked) - lse_col_ref[...])
    dp = dot(do_ref[...], v_ref[...], NT)
    if rate > 0.0:
      dp = dropped(dp, dropout_keep(rows, cols, params_ref[0], _batch_head(params_ref, b, h), config), rate)
    ds = p * (dp - delta_col_ref[...])
    acc_ref[...] += dot(ds.astype(k.dtype), k, NN)

  num_full, num_active = mask.kv_blocks_full(i, bq, bk), mask.kv_blocks_active(i, bq, bk)
  pl.when(j < num_full)(lambda: visit(masked=False))
  pl.when(jnp.logical_and(j >= num_full, j < num_active))(lambda: visit(masked=True))

  @pl.when(j == num_kv_blocks - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * config.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(params_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                dk_acc_ref, dv_acc_ref, *, config: FlashConfig, bq: int, bk: int, num_q_blocks: int):
  """Works on transposed tiles `[bk, bq]` so that lse and delta broadcast as rows and every matmul is
  a @ b or a @ b.T."""
  b, h, j, t = (pl.program_id(axis) for axis in range(4))
  mask, rate = config.mask, config.dropout_rate
  i = mask.q_block_first_active(j, bq, bk) + t

  @pl.when(t == 0)
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  def visit(masked: bool):
    q, k, do = q_ref[...], k_ref[...], do_ref[...]
    keys, rows = j * bk + _iota((bk, bq), 0), i * bq + _iota((bk, bq), 1)
    p = jnp.exp(scores(k, q, rows, keys, config, masked) - lse_ref[...])  # [bk, bq]
    dp = dot(v_ref[...], do, NT)
    p_dropped = p
    if rate > 0.0:
      keep = dropout_keep(rows, keys, params_ref[0], _batch_head(params_ref, b, h), config)
      p_dropped, dp = dropped(p, keep, rate), dropped(dp, keep, rate)
    dv_acc_ref[...] += dot(p_dropped.astype(do.dtype), do, NN)
    ds = p * (dp - delta_ref[...])
    dk_acc_ref[...] += dot(ds.astype(q.dtype), q, NN)

  first_full = mask.q_block_first_full(j, bq, bk)
  in_range = i < num_q_blocks
  pl.when(jnp.logical_and(in_range, i < first_full))(lambda: visit(masked=True))
  pl.when(jnp.logical_and(in_range, i >= first_full))(lambda: visit(masked=False))

  @pl.when(t == num_q_blocks - 1)
  def _finish():
    dk_ref[...] = (dk_acc_ref[...] * config.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def backward(config: FlashConfig, q, k, v, params, lse, delta, dout):
  """lse `[B, H, 1, Lq_pad]` from `forward`, delta `[B, Lq, H]` -> dq, dk, dv in the inputs' layout."""
  mask = config.mask
  batch, _, heads, head_dim = q.shape
  blocks, q_pad, kv_pad, dp = _geometry(config, q)
  qt, dot_ = (_to_kernel_layout(x, q_pad, dp) for x in (q, dout))
  kt, vt = (_to_kernel_layout(x, kv_pad, dp) for x in (k, v))
  delta_row = jnp.pad(jnp.swapaxes(delta, 1, 2), ((0, 0), (0, 0), (0, q_pad - mask.q_len)))[:, :, None, :]

  # dq: like the forward, a q block visits its active kv blocks.
  bq, bk = blocks.q, blocks.kv
  nq, nk = q_pad // bq, kv_pad // bk

  def kv_index(b, h, i, j, params_ref):
    del params_ref
    return b, h, jnp.minimum(j, mask.kv_blocks_active(i, bq, bk) - 1), 0

  q_spec = pl.BlockSpec((None, None, bq, dp), lambda b, h, i, j, _: (b, h, i, 0))
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, _: (b, h, 0, i))
  kv_spec = pl.BlockSpec((None, None, bk, dp), kv_index)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, config=config, bq=bq, bk=bk, num_kv_blocks=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(batch, heads, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                          pltpu.VMEM((bq, dp), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=config.interpret,
      name="scale_causal_attention_dq",
  )(params, qt, kt, vt, dot_, lse, delta_row)

  # dk, dv: a kv block visits the q blocks that see it, a suffix starting at its first active q block.
  bq, bk = blocks.q_bwd, blocks.kv_bwd
  nq, nk = q_pad // bq, kv_pad // bk

  def q_block(j, t):
    return jnp.minimum(mask.q_block_first_active(j, bq, bk) + t, nq - 1)

  q_spec = pl.BlockSpec((None, None, bq, dp), lambda b, h, j, t, _: (b, h, q_block(j, t), 0))
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, j, t, _: (b, h, 0, q_block(j, t)))
  kv_spec = pl.BlockSpec((None, None, bk, dp), lambda b, h, j, t, _: (b, h, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, config=config, bq=bq, bk=bk, num_q_blocks=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(batch, heads, nk, nq),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, dp), jnp.float32), pltpu.VMEM((bk, dp), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=config.interpret,
      name="scale_causal_attention_dkv",
  )(params, qt, kt, vt, dot_, lse, delta_row)
  return (_from_kernel_layout(dq, mask.q_len, head_dim), _from_kernel_layout(dk, mask.kv_len, head_dim),
          _from_kernel_layout(dv, mask.kv_len, head_dim))
