"""The categorical head's sampling, as VAR computes it: CFG ramp, top-k / top-p, optional Gumbel smoothing.

Randomness comes in as uniform draws, so a sample is a pure function of (logits, draws) and can be compared
token for token with another implementation fed the same draws:

- a token is drawn by inverting the CDF of softmax(filtered logits): with u in [0, 1), it is the number of
  vocabulary entries whose cumulative probability is <= u * (total), i.e. the first entry whose cumulative
  probability exceeds u * total. This is an exact categorical sampler (torch.multinomial draws the same
  distribution from its own generator).
- the `more_smooth` option adds Gumbel noise -log(-log(u)) with one u per vocabulary entry.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class CategoricalSampling:
  """VAR's sampling settings. `cfg`: guidance at the last scale (ramped linearly from 0 at the first);
  `top_k` 0 and `top_p` 0 switch the filters off; `more_smooth`: feed the VQ a Gumbel-softmax mixture of
  codes instead of the sampled code (VAR uses it for visualisation only, not for FID)."""
  cfg: float = 1.5
  top_k: int = 900
  top_p: float = 0.96
  more_smooth: bool = False

  def __post_init__(self):
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
    if not 0.0 <= self.top_p < 1.0:
      raise ValueError(f"top_p must lie in [0, 1) (0: off), got {self.top_p}")


def guided_logits(logits: jax.Array, cfg: float, ratio: float) -> jax.Array:
  """`[2B, l, V]` (conditional rows first, then unconditional) -> `[B, l, V]`: (1 + t) cond - t uncond with
  t = cfg * ratio, where ratio = scale / (num_scales - 1) ramps the guidance from 0 to cfg."""
  t = cfg * ratio
  b = logits.shape[0] // 2
  return (1 + t) * logits[:b] - t * logits[b:]


def filter_top_k_top_p(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """`[..., V]` -> the same logits with filtered-out entries at -inf.

  top-k keeps every entry not below the k-th largest value (ties at the threshold are kept). top-p then
  sorts ascending, removes the entries whose cumulative probability (softmax of the top-k-filtered logits) is
  <= 1 - top_p, and always keeps the largest.
  """
  vocab = logits.shape[-1]
  if top_k > 0:
    if top_k > vocab:
      raise ValueError(f"top_k {top_k} exceeds the vocabulary size {vocab}")
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p > 0:
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    remove = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) <= (1 - top_p)
    remove = remove.at[..., -1].set(False)
    remove = jnp.take_along_axis(remove, jnp.argsort(order, axis=-1), axis=-1)  # back to vocabulary order
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def sample_from_uniform(logits: jax.Array, u: jax.Array) -> jax.Array:
  """Logits `[..., V]` and draws `u [...]` in [0, 1) -> tokens `[...]` int32 (inverse CDF of the softmax)."""
  cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
  idx = jnp.sum(cdf <= (u * cdf[..., -1])[..., None], axis=-1)
  return jnp.minimum(idx, logits.shape[-1] - 1).astype(jnp.int32)


def smoothing_temperature(ratio: float) -> float:
  """Gumbel-softmax temperature at scale ratio `ratio` (MaskGIT-style anneal): max(0.27 (1 - 0.95 r), 0.005)."""
  return max(0.27 * (1 - ratio * 0.95), 0.005)


def gumbel_softmax(logits: jax.Array, u: jax.Array, tau: float) -> jax.Array:
  """Soft Gumbel-softmax `[..., V]` from uniform draws `u [..., V]` in (0, 1): softmax((logits + g) / tau) with
  g = -log(-log(u))."""
  gumbels = -jnp.log(-jnp.log(u))
  return jax.nn.softmax((logits + gumbels) / tau, axis=-1)


def sample_scale(logits: jax.Array, settings: CategoricalSampling, ratio: float, u: jax.Array,
                 gumbel_u: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
  """One scale of VAR's sampler. `logits [2B, l, V]` (cond, then uncond), `u [B, l]`, `gumbel_u [B, l, V]`.

  -> (tokens `[B, l]`, soft code weights `[B, l, V]` when `more_smooth`, else None). As in VAR, the Gumbel
  mixture is taken over the top-k / top-p filtered logits, sharpened by (1 + ratio).
  """
  filtered = filter_top_k_top_p(guided_logits(logits, settings.cfg, ratio), settings.top_k, settings.top_p)
  tokens = sample_from_uniform(filtered, u)
  if not settings.more_smooth:
    return tokens, None
  if gumbel_u is None:
    raise ValueError("more_smooth sampling needs gumbel draws [B, l, V]")
  return tokens, gumbel_softmax(filtered * (1 + ratio), gumbel_u, smoothing_temperature(ratio))
