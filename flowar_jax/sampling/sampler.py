"""Class- or text-conditional sampling: the KV-cached scale-by-scale pass, an ODE per scale, then the VAE decoder.

The whole pass is one compiled program per (batch size, settings); noise is drawn per sample from
fold_in(seed, sample index), so a sample does not depend on the batch it was drawn in.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from flowar_jax import precision
from flowar_jax.heads.flow_sampling import SamplingSettings
from flowar_jax.models.flowar import FlowAR
from flowar_jax.models.vae import AutoencoderKL, decode_from_latents
from flowar_jax.parallel.batch import replicated_batch, round_up_to_data_parallel, to_host
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.text.base import TextEncoding


def sample_keys(seed: int | jax.Array, first_index: int | jax.Array, batch: int) -> jax.Array:
  """[B] keys, one per sample index (seed and first_index may be traced)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(first_index + jnp.arange(batch))


def sample_latents(model: FlowAR, labels: jax.Array, keys: jax.Array, settings: SamplingSettings,
                   noise: list[jax.Array] | None = None) -> jax.Array:
  """labels `[B]`, keys `[B]` -> latents `[B, S, S, C]` (in the model's latent units).

  `noise`, when given, replaces the drawn starting noise: one `[B, s*s, C]` array per scale.
  """
  with precision.compute_dtype(settings.compute_dtype):
    return model.sample(model.pyramid(), labels, keys, settings, noise)


