"""The one dispatch point for attention in the backbone: XLA (the reference) or the Pallas kernels.

`impl` is 'xla', 'pallas' or 'auto' (config `model.attention_impl`). 'auto' takes the kernels where they
compile (TPU: Mosaic, GPU: Triton) and XLA elsewhere; 'pallas' on a CPU runs the TPU kernels in interpret
mode (slow; for tests). Both implementations apply the same dropout (the counter-based hash of
`flowar_jax.kernels.dropout`), so switching `impl` changes speed and memory, not the training run.

Under a device mesh with axes ('data', 'fsdp', 'tensor') set as the context mesh, the kernel call is wrapped
in `jax.shard_map` with q/k/v `[B, L, H, Dh]` split as P(('data', 'fsdp'), None, 'tensor', None); the
dropout hash is keyed by global batch and head indices, so sharding does not change the mask.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from flowar_jax.kernels.dropout import seed_from_rng
from flowar_jax.kernels.flash import BlockSizes, FlashConfig, flash_attention
from flowar_jax.kernels.mask import ScaleCausalMask
from flowar_jax.kernels.reference import reference_attention
from flowar_jax.scales import ScaleSchedule

IMPLS = ("xla", "pallas", "auto")
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def target_platform() -> str:
  """The platform the current computation is for: the context mesh's devices when one is set (so an
  ahead-of-time compile for a TPU topology on a CPU host counts as 'tpu'), else the default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


@functools.cache
def _gpu_kernels_available() -> str | None:
  """None when the Triton kernels import, else why not."""
  try:
    from flowar_jax.kernels import gpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:  # Pallas Triton is deprecated upstream and may disappear from jax
    return f"{type(e).__name__}: {e}"
  return None


@functools.cache
def _log_once(message: str) -> None:
  logging.warning(message)


