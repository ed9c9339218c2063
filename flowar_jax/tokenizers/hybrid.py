"""HART's hybrid tokenizer: VAR's multi-scale residual VQ plus the continuous residual it misses, NHWC.

The encoder, decoder, codebook, phi convolutions and quant convs are those of `tokenizers.msvq` (same layout,
same state-dict names). What differs is the quantisation walk HART tokenizes with (its
`f_to_idxBl_and_frest`):

- scales 0 .. K-2 are VAR's: the rest r is area-downsampled, quantised to the nearest code (squared L2), the
  code map is bicubic-upsampled and passed through its phi convolution, then added to f_hat and taken off r;
- the last scale quantises r as is and adds its code map *without* phi ("consistency" in the official code),
  so that the code map and the continuous residual live in the same space;
- the continuous token of the last scale is r just before that last discrete step ("the rest before last",
  `[B, h * w, Cvae]`). Its discrete part is the last code map; what the codes miss is
  `rest_before_last - embed(last indices)`, the residual HART's head generates.

Decoding the discrete tokens only: f_hat = sum_{k < K-1} phi_k(up(e_k)) + e_{K-1}. Decoding discrete plus
residual: f_hat = sum_{k < K-1} phi_k(up(e_k)) + rest_before_last, which is the encoder's features f up to
float rounding. The transformer's teacher-forcing inputs of scales 1 .. K-1 only involve scales 0 .. K-2, so
they are VAR's.

HART's own training forward (`HARTHybridQuantizer.forward`) walks differently: it applies phi at the last scale
too, and with probability 1 - skip_continuous_prob adds the final rest (so decodes f itself). That path is
`training_forward` here (with its VQ loss and codebook usage); the two walks differ only at the last scale's phi.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from flowar_jax.scales.resize import area_resize, bicubic_resize
from flowar_jax.tokenizers.msvq import MultiScaleVQVAE, TrainingQuantization


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridTokens:
  """What the hybrid tokenizer's `encode` gives.

  indices: per-scale code indices `[B, pn * pn]` int32, coarse to fine (K scales).
  rest_before_last: the continuous last-scale token `[B, h * w, Cvae]` (row-major): f minus the discrete
    scales 0 .. K-2, i.e. the last scale's code map plus the residual the codes miss.
  """
  indices: list[jax.Array]
  rest_before_last: jax.Array


class HybridTokenizer(MultiScaleVQVAE):
  """HART's tokenizer (`hart_autoencoder`, quantizer `var_hybrid`): images `[B, 16 s, 16 s, 3]` in [-1, 1]
  <-> per-scale indices plus the last scale's continuous residual. Same constructor as `MultiScaleVQVAE`."""

  def __init__(self, **kwargs):
    if kwargs.get("using_znorm", False):
      raise ValueError("using_znorm=True is not supported: HART's hybrid encode always uses squared L2")
    super().__init__(**kwargs)

  def _side(self) -> int:
    return self.patch_nums[-1]

  def _code_map(self, scale: int, h: jax.Array) -> jax.Array:
    """Code map `[B, pn, pn, Cvae]` of `scale` -> its contribution to f_hat `[B, H, H, Cvae]` in the hybrid
    walk: bicubic-upsampled and phi'd, except at the last scale (as is)."""
    if scale == self.quantize.num_scales - 1:
      return h
    return self.quantize.phi(scale, bicubic_resize(h, self._side()))

  def quantize_hybrid(self, f: jax.Array) -> tuple[HybridTokens, jax.Array]:
    """Features `[B, H, H, Cvae]` -> (tokens, the discrete f_hat `[B, H, H, Cvae]` after the last scale)."""
    q, side = self.quantize, self._side()
    b, height, width, c = f.shape
    if (height, width) != (side, side) or c != self.z_channels:
      raise ValueError(f"expected features [B, {side}, {side}, {self.z_channels}], got {f.shape}")
    rest, f_hat = f, jnp.zeros_like(f)
    indices = []
    for si, pn in enumerate(q.patch_nums):
      last = si == q.num_scales - 1
      if last:
        rest_before_last = rest
      z = rest if last else area_resize(rest, pn)
      idx = q.nearest(z.reshape(-1, c)).reshape(b, pn * pn)
      h = self._code_map(si, q.embed(idx, pn))
      f_hat, rest = f_hat + h, rest - h
      indices.append(idx)
    return HybridTokens(indices, rest_before_last.reshape(b, side * side, c)), f_hat

  def encode(self, images: jax.Array, rng: jax.Array | None = None) -> HybridTokens:
    """Images `[B, H, W, 3]` in [-1, 1] -> `HybridTokens` (`rng` unused: quantisation is deterministic)."""
    del rng
    return self.quantize_hybrid(self.features(images))[0]

  def residual(self, tokens: HybridTokens) -> jax.Array:
    """What the discrete tokens miss at the last scale: rest_before_last - embed(last indices) `[B, h*w, C]`
    (the target of HART's residual head, given the true last-scale codes)."""
    return tokens.rest_before_last - self.quantize.embedding(tokens.indices[-1])

  def training_residual(self, quantized: TrainingQuantization) -> jax.Array:
    """`residual` from the training walk's quantisation (`quantize.quantize_for_training`) `[B * h * w, C]`,
    row-major. Both walks pick the same codes and reach the same rest before the last scale (they differ only
    in the last scale's phi), and that rest is what the walk quantised at its last scale."""
    return quantized.residuals[-1] - self.quantize.embedding(quantized.indices[-1].reshape(-1))

  def _fhat(self, indices: Sequence[jax.Array], last: jax.Array) -> jax.Array:
    """Scales 0 .. K-2 from indices, plus the last scale's map `last [B, h*w, C]` added as is."""
    q = self.quantize
    q._check_indices(indices)  # pylint: disable=protected-access
    if len(indices) != q.num_scales:
      raise ValueError(f"expected indices of all {q.num_scales} scales, got {len(indices)}")
    f_hat = jnp.zeros((last.shape[0], self._side(), self._side(), self.z_channels), jnp.float32)
    for si in range(q.num_scales - 1):
      f_hat = f_hat + self._code_map(si, q.embed(indices[si], self.patch_nums[si]))
    return f_hat + last.reshape(f_hat.shape)

  def discrete_fhat(self, indices: Sequence[jax.Array]) -> jax.Array:
    """Per-scale indices (all K) -> f_hat of the discrete tokens only `[B, H, H, Cvae]` (hybrid walk)."""
    return self._fhat(indices, self.quantize.embedding(indices[-1]))

  def tokens_fhat(self, tokens: HybridTokens, continuous: bool = True) -> jax.Array:
    """-> f_hat `[B, H, H, Cvae]`: discrete plus residual (`continuous`), or the discrete tokens only."""
    if not continuous:
      return self.discrete_fhat(tokens.indices)
    return self._fhat(tokens.indices, tokens.rest_before_last)

  def decode_tokens(self, tokens: HybridTokens, continuous: bool = True) -> jax.Array:
    """Tokens -> images `[B, H, W, 3]` in [-1, 1], with or without the continuous residual."""
    return self.decode_fhat(self.tokens_fhat(tokens, continuous))

  def reconstruct_hybrid(self, images: jax.Array, continuous: bool = True) -> jax.Array:
    """Images -> reconstruction `[B, H, W, 3]` through encode and decode (hybrid, or discrete only)."""
    return self.decode_tokens(self.encode(images), continuous)

  def training_forward(self, f: jax.Array, continuous: jax.Array | bool,
                       beta: float = 0.25) -> tuple[jax.Array, jax.Array, jax.Array]:
    """HART's training walk over features f `[B, H, H, Cvae]`: phi at every scale (the last included); with
    `continuous` (a bool, or a traced bool scalar drawn with probability 1 - skip_continuous_prob) the final
    rest is added back, so the decoder sees f.

    -> (f_hat `[B, H, H, Cvae]` with a straight-through gradient to f, the VQ loss: the mean over scales of
    beta * |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2 (mean squares), the codebook usage: the percentage of
    codes hit at least once over all scales of the batch)."""
    f_ng = jax.lax.stop_gradient(f)
    indices, f_hats = self.quantize.quantize(f_ng)
    mse = lambda a, b: jnp.mean((a - b) ** 2)
    vq_loss = sum(beta * mse(jax.lax.stop_gradient(fh), f) + mse(fh, f_ng) for fh in f_hats) / len(f_hats)
    f_hat = jnp.where(continuous, f_hats[-1] + (f_ng - f_hats[-1]), f_hats[-1])
    hits = jnp.zeros((self.vocab_size,), jnp.int32)
    for idx in indices:
      hits = hits.at[idx.reshape(-1)].add(1)
    usage = 100.0 * jnp.mean((hits >= 1).astype(jnp.float32))
    return (jax.lax.stop_gradient(f_hat) - f_ng) + f, vq_loss, usage

  # The tokenizer seam (`flowar_jax.tokenizers.base.Tokenizer`): discrete targets per scale, the state is f_hat.

  def teacher_forcing(self, tokens: HybridTokens) -> tuple[list[jax.Array], jax.Array]:
    """-> (per-scale indices, the transformer's inputs of scales 1.. `[B, L - pn_0^2, Cvae]`: VAR's, since
    they only involve scales 0 .. K-2)."""
    return list(tokens.indices), self.quantize.teacher_forcing_input(tokens.indices)

  def next_input(self, scale: int, f_hat: jax.Array,
                 sampled: jax.Array | tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Adds scale `scale`'s tokens to f_hat. Before the last scale `sampled` is indices `[B, pn^2]` or soft
    code weights `[B, pn^2, V]` (as VAR's). At the last scale it is indices, or (indices, residual
    `[B, pn^2, Cvae]`), added without phi. -> (f_hat, next scale's input; at the last scale f_hat itself)."""
    q = self.quantize
    if scale != q.num_scales - 1:
      return super().next_input(scale, f_hat, sampled)
    residual = None
    if isinstance(sampled, (tuple, list)):
      sampled, residual = sampled
    side = self._side()
    if not jnp.issubdtype(sampled.dtype, jnp.integer):
      raise ValueError(f"the last scale takes indices [B, {side * side}] (and a residual), got {sampled.dtype}")
    h = q.embed(sampled, side)
    if residual is not None:
      h = h + residual.reshape(h.shape)
    f_hat = f_hat + h
    return f_hat, f_hat
