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
  codes instead of the sampled code (VAR uses it for visualisation only, not for FID); `compute_dtype`: of the
  transformer's matrix products while sampling (`flowar_jax.precision`)."""
  cfg: float = 1.5
  top_k: int = 900
  top_p: float = 0.96
  more_smooth: bool = False
  compute_dtype: str = "float32"

  def __post_init__(self):
    if not self.cfg >= 0 or self.cfg == float("inf"):
      raise ValueError(f"cfg must be a finite number >= 0, got {self.cfg}")
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


@dataclasses.dataclass(frozen=True)
class CategoricalHead:
  """The head seam over a backbone's logits (VAR's output layer makes them; this head holds no parameters).

  The condition of a scale is its logits `[B, l, V]`; its tokens are code indices `[B, l]`.
  """
  vocab_size: int
  more_smooth: bool = False

  def loss(self, cond: jax.Array, target: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of logits `[B, l, V]` against indices `[B, l]` (`rng` unused: nothing is drawn)."""
    del rng
    logp = jax.nn.log_softmax(cond.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, target[..., None].astype(jnp.int32), axis=-1))

  def draw(self, keys: jax.Array, scale: int, length: int) -> tuple[jax.Array, jax.Array | None]:
    """Keys `[B]` -> uniform draws `[B, length]` (one per token), and with `more_smooth` `[B, length, V]`."""
    tiny = float(jnp.finfo(jnp.float32).tiny)

    def one(key):
      r_tok, r_gumbel = jax.random.split(jax.random.fold_in(key, scale))
      u = jax.random.uniform(r_tok, (length,))
      if not self.more_smooth:
        return u, None
      return u, jax.random.uniform(r_gumbel, (length, self.vocab_size), minval=tiny)

    return jax.vmap(one)(keys)

  def sample(self, cond: jax.Array, uncond: jax.Array | None, noise: tuple[jax.Array, jax.Array | None],
             settings: CategoricalSampling, scale: int, num_scales: int) -> tuple[jax.Array, jax.Array | None]:
    """Logits `[B, l, V]` (and the unconditional ones, or None) -> (indices `[B, l]`, soft code weights
    `[B, l, V]` with `more_smooth`, else None), guided at cfg x scale / (num_scales - 1)."""
    if uncond is None:  # no guidance: at cfg 0 the ramp gives the conditional logits exactly
      logits, settings = jnp.concatenate([cond, cond]), dataclasses.replace(settings, cfg=0.0)
    else:
      logits = jnp.concatenate([cond, uncond])
    u, gumbel_u = noise
    return sample_scale(logits, settings, scale / max(num_scales - 1, 1), u, gumbel_u)
