"""Stage 1 for VAR: the multi-scale residual VQ tokenizer of `config.vae`, trained by the shared loop with
codebook usage tracking and dead-code restarts (`training.codebook`).

It keeps the VAE stage's layout (STAGE_DIR/{checkpoints,metrics.jsonl}, e.g. STAGE_DIR = WORKDIR/vae, where
`runs.workdir.find_vae_checkpoints` looks), resumes from its latest checkpoint, and logs `l1`, `l2`, `vq_mse`
(see `vq_loss`), `codebook_usage`, `codebook_perplexity`, `codebook_restarted(_total)` (see `codebook`).

A trainable whose tokenizer is HART's `HybridTokenizer` trains with HART's alternating paths: each step decodes
the discrete sum with probability `config.vae.train.skip_continuous_prob`, else the full continuous latent
(`vq_loss.hybrid_vq_loss`), and also logs `continuous` (the path taken, 1.0 = continuous), `residual_abs` and
`residual_energy_share`.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import ml_collections
import optax
from flax import nnx

from flowar_jax import data
from flowar_jax.models.registry import build_tokenizer_trainable, build_vae
from flowar_jax.tokenizers.hybrid import HybridTokenizer
from flowar_jax.tokenizers.vq_trainable import VQTrainable
from flowar_jax.training import loop
from flowar_jax.training.codebook import CANDIDATES, HITS, code_hits, codebook_update, restart_candidates
from flowar_jax.training.optimizer import adamw, warmup_cosine
from flowar_jax.training.vq_loss import hybrid_vq_loss, vq_loss

VQ_EMA_DECAY = 0.999
TRAIN_KEYS = ("batch_size", "num_train_steps", "learning_rate", "warmup_steps", "l1_weight", "l2_weight",
              "commitment_weight", "usage_decay", "restart_every_steps", "dead_code_threshold")


def skip_continuous_prob(train_config: ml_collections.ConfigDict) -> float:
  """`config.vae.train.skip_continuous_prob`, the probability of a hybrid tokenizer's discrete-only path per
  step, checked to be a probability."""
  if "skip_continuous_prob" not in train_config:
    raise ValueError("config.vae.train.skip_continuous_prob is missing: a HybridTokenizer trains with HART's "
                     "alternating paths and needs the probability of its discrete-only path per step, e.g. 0.5")
  p = train_config.skip_continuous_prob
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
    raise ValueError(f"config.vae.train.skip_continuous_prob must be a probability in [0, 1], got {p!r}")
  return float(p)


def check_vq_config(config: ml_collections.ConfigDict, tokenizer: nnx.Module | None = None) -> None:
  """`config.vae.train` has the VQ stage's keys with usable values, and the images fit the tokenizer
  (`tokenizer`, possibly abstract; default: the registry's for `config`). A `HybridTokenizer` also needs
  `skip_continuous_prob`."""
  train = config.vae.get("train")
  missing = [k for k in TRAIN_KEYS if train is None or k not in train]
  if missing:
    raise ValueError(f"config.vae.train lacks the VQ stage's keys: {', '.join(missing)}")
  problems = []
  if not 0.0 <= train.usage_decay < 1.0:
    problems.append(f"config.vae.train.usage_decay must be in [0, 1), got {train.usage_decay}")
  if train.restart_every_steps < 0:
    problems.append(f"config.vae.train.restart_every_steps must be >= 0 (0 = never), got "
                    f"{train.restart_every_steps}")
  if train.dead_code_threshold < 0:
    problems.append(f"config.vae.train.dead_code_threshold must be >= 0, got {train.dead_code_threshold}")
  vqvae = nnx.eval_shape(lambda: build_vae(config)) if tokenizer is None else tokenizer
  if isinstance(vqvae, HybridTokenizer):
    try:
      skip_continuous_prob(train)
    except ValueError as e:
      problems.append(str(e))
  side = vqvae.patch_nums[-1] * vqvae.downsample
  if config.data.image_size != side:
    problems.append(f"config.data.image_size {config.data.image_size} != last scale x tokenizer stride = {side}")
  if problems:
    raise ValueError("; ".join(problems))


def vq_stage_loss(train_config: ml_collections.ConfigDict, vocab_size: int):
  """loss_fn for the shared train step; its metrics also carry this batch's code hits and restart candidates
  (one random encoder residual per code) for `codebook.codebook_update`. A `HybridTokenizer` draws its path
  from the step's rng: discrete-only with probability `skip_continuous_prob`, else continuous."""

  def loss_fn(model: VQTrainable, batch, rng, context, step):
    if isinstance(model.vae, HybridTokenizer):
      path_rng, rng = jax.random.split(rng)
      continuous = jax.random.uniform(path_rng) >= skip_continuous_prob(train_config)
      loss, metrics, quantized = hybrid_vq_loss(model.vae, batch["image"], train_config, continuous)
    else:
      loss, metrics, quantized = vq_loss(model.vae, batch["image"], train_config)
    metrics[HITS] = code_hits(quantized.indices, vocab_size)
    metrics[CANDIDATES] = restart_candidates(quantized.residuals, vocab_size, rng)
    return loss, metrics

  return loss_fn


def vq_trainable(config: ml_collections.ConfigDict, seed: int = 0) -> VQTrainable:
  """What the stage trains: the VQVAE of `config.vae`, initialised from `seed`, and its codebook statistics."""
  return build_tokenizer_trainable(config, seed)


def vq_optimizer(train_config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (0.9, 0.999), no weight decay, clipped at global norm 1: warmup, then cosine to a tenth."""
  schedule = warmup_cosine(train_config.learning_rate, train_config.warmup_steps, train_config.num_train_steps,
                           train_config.learning_rate * 0.1)
  return adamw(schedule, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=1.0), schedule


def train_vq(config: ml_collections.ConfigDict, workdir: str,
             model_factory: Callable[[], VQTrainable] | None = None):
  """Trains the VQ tokenizer in the stage directory `workdir` (resuming if a checkpoint is there), e.g.
  `train_vq(config, runs.workdir.vae_dir(config, run_workdir))`. -> (graphdef, final TrainState).

  `model_factory` builds what is trained (default: `vq_trainable(config, config.seed)`, the registry's), e.g.
  a `VQTrainable(HybridTokenizer(**vqvae_kwargs(config.vae), rngs=...))` to train HART's tokenizer on
  `config.vae`'s layout."""
  if model_factory is None:
    model_factory = functools.partial(vq_trainable, config, config.seed)
  vqvae = nnx.eval_shape(model_factory).vae
  check_vq_config(config, vqvae)
  train_config = config.vae.train
  iterator = data.make_train_iterator(config.data, train_config.batch_size, config.seed,
                                      shard_index=jax.process_index(), shard_count=jax.process_count())
  tx, schedule = vq_optimizer(train_config)
  return loop.train(
      workdir=workdir, model_factory=model_factory,
      loss_fn=vq_stage_loss(train_config, vqvae.vocab_size), tx=tx, schedule=schedule,
      ema_decay=VQ_EMA_DECAY, data_iterator=iterator, num_steps=train_config.num_train_steps, config=config,
      seed=config.seed, checkpoint_every=config.checkpoint_every_steps, keep=config.keep_checkpoints,
      log_every=config.log_every_steps, desc="vq", batch_size=train_config.batch_size,
      tokens_per_image=sum(p * p for p in vqvae.patch_nums),
      max_consecutive_nonfinite=config.max_consecutive_nonfinite_steps,
      post_update=codebook_update(train_config))
