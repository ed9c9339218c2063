"""VAR's multi-scale residual VQVAE: images <-> per-scale token indices, NHWC.

The encoder maps an image to features f `[B, h, w, Cvae]` (h = w = the last scale side). Quantisation walks
the scales coarse to fine: the residual r (initially f) is area-downsampled to the scale's side (the last scale
takes it as is), each position takes its nearest codebook entry (squared L2, or cosine with `using_znorm`),
the code map is bicubic-upsampled back to h x w (not at the last scale), passed through a phi convolution

    phi(x) = (1 - q) x + q conv3x3(x),  q = quant_resi,

and added to the running reconstruction f_hat (and subtracted from r). Scales share `share_quant_resi` phi
convolutions: scale k of K uses the one whose tick (K phis: ticks evenly spaced in [1/(3K), 1 - 1/(3K)] when
K == 4, else [1/(2K), 1 - 1/(2K)]) is nearest to k / (K_scales - 1). Decoding repeats the same accumulation
from indices and runs the decoder on f_hat. The transformer's input for scale k + 1 is f_hat after scale k,
area-downsampled to scale k + 1's side (`next_input`, `teacher_forcing_input`).

Resizes are PyTorch's `area` and `bicubic` (a = -0.75, align_corners=False) from `flowar_jax.scales.resize`.
Attribute names mirror the official state dict (`quantize.embedding`, `quantize.quant_resi`, `quant_conv`,
`post_quant_conv`, `encoder.*`, `decoder.*`).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowar_jax.models.vae_blocks import conv
from flowar_jax.parallel.logical import param_axes
from flowar_jax.scales.resize import area_resize, bicubic_resize
from flowar_jax.tokenizers.msvq_blocks import Decoder, Encoder

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def phi_ticks(count: int) -> np.ndarray:
  """Positions in [0, 1] of `count` phi convolutions (the official partially shared / non-shared rule)."""
  if count == 4:
    return np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count)
  return np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)


def phi_index(scale: int, num_scales: int, count: int) -> int:
  """Which of `count` phi convolutions scale `scale` of `num_scales` uses."""
  if count == 1:
    return 0
  return int(np.argmin(np.abs(phi_ticks(count) - scale / (num_scales - 1))))


class Phi(nnx.Module):
  """phi(x) = (1 - ratio) x + ratio conv3x3(x), `[B, H, W, C]` -> same."""

  def __init__(self, channels: int, ratio: float, *, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, rngs=rngs)
    self.ratio = abs(ratio)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * (1 - self.ratio) + self.conv(x) * self.ratio


class VectorQuantizer(nnx.Module):
  """The codebook `embedding [V, Cvae]` and the phi convolutions `quant_resi[k]`."""

  def __init__(self, vocab_size: int, channels: int, patch_nums: Sequence[int], *, quant_resi: float = 0.5,
               share_quant_resi: int = 4, using_znorm: bool = False, rngs: nnx.Rngs):
    if abs(quant_resi) <= 1e-6:
      raise ValueError("quant_resi 0 (phi = identity) is not supported; the published VQVAE uses 0.5")
    if len(patch_nums) < 2 or list(patch_nums) != sorted(set(patch_nums)):
      raise ValueError(f"patch_nums must be at least two strictly increasing sides, got {tuple(patch_nums)}")
    self.patch_nums = tuple(int(p) for p in patch_nums)
    # share_quant_resi: 0 = one phi per scale, 1 = one phi for all, K > 1 = K phis shared by tick.
    self.num_phi = len(self.patch_nums) if share_quant_resi == 0 else share_quant_resi
    self.embedding = nnx.Embed(vocab_size, channels, rngs=rngs, embedding_metadata=param_axes("vocab", "latent"))
    self.quant_resi = nnx.List([Phi(channels, quant_resi, rngs=rngs) for _ in range(self.num_phi)])
    self.vocab_size, self.channels, self.using_znorm = vocab_size, channels, using_znorm

  @property
  def num_scales(self) -> int:
    return len(self.patch_nums)

  def phi(self, scale: int, x: jax.Array) -> jax.Array:
    return self.quant_resi[phi_index(scale, self.num_scales, self.num_phi)](x)

  def nearest(self, z: jax.Array) -> jax.Array:
    """`[N, Cvae]` -> `[N]` int32: the nearest codebook row (squared L2, or cosine with `using_znorm`)."""
    codes = self.embedding.embedding[...]
    if self.using_znorm:
      zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
      cn = codes / jnp.maximum(jnp.linalg.norm(codes, axis=-1, keepdims=True), 1e-12)
      return jnp.argmax(jnp.matmul(zn, cn.T, precision="highest"), axis=-1).astype(jnp.int32)
    # ||z||^2 + ||e||^2 - 2 z.e, summed in the official order.
    d = (jnp.sum(z * z, axis=-1, keepdims=True) + jnp.sum(codes * codes, axis=-1)) \
        + (-2.0) * jnp.matmul(z, codes.T, precision="highest")
    return jnp.argmin(d, axis=-1).astype(jnp.int32)

  def embed(self, indices: jax.Array, side: int) -> jax.Array:
    """`[B, side * side]` indices (row-major) -> code map `[B, side, side, Cvae]`."""
    return self.embedding(indices).reshape(indices.shape[0], side, side, self.channels)

  def upsampled_residual(self, scale: int, h: jax.Array) -> jax.Array:
    """Code map (or soft code map) of `scale` `[B, pn, pn, Cvae]` -> its phi'd contribution to f_hat
    `[B, H, H, Cvae]`: bicubic-upsampled to the last side first, except at the last scale."""
    if scale != self.num_scales - 1:
      h = bicubic_resize(h, self.patch_nums[-1])
    return self.phi(scale, h)

  def quantize(self, f: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
    """Features `[B, H, H, Cvae]` (H = last side) -> (per-scale indices `[B, pn * pn]`, f_hat after each
    scale `[B, H, H, Cvae]`)."""
    b, height, width, c = f.shape
    if (height, width) != (self.patch_nums[-1],) * 2 or c != self.channels:
      raise ValueError(f"expected features [B, {self.patch_nums[-1]}, {self.patch_nums[-1]}, {self.channels}], "
                       f"got {f.shape}")
    rest, f_hat = f, jnp.zeros_like(f)
    indices, f_hats = [], []
    for si, pn in enumerate(self.patch_nums):
      z = rest if si == self.num_scales - 1 else area_resize(rest, pn)
      idx = self.nearest(z.reshape(-1, c)).reshape(b, pn * pn)
      h = self.upsampled_residual(si, self.embed(idx, pn))
      f_hat, rest = f_hat + h, rest - h
      indices.append(idx)
      f_hats.append(f_hat)
    return indices, f_hats

  def indices_to_fhat(self, indices: Sequence[jax.Array]) -> jax.Array:
    """Per-scale indices `[B, pn * pn]` -> f_hat `[B, H, H, Cvae]` (every scale upsampled to the last side)."""
    self._check_indices(indices)
    f_hat = 0.0
    for si, (idx, pn) in enumerate(zip(indices, self.patch_nums)):
      f_hat = f_hat + self.upsampled_residual(si, self.embed(idx, pn))
    return f_hat

  def next_input(self, scale: int, f_hat: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adds scale `scale`'s code map `h [B, pn, pn, Cvae]` to `f_hat [B, H, H, Cvae]`.

    -> (new f_hat, the next scale's input `[B, pn_next, pn_next, Cvae]`: f_hat area-downsampled; at the last
    scale, f_hat itself)."""
    f_hat = f_hat + self.upsampled_residual(scale, h)
    if scale == self.num_scales - 1:
      return f_hat, f_hat
    return f_hat, area_resize(f_hat, self.patch_nums[scale + 1])

  def teacher_forcing_input(self, indices: Sequence[jax.Array]) -> jax.Array:
    """Per-scale indices -> the transformer's inputs for scales 1.. `[B, L - pn_0 ** 2, Cvae]`: for scale k + 1,
    f_hat after scales 0..k, area-downsampled to its side, row-major."""
    self._check_indices(indices)
    b = indices[0].shape[0]
    f_hat = jnp.zeros((b, self.patch_nums[-1], self.patch_nums[-1], self.channels), jnp.float32)
    out = []
    for si in range(self.num_scales - 1):
      f_hat, nxt = self.next_input(si, f_hat, self.embed(indices[si], self.patch_nums[si]))
      out.append(nxt.reshape(b, -1, self.channels))
    return jnp.concatenate(out, axis=1)

  def _check_indices(self, indices: Sequence[jax.Array]) -> None:
    want = [(pn * pn) for pn in self.patch_nums]
    got = [int(i.shape[-1]) for i in indices]
    if len(indices) > self.num_scales or got != want[:len(got)]:
      raise ValueError(f"expected per-scale indices of lengths {want}, got {got}")


