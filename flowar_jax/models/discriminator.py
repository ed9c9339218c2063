"""PatchGAN discriminator (pix2pix / taming layout) for VAE training, NHWC.

GroupNorm replaces BatchNorm so that a sample's logits never depend on the rest of its batch (which keeps
the loss the same however the batch is sharded).
"""
from __future__ import annotations

import math

import jax
from flax import nnx

from flowar_jax.models.vae_blocks import CONV_AXES, IMAGES, NORM_AXES
from flowar_jax.parallel.logical import constrain

_LEAKY_SLOPE = 0.2
_MAX_WIDTH_MULT = 8


def _conv(in_channels: int, out_channels: int, stride: int, bias: bool, rngs: nnx.Rngs) -> nnx.Conv:
  # 4x4 kernels with padding 1 and N(0, 0.02) weights, the usual GAN discriminator init.
  return nnx.Conv(in_channels, out_channels, (4, 4), strides=stride, padding=((1, 1), (1, 1)), use_bias=bias,
                  kernel_init=nnx.initializers.normal(0.02), bias_init=nnx.initializers.zeros_init(), rngs=rngs,
                  **CONV_AXES)


def _norm(channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  return nnx.GroupNorm(channels, num_groups=math.gcd(32, channels), epsilon=1e-5, use_fast_variance=False,
                       rngs=rngs, **NORM_AXES)


class PatchDiscriminator(nnx.Module):
  """`num_layers` stride-2 convs, one stride-1 conv, then a 1-channel conv: one logit per image patch.

  Images `[B, H, W, in_channels]` -> logits `[B, H / 2**num_layers - 2, W / 2**num_layers - 2, 1]` (for H, W
  divisible by 2**num_layers). Widths double from `channels` per layer, capped at 8 * `channels`.
  """

  def __init__(self, in_channels: int, channels: int, num_layers: int, *, rngs: nnx.Rngs):
    if num_layers < 1:
      raise ValueError(f"PatchDiscriminator needs num_layers >= 1, got {num_layers}")
    widths = [channels * min(2**n, _MAX_WIDTH_MULT) for n in range(num_layers + 1)]
    self.conv_in = _conv(in_channels, widths[0], 2, True, rngs)
    # Layers 1 .. num_layers-1 halve the resolution; the last normalised layer keeps it.
    self.convs = nnx.List([_conv(widths[n - 1], widths[n], 2 if n < num_layers else 1, False, rngs)
                           for n in range(1, num_layers + 1)])
    self.norms = nnx.List([_norm(widths[n], rngs) for n in range(1, num_layers + 1)])
    self.conv_out = _conv(widths[-1], 1, 1, True, rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """[B, H, W, Cin] -> patch logits [B, h, w, 1]."""
    h = jax.nn.leaky_relu(self.conv_in(constrain(images, IMAGES)), _LEAKY_SLOPE)
    for conv, norm in zip(self.convs, self.norms):
      h = constrain(jax.nn.leaky_relu(norm(conv(h)), _LEAKY_SLOPE), IMAGES)
    return self.conv_out(h)
