"""The KL autoencoder (MAR's KL-16 layout, from LDM): images `[B, H, W, 3]` <-> latents `[B, H/s, W/s, C]`.

The module tree mirrors the official PyTorch state dict (encoder.down[i].block[j].conv1, encoder.mid.attn_1.q,
decoder.up[i].upsample.conv, quant_conv, post_quant_conv, ...). As in the official model, the encoder has
attention after every block of its lowest-resolution level, the decoder only in its mid block; `decoder.up[i]`
is indexed by level (0 = full resolution) and run from the last level to the first.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from flowar_jax.models.layers import split_rng
from flowar_jax.models.vae_blocks import IMAGES, Level, MidBlock, conv, group_norm
from flowar_jax.parallel.logical import constrain

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@flax.struct.dataclass
class DiagonalGaussian:
  """Posterior N(mean, exp(logvar)) per latent element; both `[B, h, w, C]`."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """`[B, h, w, 2C]` (mean first, then logvar, as the official channel split) -> clamped posterior."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """-> `[B, h, w, C]`, mean + std * eps."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(posterior || N(0, I)) summed over each sample's latent elements -> `[B]`."""
    per_element = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
    return jnp.sum(per_element, axis=tuple(range(1, per_element.ndim)))


class Encoder(nnx.Module):
  """`[B, H, W, Cin]` -> `[B, H/s, W/s, 2C]` (pre-quant_conv moments)."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    ch, mult, groups = config.base_channels, tuple(config.channel_multipliers), config.norm_groups
    self.conv_in = conv(config.in_channels, ch, 3, rngs=rngs)
    widths = [ch] + [ch * m for m in mult]
    last = len(mult) - 1
    self.down = nnx.List([
        Level(widths[i], widths[i + 1], config.encoder_blocks, attention=i == last,
              resample=None if i == last else "down", groups=groups, dropout_rate=config.dropout, rngs=rngs)
        for i in range(len(mult))])
    self.mid = MidBlock(widths[-1], groups, config.dropout, rngs=rngs)
    self.norm_out = group_norm(widths[-1], groups, rngs=rngs)
    self.conv_out = conv(widths[-1], 2 * config.latent_channels, 3, rngs=rngs)

  def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
    *level_rngs, mid_rng = split_rng(dropout_rng, len(self.down) + 1)
    h = self.conv_in(constrain(x, IMAGES))
    for level, rng in zip(self.down, level_rngs):
      h = level(h, rng)
    h = self.mid(h, mid_rng)
    return self.conv_out(jax.nn.swish(self.norm_out(h)))


class Decoder(nnx.Module):
  """`[B, h, w, C]` (after post_quant_conv) -> `[B, h*s, w*s, Cin]`."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    ch, mult, groups = config.base_channels, tuple(config.channel_multipliers), config.norm_groups
    top = ch * mult[-1]
    self.conv_in = conv(config.latent_channels, top, 3, rngs=rngs)
    self.mid = MidBlock(top, groups, config.dropout, rngs=rngs)
    # Level i reads the width of level i + 1 (or the mid block's width for the last level).
    in_widths = [ch * m for m in mult[1:]] + [top]
    self.up = nnx.List([
        Level(in_widths[i], ch * mult[i], config.decoder_blocks, attention=False,
              resample=None if i == 0 else "up", groups=groups, dropout_rate=config.dropout, rngs=rngs)
        for i in range(len(mult))])
    self.norm_out = group_norm(ch * mult[0], groups, rngs=rngs)
    self.conv_out = conv(ch * mult[0], config.in_channels, 3, rngs=rngs)

  def __call__(self, z: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
    mid_rng, *level_rngs = split_rng(dropout_rng, len(self.up) + 1)
    h = self.mid(self.conv_in(constrain(z, IMAGES)), mid_rng)
    for i in reversed(range(len(self.up))):
      h = self.up[i](h, level_rngs[i])
    return self.conv_out(jax.nn.swish(self.norm_out(h)))


class AutoencoderKL(nnx.Module):
  """KL-regularised conv autoencoder; `config` is `config.vae`."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    c = config.latent_channels
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)
    self.quant_conv = conv(2 * c, 2 * c, 1, rngs=rngs)
    self.post_quant_conv = conv(c, c, 1, rngs=rngs)
    self.stride = 2 ** (len(config.channel_multipliers) - 1)
    self.in_channels = config.in_channels
    self.latent_channels = c

  def encode(self, images: jax.Array, *, dropout_rng: jax.Array | None = None) -> DiagonalGaussian:
    """Images `[B, H, W, Cin]` in [-1, 1] -> posterior over `[B, H/s, W/s, C]`; H and W must divide by s."""
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(f"expected images [B, H, W, {self.in_channels}], got shape {images.shape}")
    height, width = images.shape[1:3]
    if height % self.stride or width % self.stride:
      raise ValueError(f"image size {height}x{width} (HxW) is not divisible by the VAE stride {self.stride}")
    return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(images, dropout_rng)))

  def decode(self, latents: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Raw (unscaled) latents `[B, h, w, C]` -> images `[B, h*s, w*s, Cin]`, not clipped."""
    if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
      raise ValueError(f"expected latents [B, h, w, {self.latent_channels}], got shape {latents.shape}")
    return self.decoder(self.post_quant_conv(latents), dropout_rng)

  def __call__(self, images: jax.Array, rng: jax.Array | None, *, dropout_rng: jax.Array | None = None
               ) -> tuple[jax.Array, DiagonalGaussian]:
    """Images `[B, H, W, Cin]` -> (reconstruction `[B, H, W, Cin]`, posterior).

    Decodes a posterior sample when `rng` is given, else the posterior mean.
    """
    enc_rng, dec_rng = split_rng(dropout_rng, 2)
    posterior = self.encode(images, dropout_rng=enc_rng)
    latents = posterior.mode() if rng is None else posterior.sample(rng)
    return self.decode(latents, dropout_rng=dec_rng), posterior


def encode_to_latents(vae: AutoencoderKL, images: jax.Array, latent_scale: float, rng: jax.Array | None
                      ) -> jax.Array:
  """Images `[B, H, W, Cin]` -> scaled latents `[B, H/s, W/s, C]`: a posterior sample if `rng`, else the mean."""
  posterior = vae.encode(images)
  latents = posterior.mode() if rng is None else posterior.sample(rng)
  return latents * latent_scale


def decode_from_latents(vae: AutoencoderKL, latents: jax.Array, latent_scale: float) -> jax.Array:
  """Scaled latents `[B, h, w, C]` -> images `[B, h*s, w*s, Cin]` clipped to [-1, 1]."""
  return jnp.clip(vae.decode(latents / latent_scale), -1.0, 1.0)
