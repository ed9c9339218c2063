"""Stage 2: the generator (`config.model.name`) on the tokens of a trained, frozen tokenizer: FlowAR on a KL
VAE's latents (encoded on the fly or from the latent cache), VAR on a multi-scale VQVAE's code indices, HART
on its hybrid tokenizer's code indices and last-scale continuous token."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from flowar_jax import data
from flowar_jax import precision
from flowar_jax.config_text import is_text
from flowar_jax.models.params import split_params
from flowar_jax.models.registry import build_model, tokenizer_seam
from flowar_jax.models.vae import AutoencoderKL
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.runs.loaders import load_vae
from flowar_jax.runs.metrics import MetricWriter
from flowar_jax.runs.stored_config import stored_latent_scale
from flowar_jax.text.base import TextEncoding
from flowar_jax.training import latent_cache, loop
from flowar_jax.training.optimizer import flowar_optimizer
from flowar_jax.training.sample_grids import SampleGrids

_SCALE_EXAMPLES = 2048


def tokens_from_batch(config: ml_collections.ConfigDict, tokenizer_module: nnx.Module, batch: dict,
                      rng: jax.Array):
  """A batch of images `[B, H, W, 3]`, or of cached posterior moments `[B, h, w, 2C]` (FlowAR's latent cache)
  -> the generator's training tokens, with no gradient (the tokenizer is frozen)."""
  flowar = config.model.name == "flowar"
  tokenizer = tokenizer_seam(config, tokenizer_module, config.vae.latent_scale if flowar else 1.0)
  if "moments" in batch:
    mean, logvar = jnp.split(batch["moments"], 2, axis=-1)
    tokens = tokenizer.latents_from_moments(mean, logvar, rng)
  else:
    tokens = tokenizer.encode(batch["image"], rng)
  return jax.lax.stop_gradient(tokens), tokenizer


def resolve_latent_scale(config: ml_collections.ConfigDict, vae: AutoencoderKL, workdir: str
                         ) -> ml_collections.ConfigDict:
  """A copy of `config` whose `vae.latent_scale` is concrete: taken from WORKDIR's checkpoint when resuming,
  else 1 / std of the train set's posterior means (so FlowAR sees unit-variance latents, as 0.2325 gives
  for MAR's KL-16)."""
  stored = stored_latent_scale(workdir)
  if stored is not None:
    scale = stored
  else:
    if config.data.cache_latents:  # every latent, from the spreads stored with the shards
      cache = latent_cache.load_or_encode(vae, config, workdir)
      spread, count = cache.mean_spread(), len(cache)
    else:
      moments, _ = latent_cache.encode_train_split(vae, config, max_examples=_SCALE_EXAMPLES)
      spread, count = latent_cache.mean_spread(moments), len(moments)
    scale = 1.0 / spread.std
    if jax.process_index() == 0:
      print(f"measured vae.latent_scale = {scale:.6g} (1 / std of {count} train latents)", flush=True)
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.vae.latent_scale = scale
  resolved.lock()
  return resolved


def text_condition(batch: dict) -> TextEncoding:
  """A text batch's cached prompt encodings (`flowar_jax.data.text_batches`) as the model's condition."""
  return TextEncoding(batch["text_states"], batch["text_mask"], batch["text_pooled"])


def generator_loss_fn(tokenizer_graphdef: nnx.GraphDef, config: ml_collections.ConfigDict,
                      null: TextEncoding | None = None):
  """The loop's loss function: tokens from the frozen tokenizer (its params are the step's context), then the
  generator's own loss on them, its matrix products in `config.model.compute_dtype`. A text model reads the
  batch's prompt encodings; `null` (the empty prompt's, batch 1) replaces the dropped ones."""
  text = is_text(config)

  def loss_fn(model, batch, rng, tokenizer_params, step):  # pylint: disable=unused-argument
    r_tokens, r_model = jax.random.split(rng)
    tokenizer_module = nnx.merge(tokenizer_graphdef, tokenizer_params)
    tokens, tokenizer = tokens_from_batch(config, tokenizer_module, batch, r_tokens)
    with precision.compute_dtype(config.model.compute_dtype):
      if text:
        return model.loss(tokens, text_condition(batch), r_model, tokenizer=tokenizer, null=null)
      return model.loss(tokens, batch["label"], r_model, tokenizer=tokenizer)

  return loss_fn


def tokens_per_image(config: ml_collections.ConfigDict) -> int:
  sides = config.model.scales if config.model.name == "flowar" else config.vae.patch_nums
  return sum(side * side for side in sides)


def text_train_iterator(config: ml_collections.ConfigDict, vae: AutoencoderKL, workdir: str
                        ) -> tuple[object, TextEncoding]:
  """A text run's training batches and the empty prompt's encoding (the null condition), from the frozen encoder
  of `config.text`. Each batch carries its captions' cached encodings (WORKDIR/text_cache/) beside the images,
  or, with `data.cache_latents`, beside the cached latents (WORKDIR/latent_cache/), each record's caption found
  by its example index."""
  from flowar_jax.data import text_batches  # pylint: disable=g-import-not-at-top
  from flowar_jax.text.registry import build_text_encoder  # pylint: disable=g-import-not-at-top
  encoder = build_text_encoder(config.text)
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  source = data.build_source(config.data, "train")  # once: its captions serve both caches
  texts = text_batches.load_or_encode(config, encoder, workdir, "train", source=source, **shard)
  null = texts.null()
  if config.data.cache_latents:
    latents = latent_cache.load_or_encode(vae, config, workdir, source=source)
    iterator = latents.train_iterator(config.batch_size, config.seed,
                                      batch_map=text_batches.example_encodings(texts, source.captions), **shard)
  else:
    iterator = text_batches.make_text_train_iterator(config, texts, **shard)
  return iterator, TextEncoding(*(jnp.asarray(null[k]) for k in ("text_states", "text_mask", "text_pooled")))


def train_generator(config: ml_collections.ConfigDict, workdir: str) -> tuple[nnx.GraphDef, object]:
  """Trains the generator in WORKDIR (resuming if a checkpoint is there); returns (graphdef, state).

  FlowAR with `vae.latent_scale == 0`: the scale is measured first and stored in the checkpoint's config.
  """
  flowar = config.model.name == "flowar"
  plan = ShardingPlan.from_config(config)
  vae = load_vae(config, workdir, plan)
  vae_graphdef, vae_params = split_params(vae)
  if flowar and config.vae.latent_scale <= 0:
    config = resolve_latent_scale(config, vae, workdir)
  null = None
  if is_text(config):
    iterator, null = text_train_iterator(config, vae, workdir)
  elif config.data.cache_latents:
    iterator = latent_cache.make_latent_iterator(vae, config, workdir)
  else:
    iterator = data.make_train_iterator(config.data, config.batch_size, config.seed,
                                        shard_index=jax.process_index(), shard_count=jax.process_count())
  tx, schedule = flowar_optimizer(config.optimizer, config.batch_size, config.num_train_steps)
  model_factory = functools.partial(build_model, config, config.seed)
  graphdef, _ = split_params(nnx.eval_shape(model_factory))
  periodic = []
  if config.eval.every_steps > 0:
    from flowar_jax.training.periodic_evaluation import periodic_evaluation  # pylint: disable=g-import-not-at-top
    periodic.append(loop.Periodic(config.eval.every_steps, periodic_evaluation(config, workdir, graphdef, vae, plan)))
  logging.info("%s: %d steps at batch %d, peak lr %.2e", config.model.name, config.num_train_steps, config.batch_size,
               config.optimizer.base_lr * config.batch_size / 256)
  with MetricWriter(workdir) as writer:
    if config.sample_every_steps:
      periodic.append(loop.Periodic(config.sample_every_steps, SampleGrids(config, graphdef, vae, writer, plan)))
    return loop.train(
        workdir=workdir, model_factory=model_factory,
        loss_fn=generator_loss_fn(vae_graphdef, config, null), tx=tx, schedule=schedule,
        ema_decay=config.optimizer.ema_decay, data_iterator=iterator, num_steps=config.num_train_steps,
        config=config, seed=config.seed, checkpoint_every=config.checkpoint_every_steps,
        keep=config.keep_checkpoints, log_every=config.log_every_steps, context=vae_params,
        desc=config.model.name, batch_size=config.batch_size, tokens_per_image=tokens_per_image(config),
        periodic=periodic, writer=writer,
        max_consecutive_nonfinite=config.max_consecutive_nonfinite_steps, plan=plan)
