"""Building blocks of the KL autoencoder (LDM / MAR layout), NHWC.

Attribute names follow the PyTorch state dict of the official model (norm1, conv1, nin_shortcut, q, k, v,
proj_out, ...), so a weight converter maps names one to one: a conv `kernel [kh, kw, in, out]` is the
transpose of `weight [out, in, kh, kw]`, and a GroupNorm `scale` is `weight`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flowar_jax.models.layers import dropout, split_rng
from flowar_jax.parallel.logical import constrain, param_axes

IMAGES = ("batch", None, None, None)  # logical names of feature maps [B, H, W, C]
CONV_AXES = dict(kernel_metadata=param_axes(None, None, "conv_in", "conv_out"), bias_metadata=param_axes("conv_out"))
NORM_AXES = dict(scale_metadata=param_axes("norm"), bias_metadata=param_axes("norm"))

# PyTorch's default conv init (kaiming-uniform with a=sqrt(5)) is uniform(+-1/sqrt(fan_in)).
TORCH_CONV_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
GROUPNORM_EPS = 1e-6


def conv(in_channels: int, out_channels: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1,
         padding: int | str | None = None) -> nnx.Conv:
  """Conv with PyTorch-default-like init and zero bias; `padding` defaults to kernel // 2 on every side."""
  if padding is None:
    padding = kernel // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nnx.Conv(in_channels, out_channels, (kernel, kernel), strides=stride, padding=padding,
                  kernel_init=TORCH_CONV_INIT, bias_init=nnx.initializers.zeros_init(), rngs=rngs, **CONV_AXES)


def group_norm(channels: int, groups: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
  # Two-pass variance, as torch.nn.GroupNorm computes it.
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=GROUPNORM_EPS, use_fast_variance=False,
                       rngs=rngs, **NORM_AXES)


class ResnetBlock(nnx.Module):
  """norm-swish-conv3x3, norm-swish-dropout-conv3x3, plus a 1x1 `nin_shortcut` when the width changes."""

  def __init__(self, in_channels: int, out_channels: int, groups: int, dropout_rate: float, *,
               rngs: nnx.Rngs):
    self.norm1 = group_norm(in_channels, groups, rngs=rngs)
    self.conv1 = conv(in_channels, out_channels, 3, rngs=rngs)
    self.norm2 = group_norm(out_channels, groups, rngs=rngs)
    self.conv2 = conv(out_channels, out_channels, 3, rngs=rngs)
    self.nin_shortcut = conv(in_channels, out_channels, 1, rngs=rngs) if in_channels != out_channels else None
    self.dropout_rate = dropout_rate

  def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
    """[B, H, W, Cin] -> [B, H, W, Cout]; dropout only when `dropout_rng` is given."""
    h = self.conv1(jax.nn.swish(self.norm1(x)))
    h = dropout(jax.nn.swish(self.norm2(h)), self.dropout_rate, dropout_rng)
    h = self.conv2(h)
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return constrain(x + h, IMAGES)


class AttnBlock(nnx.Module):
  """Single-head self-attention over all positions, with 1x1-conv projections and a residual."""

  def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
    self.norm = group_norm(channels, groups, rngs=rngs)
    self.q = conv(channels, channels, 1, rngs=rngs)
    self.k = conv(channels, channels, 1, rngs=rngs)
    self.v = conv(channels, channels, 1, rngs=rngs)
    self.proj_out = conv(channels, channels, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, C]."""
    b, height, width, c = x.shape
    h = self.norm(x)
    q, k, v = (proj(h).reshape(b, height * width, c) for proj in (self.q, self.k, self.v))
    weights = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * c**-0.5, axis=-1)
    out = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, height, width, c)
    return constrain(x + self.proj_out(out), IMAGES)


class Downsample(nnx.Module):
  """Zero-pad one row at the bottom and one column at the right, then a 3x3 stride-2 conv: H -> H / 2."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, stride=2, padding=0, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv: H -> 2H."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class MidBlock(nnx.Module):
  """res, attention, res at the lowest resolution (`mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

  def __init__(self, channels: int, groups: int, dropout_rate: float, *, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(channels, channels, groups, dropout_rate, rngs=rngs)
    self.attn_1 = AttnBlock(channels, groups, rngs=rngs)
    self.block_2 = ResnetBlock(channels, channels, groups, dropout_rate, rngs=rngs)

  def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
    r1, r2 = split_rng(dropout_rng, 2)
    return self.block_2(self.attn_1(self.block_1(x, r1)), r2)


class Level(nnx.Module):
  """One resolution level: `block[j]` res blocks, each followed by `attn[j]` when the level has attention.

  The encoder's levels end in an optional `downsample`, the decoder's in an optional `upsample`; the
  attribute names match the official `down[i]` / `up[i]` modules.
  """

  def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, resample: str | None,
               groups: int, dropout_rate: float, *, rngs: nnx.Rngs):
    self.block = nnx.List([
        ResnetBlock(in_channels if j == 0 else out_channels, out_channels, groups, dropout_rate, rngs=rngs)
        for j in range(num_blocks)])
    self.attn = nnx.List([AttnBlock(out_channels, groups, rngs=rngs) for _ in range(num_blocks)] if attention
                         else [])
    if resample == "down":
      self.downsample = Downsample(out_channels, rngs=rngs)
    elif resample == "up":
      self.upsample = Upsample(out_channels, rngs=rngs)
    elif resample is not None:
      raise ValueError(f"resample must be 'down', 'up' or None, got {resample!r}")
    self.resample = resample

  def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
    """[B, H, W, Cin] -> [B, H', W', Cout] with H' = H / 2, 2H or H by `resample`."""
    for j, (block, rng) in enumerate(zip(self.block, split_rng(dropout_rng, len(self.block)))):
      x = block(x, rng)
      if len(self.attn):
        x = self.attn[j](x)
    if self.resample == "down":
      x = self.downsample(x)
    elif self.resample == "up":
      x = self.upsample(x)
    return x