class MultiScaleVQVAE(nnx.Module):
  """The VQVAE of VAR (`vae_ch160v4096z32` by default): images `[B, 16 s, 16 s, 3]` in [-1, 1] <-> indices."""

  def __init__(self, *, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160,
               ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, quant_resi: float = 0.5,
               share_quant_resi: int = 4, using_znorm: bool = False, quant_conv_ks: int = 3,
               patch_nums: Sequence[int] = PATCH_NUMS, rngs: nnx.Rngs):
    self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels, rngs=rngs)
    self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels, rngs=rngs)
    self.quantize = VectorQuantizer(vocab_size, z_channels, patch_nums, quant_resi=quant_resi,
                                    share_quant_resi=share_quant_resi, using_znorm=using_znorm, rngs=rngs)
    self.quant_conv = conv(z_channels, z_channels, quant_conv_ks, rngs=rngs)
    self.post_quant_conv = conv(z_channels, z_channels, quant_conv_ks, rngs=rngs)
    self.downsample = 2 ** (len(ch_mult) - 1)
    self.vocab_size, self.z_channels = vocab_size, z_channels

  @property
  def patch_nums(self) -> tuple[int, ...]:
    return self.quantize.patch_nums

  def features(self, images: jax.Array) -> jax.Array:
    """Images `[B, H, W, 3]` -> f `[B, H/s, W/s, Cvae]` (encoder, then quant_conv)."""
    side = self.patch_nums[-1] * self.downsample
    if images.ndim != 4 or images.shape[1:] != (side, side, 3):
      raise ValueError(f"expected images [B, {side}, {side}, 3] (last scale {self.patch_nums[-1]} x stride "
                       f"{self.downsample}), got {images.shape}")
    return self.quant_conv(self.encoder(images))

  def encode(self, images: jax.Array, rng: jax.Array | None = None) -> list[jax.Array]:
    """Images `[B, H, W, 3]` in [-1, 1] -> per-scale indices `[B, pn * pn]` int32, coarse to fine (`rng` unused:
    quantisation is deterministic)."""
    del rng
    return self.quantize.quantize(self.features(images))[0]

  # The tokenizer seam (`flowar_jax.tokenizers.base.Tokenizer`): targets are indices, the state is f_hat.

  def teacher_forcing(self, indices: Sequence[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
    """Per-scale indices -> (themselves, the transformer's inputs of scales 1.. `[B, L - pn_0^2, Cvae]`)."""
    return list(indices), self.quantize.teacher_forcing_input(indices)

  def empty_state(self, batch: int) -> jax.Array:
    """f_hat before any scale: zeros `[B, H, H, Cvae]`."""
    side = self.patch_nums[-1]
    return jnp.zeros((batch, side, side, self.z_channels), jnp.float32)

  def next_input(self, scale: int, f_hat: jax.Array, sampled: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adds scale `scale`'s codes to f_hat: `sampled` is indices `[B, pn^2]`, or soft code weights
    `[B, pn^2, V]` (a mixture of codes). -> (f_hat, the next scale's input `[B, pn', pn', Cvae]`)."""
    pn = self.patch_nums[scale]
    if jnp.issubdtype(sampled.dtype, jnp.integer):
      h = self.quantize.embed(sampled, pn)
    else:
      h = jnp.matmul(sampled, self.quantize.embedding.embedding[...], precision="highest")
      h = h.reshape(sampled.shape[0], pn, pn, -1)
    return self.quantize.next_input(scale, f_hat, h)

  def decode_fhat(self, f_hat: jax.Array) -> jax.Array:
    """f_hat `[B, h, h, Cvae]` -> images `[B, h s, h s, 3]` clipped to [-1, 1]."""
    return jnp.clip(self.decoder(self.post_quant_conv(f_hat)), -1.0, 1.0)

  def decode(self, f_hat: jax.Array) -> jax.Array:
    """The seam's decode: f_hat after the last scale `[B, h, h, Cvae]` -> images `[B, H, W, 3]` in [-1, 1]."""
    return self.decode_fhat(f_hat)

  def decode_indices(self, indices: Sequence[jax.Array]) -> jax.Array:
    """Per-scale indices -> images `[B, H, W, 3]` in [-1, 1]."""
    return self.decode_fhat(self.quantize.indices_to_fhat(indices))

  def reconstruct(self, images: jax.Array) -> jax.Array:
    """Images -> their reconstruction through all scales `[B, H, W, 3]` in [-1, 1]."""
    return self.decode_fhat(self.quantize.quantize(self.features(images))[1][-1])
