"""Small layers shared by the backbone and the flow head, matching the official computation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flowar_jax import precision
from flowar_jax.kernels.dropout import keep_mask, seed_from_rng
from flowar_jax.parallel.logical import constrain, param_axes

XAVIER = nnx.initializers.xavier_uniform()
TOKENS = ("batch", "length", "embed")  # logical names of a residual stream [B, L, D]


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, bias: bool = True,
           kernel_init=XAVIER, axes: tuple[str | None, str | None] | None = None) -> nnx.Linear:
  """Linear layer with the official init: xavier-uniform kernel `[in, out]`, zero bias.

  `axes` are the logical names of the kernel's (in, out) dimensions (`flowar_jax.parallel.logical`); the
  bias takes the out name.
  """
  metadata = {}
  if axes is not None:
    metadata = dict(kernel_metadata=param_axes(*axes), bias_metadata=param_axes(axes[1]))
  return nnx.Linear(in_features, out_features, use_bias=bias, kernel_init=kernel_init,
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs, dot_general=precision.dot_general,
                    **metadata)


def rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """RMS normalisation over the last axis, computed in float32 and cast back (as the official code)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned per-channel weight (initialised to one)."""

  def __init__(self, dim: int, eps: float = 1e-6):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), **param_axes("norm"))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.eps) * self.weight[...].astype(x.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when `rng` is None (evaluation) or `rate` is 0.

  The keep mask is the counter-based hash of (seed, element index) that attention dropout uses
  (`flowar_jax.kernels.dropout`): a few integer ops that fuse into the consumer, where a threefry mask per
  element costs about as much as the matrix products around it on a CPU.
  """
  if rng is None or rate == 0.0:
    return x
  rows = jnp.zeros(x.shape[:-1], jnp.int32)
  for axis, size in enumerate(x.shape[:-1]):  # row-major index over the leading axes (wraps past 2**31)
    rows = rows * jnp.int32(size) + jax.lax.broadcasted_iota(jnp.int32, x.shape[:-1], axis)
  cols = jax.lax.broadcasted_iota(jnp.int32, (x.shape[-1],), 0)
  keep = keep_mask(rows[..., None], cols, seed_from_rng(rng), jnp.int32(0), x.shape[-1], rate)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def linear_chunks(layer: nnx.Linear, x: jax.Array, chunks: int) -> list[jax.Array]:
  """`jnp.split(layer(x), chunks, axis=-1)` as `chunks` products with column blocks of the kernel.

  Same values. Each chunk comes out contiguous, where slicing one wide output `[..., chunks * D]` copies it
  strided (and the backward pass pads and transposes it): about a fifth of the flow head's sampling time in
  float32 on a CPU.
  """
  kernel = layer.kernel[...]
  bias = None if layer.bias is None else layer.bias[...]
  width = kernel.shape[-1] // chunks
  out = []
  for i in range(chunks):
    y = precision.dot_general(x, kernel[:, i * width:(i + 1) * width], (((x.ndim - 1,), (0,)), ((), ())))
    out.append(y if bias is None else y + bias[i * width:(i + 1) * width])
  return out


def split_rng(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
  """n independent keys, or n Nones in evaluation."""
  if rng is None:
    return [None] * n
  return list(jax.random.split(rng, n))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale) + shift


class GatedMLP(nnx.Module):
  """Gated-GELU MLP (timm's SwiGLU with exact GELU): fc2(gelu(fc1_g x) * fc1_x x), biases on."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dropout_rate: float = 0.0):
    self.fc1_g = linear(dim, hidden, rngs=rngs, axes=("embed", "mlp"))
    self.fc1_x = linear(dim, hidden, rngs=rngs, axes=("embed", "mlp"))
    self.fc2 = linear(hidden, dim, rngs=rngs, axes=("mlp", "embed"))
    self.dropout_rate = dropout_rate

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """[..., D] -> [..., D]."""
    r1, r2 = split_rng(rng, 2)
    h = jax.nn.gelu(self.fc1_g(x), approximate=False) * self.fc1_x(x)
    if h.ndim == 3:
      h = constrain(h, ("batch", "length", "mlp"))
    h = dropout(h, self.dropout_rate, r1)
    return dropout(self.fc2(h), self.dropout_rate, r2)


def mlp_hidden(dim: int, mlp_ratio: float) -> int:
  """Hidden width of the gated MLP: int(dim * ratio * 2 / 3), as the official blocks size it."""
  return int(dim * mlp_ratio * 2 / 3.0)