def kernel_backend(platform: str) -> tuple[str, bool] | None:
  """(backend, interpret) for `platform`, or None when no kernel runs there. CPUs interpret the TPU
  kernels."""
  if platform == "tpu":
    return "tpu", False
  if platform in ("gpu", "cuda", "rocm"):
    return ("gpu", False) if _gpu_kernels_available() is None else None
  if platform == "cpu":
    return "tpu", True
  return None


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """'xla' or 'pallas' for `impl` on `platform` (default: `target_platform()`)."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
  platform = platform or target_platform()
  if impl == "xla":
    return "xla"
  if impl == "pallas":
    if kernel_backend(platform) is None:
      reason = _gpu_kernels_available() if platform in ("gpu", "cuda", "rocm") else "no kernel for it"
      raise ValueError(f"attention impl 'pallas' cannot run on platform {platform!r}: {reason}")
    return "pallas"
  if platform in ("tpu", "gpu", "cuda", "rocm") and kernel_backend(platform) is not None:
    return "pallas"
  if platform in ("gpu", "cuda", "rocm"):
    _log_once(f"attention impl 'auto': Pallas GPU kernels unavailable ({_gpu_kernels_available()}); using XLA")
  return "xla"


def scale_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: ScaleCausalMask | ScaleSchedule,
                           *, impl: str = "auto", dropout_rate: float = 0.0, rng: jax.Array | None = None,
                           block_sizes: BlockSizes | None = None, backend: str | None = None) -> jax.Array:
  """Softmax attention where query i sees the keys its mask row allows.

  q `[B, Lq, H, Dh]`, k/v `[B, Lk, H, Dh]` -> `[B, Lq, H, Dh]` in q's dtype. `mask`: a `ScaleCausalMask`, or
  a `ScaleSchedule` for the backbone's scale-causal mask. Dropout on the attention probabilities acts when
  `rng` is given and `dropout_rate > 0`. `backend` ('tpu' | 'gpu') and `block_sizes` override the
  kernel choice for the Pallas path (tests, benchmarks); off the backend's platform it is interpreted.
  """
  if backend is not None and impl == "xla":
    raise ValueError(f"attention backend {backend!r} names a Pallas kernel, but impl is 'xla'")
  if isinstance(mask, ScaleSchedule):
    mask = ScaleCausalMask.from_schedule(mask)
  _check_shapes(q, k, v, mask)
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"attention dropout_rate must lie in [0, 1), got {dropout_rate}")
  rate = dropout_rate if rng is not None else 0.0
  seed = seed_from_rng(rng) if rate > 0.0 else jnp.zeros((), jnp.int32)
  if backend is None and resolve_impl(impl) == "xla":
    return reference_attention(q, k, v, mask, dropout_rate=rate, seed=seed).astype(q.dtype)

  platform = target_platform()
  if backend is None:
    backend, interpret = kernel_backend(platform)
  else:
    interpret = kernel_backend(platform) != (backend, False)
  if block_sizes is None:
    block_sizes = _default_block_sizes(backend)
  config = FlashConfig(backend=backend, mask=mask, head_dim=q.shape[-1], dropout_rate=rate,
                       block_sizes=block_sizes, interpret=interpret)
  return _sharded_flash(config, q, k, v, seed)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto") -> jax.Array:
  """One scale of the KV-cached pass: q `[B, n, H, Dh]` attends to every key so far, k/v `[B, N, H, Dh]`
  (no mask, no dropout) -> `[B, n, H, Dh]`."""
  return scale_causal_attention(q, k, v, ScaleCausalMask.full(q.shape[1], k.shape[1]), impl=impl)


def _default_block_sizes(backend: str) -> BlockSizes:
  if backend == "tpu":
    from flowar_jax.kernels import tpu  # pylint: disable=g-import-not-at-top
    return tpu.DEFAULT_BLOCK_SIZES
  from flowar_jax.kernels import gpu  # pylint: disable=g-import-not-at-top
  return gpu.DEFAULT_BLOCK_SIZES


def _check_shapes(q, k, v, mask: ScaleCausalMask) -> None:
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"attention takes q [B, Lq, H, Dh] and k, v [B, Lk, H, Dh] of one shape; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch, heads or head dim")
  if q.shape[1] != mask.q_len or k.shape[1] != mask.kv_len:
    raise ValueError(f"mask is for {mask.q_len} queries and {mask.kv_len} keys; got q {q.shape}, k {k.shape}")


def _sharded_flash(config: FlashConfig, q, k, v, seed) -> jax.Array:
  """Calls the kernel per shard when the context mesh has batch or head axes, else directly."""
  mesh = jax.sharding.get_abstract_mesh()
  manual = set(getattr(mesh, "manual_axes", ()))
  names = () if mesh.empty else tuple(n for n in mesh.axis_names if n not in manual)
  batch_axes = tuple(a for a in BATCH_AXES if a in names)
  head_axis = HEAD_AXIS if HEAD_AXIS in names else None
  batch, _, heads, _ = q.shape

  def local(q, k, v, seed):
    b_local, h_local = q.shape[0], q.shape[2]
    batch_offset = jax.lax.axis_index(batch_axes) * b_local if batch_axes else 0
    head_offset = jax.lax.axis_index(head_axis) * h_local if head_axis else 0
    params = jnp.stack([seed, jnp.int32(batch_offset), jnp.int32(head_offset), jnp.int32(heads)]).astype(jnp.int32)
    return flash_attention(config, q, k, v, params)

  if not batch_axes and head_axis is None:
    return local(q, k, v, seed)
  batch_shards = 1
  for a in batch_axes:
    batch_shards *= mesh.shape[a]
  head_shards = mesh.shape[head_axis] if head_axis else 1
  if batch % batch_shards or heads % head_shards:
    raise ValueError(f"attention over mesh {dict(mesh.shape)}: batch {batch} must divide by the {batch_shards} "
                     f"shards of {batch_axes} and heads {heads} by the {head_shards} of {head_axis!r}; "
                     f"q is {q.shape}")
  spec = P(batch_axes or None, None, head_axis, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=spec,
                       axis_names=set(batch_axes) | ({head_axis} if head_axis else set()),
                       check_vma=False)(q, k, v, seed)
