"""Stage 1 for VAR: the multi-scale residual VQ tokenizer of `config.vae`, trained by the shared loop with
codebook usage tracking and dead-code restarts (`training.codebook`).

It keeps the VAE stage's layout (STAGE_DIR/{checkpoints,metrics.jsonl}, e.g. STAGE_DIR = WORKDIR/vae, where
`runs.workdir.find_vae_checkpoints` looks), resumes from its latest checkpoint, and logs `l1`, `l2`, `vq_mse`
(see `vq_loss`), `codebook_usage`, `codebook_perplexity`, `codebook_restarted(_total)` (see `codebook`).
"""
from __future__ import annotations

import functools

import jax
import ml_collections
import optax
from flax import nnx

from flowar_jax import data
from flowar_jax.models.registry import build_tokenizer_trainable, build_vae
from flowar_jax.tokenizers.vq_trainable import VQTrainable
from flowar_jax.training import loop
from flowar_jax.training.codebook import CANDIDATES, HITS, code_hits, codebook_update, restart_candidates
from flowar_jax.training.optimizer import adamw, warmup_cosine
from flowar_jax.training.vq_loss import vq_loss

VQ_EMA_DECAY = 0.999
TRAIN_KEYS = ("batch_size", "num_train_steps", "learning_rate", "warmup_steps", "l1_weight", "l2_weight",
              "commitment_weight", "usage_decay", "restart_every_steps", "dead_code_threshold")


def check_vq_config(config: ml_collections.ConfigDict) -> None:
  """`config.vae.train` has the VQ stage's keys with usable values, and the images fit the tokenizer."""
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
  vqvae = nnx.eval_shape(lambda: build_vae(config))
  side = vqvae.patch_nums[-1] * vqvae.downsample
  if config.data.image_size != side:
    problems.append(f"config.data.image_size {config.data.image_size} != last scale x tokenizer stride = {side}")
  if problems:
    raise ValueError("; ".join(problems))


def vq_stage_loss(train_config: ml_collections.ConfigDict, vocab_size: int):
  """loss_fn for the shared train step; its metrics also carry this batch's code hits and restart candidates
  (one random encoder residual per code) for `codebook.codebook_update`."""

  def loss_fn(model: VQTrainable, batch, rng, context, step):
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


def train_vq(config: ml_collections.ConfigDict, workdir: str):
  """Trains the VQ tokenizer in the stage directory `workdir` (resuming if a checkpoint is there), e.g.
  `train_vq(config, runs.workdir.vae_dir(config, run_workdir))`. -> (graphdef, final TrainState)."""
  check_vq_config(config)
  train_config = config.vae.train
  iterator = data.make_train_iterator(config.data, train_config.batch_size, config.seed,
                                      shard_index=jax.process_index(), shard_count=jax.process_count())
  tx, schedule = vq_optimizer(train_config)
  vqvae = nnx.eval_shape(lambda: build_vae(config))
  return loop.train(
      workdir=workdir, model_factory=functools.partial(vq_trainable, config, config.seed),
      loss_fn=vq_stage_loss(train_config, vqvae.vocab_size), tx=tx, schedule=schedule,
      ema_decay=VQ_EMA_DECAY, data_iterator=iterator, num_steps=train_config.num_train_steps, config=config,
      seed=config.seed, checkpoint_every=config.checkpoint_every_steps, keep=config.keep_checkpoints,
      log_every=config.log_every_steps, desc="vq", batch_size=train_config.batch_size,
      tokens_per_image=sum(p * p for p in vqvae.patch_nums),
      max_consecutive_nonfinite=config.max_consecutive_nonfinite_steps,
      post_update=codebook_update(train_config))
