"""The InceptionV3 of the standard FID: the 2015-12-05 TensorFlow graph that ADM's evaluator runs, in the
layout pytorch-fid ported it to (NHWC here).

It differs from torchvision's ImageNet InceptionV3 in three places, all reproduced: the 3x3 average pools
inside the A, C and E blocks ignore the zero padding (TensorFlow's 'SAME' average pool), the pool branch of
the last block (Mixed_7c) is a 3x3 *max* pool, and the classifier has 1008 outputs. Every conv has no bias
and is followed by batch norm (eps 1e-3) and ReLU.

Attribute names follow pytorch-fid's state dict (`Mixed_6d.branch1x1.conv`, `.bn`, `fc`), so its weight file
maps one to one (see `inception_weights`). Convolutions and the classifier run at the highest precision:
on TPU the default would round to bfloat16 and move FID.

Outputs (`InceptionV3.__call__` on a normalised 299x299 input):
  pool        [B, 2048]      pool3: the FID / precision / recall features
  logits      [B, 1008]      fc with bias
  logits_unbiased [B, 1008]  pool @ fc.kernel without the bias: what ADM's Inception Score softmaxes
  mixed_6_conv [B, 17, 17, 192]  `mixed_6/conv` of the TF graph (Mixed_6d.branch1x1 after ReLU); sFID uses
                             its first 7 channels, flattened in (h, w, c) order (17 * 17 * 7 = 2023)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

NUM_CLASSES = 1008  # the 2015 graph's classifier: 1000 ImageNet classes and 8 unused ones
POOL_DIM = 2048
BN_EPS = 1e-3
SPATIAL_CHANNELS = 7  # ADM's sFID keeps mixed_6/conv[..., :7]
_HIGHEST = jax.lax.Precision.HIGHEST


class FrozenBatchNorm(nnx.Module):
  """Inference batch norm with stored statistics: (x - mean) / sqrt(var + eps) * scale + bias."""

  def __init__(self, channels: int):
    self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
    self.mean = nnx.Param(jnp.zeros((channels,), jnp.float32))
    self.var = nnx.Param(jnp.ones((channels,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    inv = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
    return (x - self.mean[...]) * inv + self.bias[...]


class BasicConv(nnx.Module):
  """conv (no bias) -> batch norm -> ReLU, with PyTorch's explicit symmetric padding `(ph, pw)`."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int], *, rngs: nnx.Rngs,
               stride: int = 1, padding: int | tuple[int, int] = 0):
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.conv = nnx.Conv(in_channels, out_channels, kernel, strides=stride, padding=((ph, ph), (pw, pw)),
                         use_bias=False, precision=_HIGHEST, rngs=rngs)
    self.bn = FrozenBatchNorm(out_channels)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  """3x3, stride 1, pad 1 average over `[B, H, W, C]` that divides by the in-image count only
  (TensorFlow 'SAME'; PyTorch `count_include_pad=False`)."""
  window, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
  return total / count


def max_pool_3x3(x: jax.Array, *, stride: int, pad: int) -> jax.Array:
  """3x3 max pool over `[B, H, W, C]`; padding (if any) never wins."""
  p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), p)


class InceptionA(nnx.Module):
  """Mixed_5b/c/d: 35x35 -> 35x35, 64 + 64 + 96 + pool_features channels."""

  def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv(in_channels, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv(in_channels, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv(in_channels, pool_features, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    pool = self.branch_pool(avg_pool_3x3_same(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, pool], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a: 35x35 -> 17x17, 384 + 96 + in_channels channels."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv(in_channels, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, max_pool_3x3(x, stride=2, pad=0)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e: 17x17 -> 17x17, 4 x 192 channels, factorised 7x7 convolutions."""

  def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
    c7 = channels_7x7
    self.branch1x1 = BasicConv(in_channels, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv(in_channels, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv(in_channels, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv(in_channels, 192, 1, rngs=rngs)

  def branches(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (the block's output, its 1x1 branch alone)."""
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                 self.branch7x7dbl_5):
      d = conv(d)
    pool = self.branch_pool(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, d, pool], axis=-1), b1

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.branches(x)[0]


class InceptionD(nnx.Module):
  """Mixed_7a: 17x17 -> 8x8, 320 + 192 + in_channels channels."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv(in_channels, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv(in_channels, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, max_pool_3x3(x, stride=2, pad=0)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b/7c: 8x8 -> 8x8, 320 + 768 + 768 + 192 channels. `max_pool` (Mixed_7c in the 2015 graph)
  pools the pool branch with a max instead of the count-excluding average."""

  def __init__(self, in_channels: int, *, max_pool: bool, rngs: nnx.Rngs):
    self.max_pool = max_pool
    self.branch1x1 = BasicConv(in_channels, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv(in_channels, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_channels, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    t = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(t), self.branch3x3_2b(t)], axis=-1)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], axis=-1)
    pooled = max_pool_3x3(x, stride=1, pad=1) if self.max_pool else avg_pool_3x3_same(x)
    return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
  """The FID InceptionV3 on inputs already resized to 299x299 and normalised to [-1, 1] (see `inception_input`).

  Fully convolutional: any side >= 75 runs (tests use small inputs); the standard features need 299.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, max_pool=False, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool=True, rngs=rngs)
    self.fc = nnx.Linear(POOL_DIM, NUM_CLASSES, precision=_HIGHEST, rngs=rngs)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    """x `[B, H, W, 3]` float32 in [-1, 1] -> {'pool', 'logits', 'logits_unbiased', 'mixed_6_conv'}."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool_3x3(x, stride=2, pad=0)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool_3x3(x, stride=2, pad=0)
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
    x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
    x, mixed_6_conv = self.Mixed_6d.branches(x)
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
    pool = jnp.mean(x, axis=(1, 2))
    unbiased = jnp.matmul(pool, self.fc.kernel[...], precision=_HIGHEST)
    return {"pool": pool, "logits": unbiased + self.fc.bias[...], "logits_unbiased": unbiased,
            "mixed_6_conv": mixed_6_conv}


def spatial_features(mixed_6_conv: jax.Array) -> jax.Array:
  """`[B, 17, 17, 192]` -> ADM's sFID features `[B, 2023]`: the first 7 channels, flattened (h, w, c)."""
  return mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(mixed_6_conv.shape[0], -1)
