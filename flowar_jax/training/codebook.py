"""Codebook health while a VQ tokenizer trains: an EMA of each code's hit rate, and dead-code restarts.

A code's rate in a step is its hits over the uniform share batch_tokens / V (all scales' tokens of the
batch, V codes), so 1.0 is a fair share whatever the batch size. Its EMA (decay `usage_decay`) starts at 0
and is debiased as Adam debiases its moments (divided by 1 - decay^steps, counted per code), so a new or
restarted code is judged on the steps it has had. A code whose debiased EMA is below `dead_code_threshold`
is dead. Every `restart_every_steps` steps each dead code is replaced by a vector the encoder produced in the
current batch (a residual some scale quantised, drawn at random) and its EMA starts again from 0.

The EMA lives in the trained module (`VQTrainable.codebook_stats`), so checkpoints carry it and a resumed
run restarts the same codes as an uninterrupted one.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from flowar_jax.tokenizers.vq_trainable import VQTrainable

# Keys of the loss function's metrics that carry arrays to `codebook_update` (removed before logging).
HITS = "code_hits"
CANDIDATES = "restart_candidates"


def code_hits(indices: Sequence[jax.Array], vocab_size: int) -> jax.Array:
  """Per-scale indices (any shapes) -> `[V]` float32: how often each code was picked, over all scales."""
  flat = jnp.concatenate([jnp.ravel(i) for i in indices])
  return jnp.zeros((vocab_size,), jnp.float32).at[flat].add(1.0)


def relative_rate(hits: jax.Array) -> jax.Array:
  """Hits `[V]` -> hits per code relative to the uniform rate (total / V) `[V]`; 1.0 means a fair share."""
  return hits * hits.shape[0] / jnp.maximum(jnp.sum(hits), 1.0)


def update_usage(rate: jax.Array, weight: jax.Array, hits: jax.Array, decay: float
                 ) -> tuple[jax.Array, jax.Array]:
  """(rate EMA `[V]`, its weight `[V]`) after a step whose hits are `hits [V]`."""
  return decay * rate + (1.0 - decay) * relative_rate(hits), decay * weight + (1.0 - decay)


def usage(rate: jax.Array, weight: jax.Array) -> jax.Array:
  """Debiased EMA of each code's relative hit rate `[V]` (0 for a code that has had no step yet)."""
  return jnp.where(weight > 0, rate / jnp.where(weight > 0, weight, 1.0), 0.0)


def alive(rate: jax.Array, weight: jax.Array, threshold: float) -> jax.Array:
  """`[V]` bool: codes whose debiased usage is at least `threshold` times the uniform rate."""
  return usage(rate, weight) >= threshold


def perplexity(hits: jax.Array) -> jax.Array:
  """exp(entropy) of the code distribution in `hits [V]`: V when codes are used evenly, 1 when one code is."""
  p = hits / jnp.maximum(jnp.sum(hits), 1.0)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def restart_candidates(residuals: Sequence[jax.Array], count: int, rng: jax.Array) -> jax.Array:
  """Per-scale residuals `[N_k, C]` -> `count` of them drawn uniformly from all scales `[count, C]` (without
  replacement when there are enough), gradient-stopped."""
  pool = jax.lax.stop_gradient(jnp.concatenate(list(residuals), axis=0))
  rows = jax.random.choice(rng, pool.shape[0], (count,), replace=pool.shape[0] < count)
  return pool[rows]


def restart_dead(codes: jax.Array, dead: jax.Array, candidates: jax.Array) -> jax.Array:
  """Codes `[V, C]` with the rows where `dead [V]` replaced by the same rows of `candidates [V, C]`."""
  return jnp.where(dead[:, None], candidates.astype(codes.dtype), codes)


def codebook_update(train_config: ml_collections.ConfigDict):
  """The train step's `post_update` for `config.vae.train`: updates the usage EMA from the loss function's
  `HITS`, restarts dead codes from its `CANDIDATES` every `restart_every_steps` (0 = never), and logs
  `codebook_usage` (fraction of codes alive, measured before any restart of this step),
  `codebook_perplexity` (of this batch's codes), `codebook_restarted` (this step) and
  `codebook_restarted_total`."""
  every, threshold = int(train_config.restart_every_steps), float(train_config.dead_code_threshold)
  decay = float(train_config.usage_decay)

  def post_update(model: VQTrainable, metrics: dict, step: jax.Array) -> dict:
    metrics = dict(metrics)
    hits, candidates = metrics.pop(HITS), metrics.pop(CANDIDATES)
    stats = model.codebook_stats
    rate, weight = update_usage(stats.rate[...], stats.weight[...], hits, decay)
    live = alive(rate, weight, threshold)
    restarted = jnp.zeros((), jnp.int32)
    if every > 0:
      dead = ~live & ((step + 1) % every == 0)  # `step` counts the steps before this one
      embedding = model.vae.quantize.embedding.embedding
      embedding[...] = restart_dead(embedding[...], dead, candidates)
      rate, weight = jnp.where(dead, 0.0, rate), jnp.where(dead, 0.0, weight)
      restarted = jnp.sum(dead).astype(jnp.int32)
    stats.rate[...], stats.weight[...] = rate, weight
    stats.restarted[...] = stats.restarted[...] + restarted
    return dict(metrics, codebook_usage=jnp.mean(live.astype(jnp.float32)), codebook_perplexity=perplexity(hits),
                codebook_restarted=restarted, codebook_restarted_total=stats.restarted[...])

  return post_update
