"""Scale-causal flash attention kernels for NVIDIA GPUs (Pallas Triton): forward, dq, and dk/dv.

Layout is the model's own `[B, L, H, Dh]` (no transposes): a program owns one (q block or kv block, batch,
head) and loops over the blocks its mask row visits, first the fully visible ones (no element mask), then
the partial ones; empty blocks are outside both loop ranges. Triton tiles must have power-of-two sides, so
the head dim is zero-padded to one (96 -> 128) and blocks to at least 16 (the smallest `tl.dot`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flowar_jax.kernels.flash import BlockSizes, FlashConfig
from flowar_jax.kernels.tiles import NN, NT, TN, ZERO, dot, dropout_keep, dropped, scores

DEFAULT_BLOCK_SIZES = BlockSizes(q=128, kv=64, q_bwd=64, kv_bwd=64)
_MIN_BLOCK = 16

def _pow2_at_least(n: int, floor: int = _MIN_BLOCK) -> int:
  return max(floor, pl.next_power_of_2(n))


def _geometry(config: FlashConfig, head_dim: int):
  mask = config.mask
  blocks = config.block_sizes.clipped(mask.q_len, mask.kv_len, _pow2_at_least)
  for size in (blocks.q, blocks.kv, blocks.q_bwd, blocks.kv_bwd):
    if size & (size - 1) or size < _MIN_BLOCK:
      raise ValueError(f"GPU attention block sizes must be powers of two >= {_MIN_BLOCK}, got {blocks}")
  q_pad, kv_pad = blocks.padded_lengths(mask.q_len, mask.kv_len)
  return blocks, q_pad, kv_pad, _pow2_at_least(head_dim)


def _pad(x: jax.Array, length: int, head_dim: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, head_dim - x.shape[3])))


def _compiler_params(head_dim: int, num_stages: int):
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=num_stages)


def _batch_head(params_ref, b, h):
  return (b + params_ref[1]) * params_ref[3] + h + params_ref[2]


def _rows_cols(row0, bq, col0, bk):
  return row0 + jnp.arange(bq, dtype=jnp.int32)[:, None], col0 + jnp.arange(bk, dtype=jnp.int32)[None, :]


# ----------------------------------------------------------------------------------------------- forward


def _fwd_kernel(params_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, config: FlashConfig, bq: int, bk: int):
  i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  mask, rate = config.mask, config.dropout_rate
  q = q_ref[...]
  seed, batch_head = params_ref[0], _batch_head(params_ref, b, h)

  def visit(masked, j, carry):
    acc, m_prev, l_prev = carry
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    rows, cols = _rows_cols(i * bq, bq, j * bk, bk)
    s = scores(q, k, rows, cols, config, masked)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.exp(s - m_next[:, None])
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    if rate > 0.0:
      p = jnp.where(dropout_keep(rows, cols, seed, batch_head, config), p, ZERO)
    acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v, NN)
    return acc, m_next, l_next

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
  num_full, num_active = mask.kv_blocks_full(i, bq, bk), mask.kv_blocks_active(i, bq, bk)
  carry = lax.fori_loop(0, num_full, functools.partial(visit, False), carry)
  acc, m, l = lax.fori_loop(num_full, num_active, functools.partial(visit, True), carry)
  scale = 1.0 / (1.0 - rate) if rate > 0.0 else 1.0
  o_ref[...] = (acc * (scale / l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def forward(config: FlashConfig, q, k, v, params):
  """-> out `[B, Lq, H, Dh]`, lse `[B, H, Lq_pad]` float32."""
  mask = config.mask
  batch, _, heads, head_dim = q.shape
  blocks, q_pad, kv_pad, dp = _geometry(config, head_dim)
  bq, bk = blocks.q, blocks.kv
  qp, kp, vp = _pad(q, q_pad, dp), _pad(k, kv_pad, dp), _pad(v, kv_pad, dp)
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, config=config, bq=bq, bk=bk),
      grid=(q_pad // bq, batch, heads),
      in_specs=[
          pl.BlockSpec((4,), lambda i, b, h: (0,)),
          pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, kv_pad, None, dp), lambda i, b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, kv_pad, None, dp), lambda i, b, h: (b, 0, h, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32)],
      compiler_params=_compiler_params(dp, num_stages=2),
      interpret=config.interpret,
      name="scale_causal_attention_fwd",
  )(params, qp, kp, vp)
  return out[:, :mask.q_len, :, :head_dim], lse


# ---------------------------------------------------------------------------------------------- backward


def _dq_kernel(params_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, config: FlashConfig,
               bq: int, bk: int):
  i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  mask, rate = config.mask, config.dropout_rate
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  seed, batch_head = params_ref[0], _batch_head(params_ref, b, h)

  def visit(masked, j, dq):
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    rows, cols = _rows_cols(i * bq, bq, j * bk, bk)
    p = jnp.exp(scores(q, k, rows, cols, config, masked) - lse)
    dp = dot(do, v, NT)
    if rate > 0.0:
      dp = dropped(dp, dropout_keep(rows, cols, seed, batch_head, config), rate)
    ds = p * (dp - delta)
    return dq + dot(ds.astype(k.dtype), k, NN)

  num_full, num_active = mask.kv_blocks_full(i, bq, bk), mask.kv_blocks_active(i, bq, bk)
  dq = lax.fori_loop(0, num_full, functools.partial(visit, False), jnp.zeros(q.shape, jnp.float32))
  dq = lax.fori_loop(num_full, num_active, functools.partial(visit, True), dq)
  dq_ref[...] = (dq * config.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(params_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                config: FlashConfig, bq: int, bk: int, num_q_blocks: int):
  j, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  mask, rate = config.mask, config.dropout_rate
  k, v = k_ref[...], v_ref[...]
  seed, batch_head = params_ref[0], _batch_head(params_ref, b, h)

  def visit(masked, i, carry):
    dk, dv = carry
    q = q_ref[pl.ds(i * bq, bq), :]
    do = do_ref[pl.ds(i * bq, bq), :]
    lse = lse_ref[pl.ds(i * bq, bq)][:, None]
    delta = delta_ref[pl.ds(i * bq, bq)][:, None]
    rows, cols = _rows_cols(i * bq, bq, j * bk, bk)
    p = jnp.exp(scores(q, k, rows, cols, config, masked) - lse)  # [bq, bk]
    dp = dot(do, v, NT)
    p_dropped = p
    if rate > 0.0:
      keep = dropout_keep(rows, cols, seed, batch_head, config)
      p_dropped, dp = dropped(p, keep, rate), dropped(dp, keep, rate)
    dv = dv + dot(p_dropped.astype(do.dtype), do, TN)
    ds = p * (dp - delta)
    dk = dk + dot(ds.astype(q.dtype), q, TN)
    return dk, dv

  first, first_full = mask.q_block_first_active(j, bq, bk), mask.q_block_first_full(j, bq, bk)
  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  carry = lax.fori_loop(first, first_full, functools.partial(visit, True), carry)
  dk, dv = lax.fori_loop(first_full, num_q_blocks, functools.partial(visit, False), carry)
  dk_ref[...] = (dk * config.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(config: FlashConfig, q, k, v, params, lse, delta, dout):
  """lse `[B, H, Lq_pad]` from `forward`, delta `[B, Lq, H]` -> dq, dk, dv."""
  mask = config.mask
  batch, _, heads, head_dim = q.shape
  blocks, q_pad, kv_pad, dp = _geometry(config, head_dim)
  qp, dop = _pad(q, q_pad, dp), _pad(dout, q_pad, dp)
  kp, vp = _pad(k, kv_pad, dp), _pad(v, kv_pad, dp)
  delta = jnp.pad(jnp.swapaxes(delta, 1, 2), ((0, 0), (0, 0), (0, q_pad - mask.q_len)))
  params_spec = pl.BlockSpec((4,), lambda *_: (0,))

  bq, bk = blocks.q, blocks.kv
  q_block = pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))
  kv_whole = pl.BlockSpec((None, kv_pad, None, dp), lambda i, b, h: (b, 0, h, 0))
  row_block = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, config=config, bq=bq, bk=bk),
      grid=(q_pad // bq, batch, heads),
      in_specs=[params_spec, q_block, kv_whole, kv_whole, q_block, row_block, row_block],
      out_specs=q_block,
      out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
      compiler_params=_compiler_params(dp, num_stages=2),
      interpret=config.interpret,
      name="scale_causal_attention_dq",
  )(params, qp, kp, vp, dop, lse, delta)

  bq, bk = blocks.q_bwd, blocks.kv_bwd
  q_whole = pl.BlockSpec((None, q_pad, None, dp), lambda j, b, h: (b, 0, h, 0))
  kv_block = pl.BlockSpec((None, bk, None, dp), lambda j, b, h: (b, j, h, 0))
  row_whole = pl.BlockSpec((None, None, q_pad), lambda j, b, h: (b, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, config=config, bq=bq, bk=bk, num_q_blocks=q_pad // bq),
      grid=(kv_pad // bk, batch, heads),
      in_specs=[params_spec, q_whole, kv_block, kv_block, q_whole, row_whole, row_whole],
      out_specs=[kv_block, kv_block],
      out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
      compiler_params=_compiler_params(dp, num_stages=2),
      interpret=config.interpret,
      name="scale_causal_attention_dkv",
  )(params, qp, kp, vp, dop, lse, delta)
  return (dq[:, :mask.q_len, :, :head_dim], dk[:, :mask.kv_len, :, :head_dim],
          dv[:, :mask.kv_len, :, :head_dim])
