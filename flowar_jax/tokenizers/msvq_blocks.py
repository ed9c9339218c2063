"""Encoder and decoder of VAR's multi-scale VQVAE (the LDM vq-f16 layout), NHWC.

The layout differs from the KL autoencoder of `flowar_jax.models.vae` in three ways, which is why it has its
own modules here while reusing the residual, resampling, conv and norm blocks from `models.vae_blocks`:
self-attention projects q, k and v with one fused 1x1 conv (`qkv`, 3C outputs, q then k then v); both the
encoder and the decoder attend after every block of their lowest-resolution level (besides the mid block);
and the decoder's levels hold one block more than the encoder's. Attribute names follow the official state
dict (`encoder.down[i].block[j]`, `decoder.up[i].attn[j].qkv`, ...), so conversion maps names one to one.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flowar_jax.models.vae_blocks import Downsample, ResnetBlock, Upsample, conv, group_norm

GROUPS = 32  # GroupNorm groups of every norm in the official VQVAE


class QKVAttnBlock(nnx.Module):
  """Single-head self-attention over all positions with a fused `qkv` 1x1 conv, and a residual."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.norm = group_norm(channels, GROUPS, rngs=rngs)
    self.qkv = conv(channels, 3 * channels, 1, rngs=rngs)
    self.proj_out = conv(channels, channels, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, C]."""
    b, height, width, c = x.shape
    q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b, height * width, 3 * c), 3, axis=-1)
    # The official code scales by int(C) ** -0.5 after the product; same value.
    scores = jnp.einsum("bic,bjc->bij", q, k, precision="highest") * int(c) ** -0.5
    out = jnp.einsum("bij,bjc->bic", jax.nn.softmax(scores, axis=-1), v, precision="highest")
    return x + self.proj_out(out.reshape(b, height, width, c))


class MidBlock(nnx.Module):
  """`mid.block_1`, `mid.attn_1`, `mid.block_2` at the lowest resolution."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(channels, channels, GROUPS, 0.0, rngs=rngs)
    self.attn_1 = QKVAttnBlock(channels, rngs=rngs)
    self.block_2 = ResnetBlock(channels, channels, GROUPS, 0.0, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.block_2(self.attn_1(self.block_1(x)))


class Level(nnx.Module):
  """`block[j]` residual blocks, each followed by `attn[j]` when the level attends, then an optional
  `downsample` (encoder) or `upsample` (decoder)."""

  def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool,
               resample: str | None, *, rngs: nnx.Rngs):
    self.block = nnx.List([ResnetBlock(in_channels if j == 0 else out_channels, out_channels, GROUPS, 0.0,
                                       rngs=rngs) for j in range(num_blocks)])
    self.attn = nnx.List([QKVAttnBlock(out_channels, rngs=rngs) for _ in range(num_blocks)] if attention else [])
    if resample == "down":
      self.downsample = Downsample(out_channels, rngs=rngs)
    elif resample == "up":
      self.upsample = Upsample(out_channels, rngs=rngs)
    elif resample is not None:
      raise ValueError(f"resample must be 'down', 'up' or None, got {resample!r}")
    self.resample = resample

  def __call__(self, x: jax.Array) -> jax.Array:
    for j, block in enumerate(self.block):
      x = block(x)
      if len(self.attn):
        x = self.attn[j](x)
    if self.resample == "down":
      x = self.downsample(x)
    elif self.resample == "up":
      x = self.upsample(x)
    return x


class Encoder(nnx.Module):
  """Images `[B, H, W, 3]` -> features `[B, H/s, W/s, z_channels]` with s = 2 ** (len(ch_mult) - 1)."""

  def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, *,
               in_channels: int = 3, rngs: nnx.Rngs):
    widths = [ch] + [ch * m for m in ch_mult]
    last = len(ch_mult) - 1
    self.conv_in = conv(in_channels, ch, 3, rngs=rngs)
    self.down = nnx.List([
        Level(widths[i], widths[i + 1], num_res_blocks, attention=i == last,
              resample=None if i == last else "down", rngs=rngs) for i in range(len(ch_mult))])
    self.mid = MidBlock(widths[-1], rngs=rngs)
    self.norm_out = group_norm(widths[-1], GROUPS, rngs=rngs)
    self.conv_out = conv(widths[-1], z_channels, 3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv_in(x)
    for level in self.down:
      h = level(h)
    return self.conv_out(jax.nn.swish(self.norm_out(self.mid(h))))


class Decoder(nnx.Module):
  """Features `[B, h, w, z_channels]` -> images `[B, h*s, w*s, 3]` (not clipped)."""

  def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, *,
               out_channels: int = 3, rngs: nnx.Rngs):
    top = ch * ch_mult[-1]
    last = len(ch_mult) - 1
    self.conv_in = conv(z_channels, top, 3, rngs=rngs)
    self.mid = MidBlock(top, rngs=rngs)
    # up[i] is indexed by level (0 = full resolution) and reads the width of level i + 1.
    in_widths = [ch * m for m in ch_mult[1:]] + [top]
    self.up = nnx.List([
        Level(in_widths[i], ch * ch_mult[i], num_res_blocks + 1, attention=i == last,
              resample=None if i == 0 else "up", rngs=rngs) for i in range(len(ch_mult))])
    self.norm_out = group_norm(ch * ch_mult[0], GROUPS, rngs=rngs)
    self.conv_out = conv(ch * ch_mult[0], out_channels, 3, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    h = self.mid(self.conv_in(z))
    for i in reversed(range(len(self.up))):
      h = self.up[i](h)
    return self.conv_out(jax.nn.swish(self.norm_out(h)))