def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] float -> [0, 255] uint8."""
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class Sampler:
  """Compiled sampler: `sampler(labels, seed)` -> uint8 images `[B, H, W, 3]`; for a text-conditional FlowAR
  the labels are the prompts' `TextEncoding` and `null` is the empty prompt's (batch 1: CFG's unconditional
  branch, compiled into the program).

  Any generator with `sample(tokenizer, labels, keys, settings)` (FlowAR, VAR, HART). `tokenizer(decoder_module)`
  gives the tokenizer seam it samples through (default: FlowAR's scale pyramid, `model.pyramid()`).
  `decode(decoder_module, state)` maps the state after the last scale (FlowAR: latents `[B, S, S, C]`) to
  `[B, H, W, 3]` images in [-1, 1]; pass None to get that state instead of images. With a `plan`,
  parameters are sharded by its rules and each batch is split over its data-parallel devices (a batch
  that does not divide is padded); every process passes the same labels and gets every image back.
  The model and decoder may be abstract (`nnx.eval_shape`) for `lower` only.
  """

  def __init__(self, model: nnx.Module, settings, decode=None, decoder_module: nnx.Module | None = None,
               plan: ShardingPlan | None = None, tokenizer=None, null: TextEncoding | None = None):
    self.settings = settings
    self._tokenizer = tokenizer
    self.num_classes = model.num_classes
    self.text = getattr(model, "conditioning", "class") == "text"
    if self.text and null is None:
      raise ValueError("a text-conditional model samples with the empty prompt's encoding as its null: pass null")
    self._null = None if null is None else TextEncoding(*(np.asarray(x) for x in null))
    self.plan = plan or ShardingPlan.single_device()
    self._graph, state = nnx.split((model, decoder_module))
    self._state = self.plan.place(state)
    self._decode = decode
    batch, scalar = self.plan.batch_sharding(), self.plan.replicated
    self._fn = self.plan.jit(self._run, in_shardings=(jax.tree.map(lambda x: x.sharding, self._state), batch,
                                                      scalar, scalar), out_shardings=batch)

  def _run(self, state, labels, seed, first_index):
    model, decoder_module = nnx.merge(self._graph, state)
    keys = sample_keys(seed, first_index, jax.tree.leaves(labels)[0].shape[0])
    tokenizer = model.pyramid() if self._tokenizer is None else self._tokenizer(decoder_module)
    extra = {} if self._null is None else {"null": self._null}
    with precision.compute_dtype(self.settings.compute_dtype):
      state = model.sample(tokenizer, labels, keys, self.settings, **extra)
    if self._decode is None:
      return state
    return to_uint8(self._decode(decoder_module, state))

  def set_weights(self, model: FlowAR, decoder_module: nnx.Module | None = None) -> None:
    """Swaps in other weights of the same structure (e.g. each evaluation during training) without recompiling."""
    graph, state = nnx.split((model, decoder_module))
    if graph != self._graph:
      raise ValueError("set_weights needs a model (and decoder) of the structure this sampler was built for")
    self._state = self.plan.place(state)

  def check_labels(self, labels: np.ndarray) -> np.ndarray:
    if self.text:
      raise ValueError("this model is text-conditional: sample it from prompts (--prompt / --prompts_file), not "
                       "class labels")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be a non-empty 1-D integer array, got shape {labels.shape} {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= self.num_classes)]
    if bad.size:
      raise ValueError(f"class label {int(bad[0])} is out of range: the model has {self.num_classes} classes "
                       f"(0..{self.num_classes - 1})")
    return labels.astype(np.int32)

  def check_encoding(self, encoding: TextEncoding) -> TextEncoding:
    """Prompt encodings `[B, ...]` shaped like the null's (same encoder and context length)."""
    if not self.text:
      raise ValueError("this model is class-conditional: it samples from class labels, not prompts")
    encoding = TextEncoding(*(np.asarray(x) for x in encoding))
    for got, want, name in zip(encoding, self._null, TextEncoding._fields):
      if got.shape[1:] != want.shape[1:] or got.shape[0] != encoding.pooled.shape[0] or got.shape[0] < 1:
        raise ValueError(f"prompt encoding {name} has shape {got.shape}; this sampler takes [B, "
                         f"{', '.join(map(str, want.shape[1:]))}] (the encoder and text.max_length it was built with)")
    return encoding

  def __call__(self, labels: np.ndarray | TextEncoding, seed: int, first_index: int = 0) -> np.ndarray:
    if isinstance(labels, TextEncoding):
      labels = self.check_encoding(labels)
      real = labels.pooled.shape[0]
      rows = np.resize(np.arange(real), round_up_to_data_parallel(self.plan, real))
      labels = TextEncoding(*(x[rows] for x in labels))
      out = self._fn(self._state, replicated_batch(self.plan, labels), np.int32(seed), np.int32(first_index))
      return to_host(out)[:real]
    labels = self.check_labels(labels)
    real = labels.shape[0]
    labels = np.resize(labels, round_up_to_data_parallel(self.plan, real))
    out = self._fn(self._state, replicated_batch(self.plan, labels), np.int32(seed), np.int32(first_index))
    return to_host(out)[:real]

  def lower_args(self, batch_size: int) -> tuple:
    """The program's arguments for batches of `batch_size` labels (or prompt encodings): (state, labels, seed,
    first index)."""
    shape = lambda x: jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype, sharding=self.plan.batch_sharding())
    if self.text:
      labels = TextEncoding(*(shape(x) for x in self._null))
    else:
      labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=self.plan.batch_sharding())
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.plan.replicated)
    return self._state, labels, scalar, scalar

  def lower(self, batch_size: int) -> jax.stages.Lowered:
    """The sampling program for batches of `batch_size` labels, lowered (e.g. to compile for another topology)."""
    return self._fn.lower(*self.lower_args(batch_size))


def image_sampler(model: nnx.Module, tokenizer_module: nnx.Module, settings, latent_scale: float,
                  plan: ShardingPlan | None = None, null: TextEncoding | None = None) -> Sampler:
  """A compiled sampler from class labels (or, for a text FlowAR with the empty prompt's encoding `null`, prompt
  encodings) to uint8 images for a FlowAR (over its KL VAE at `latent_scale`), a VAR (over its VQVAE) or a HART
  (over its hybrid tokenizer, whose decoder takes the codes' sum plus the sampled residual); `latent_scale` is
  FlowAR's only. Sharded by `plan` (see `Sampler`)."""
  if isinstance(tokenizer_module, AutoencoderKL):
    decode = lambda vae_module, latents: decode_from_latents(vae_module, latents, latent_scale)
    return Sampler(model, settings, decode=decode, decoder_module=tokenizer_module, plan=plan, null=null)
  return Sampler(model, settings, decode=lambda vq, f_hat: vq.decode(f_hat), decoder_module=tokenizer_module,
                 plan=plan, tokenizer=lambda vq: vq)
