"""Zero-shot editing (inpainting, outpainting, class editing) with a trained FlowAR or VAR, no retraining.

The image's own tokens are kept wherever the mask is off, at every scale: its VAE latent (times the latent
scale) reduced to each scale by `scale_targets`, the very pyramid training predicts. The model generates
only the masked tokens, scale by scale, conditioned on everything before (the kept tokens included), and
the input of the next scale is built from the mixed scale by `next_scale_input`, as in plain sampling.

Inside the flow head's ODE, the kept tokens follow the noised path of the real tokens,
x_t = (1 - t) y + t eps (eps: the same starting noise the generated tokens draw), so the head, which attends
over all tokens of a scale, sees at every step the neighbours it was trained with: a real token noised to
the current time. They move with that path's own velocity eps - y (the flow-matching target), which keeps
them on the path up to float rounding; at the end of each scale they are set to y exactly.
`known="after_scale"` is the weaker alternative measured in docs/editing.md: the ODE runs freely over all
tokens and only its result at the kept positions is replaced by y.

The decoder mixes every latent token into every pixel, so a decode with new tokens moves the kept pixels
too (by 1.9-2.7 times a VAE round trip on the digits' half masks); by default (`EditSettings.feather`) the decode
fades into the original over the 2 kept pixels next to the mask, and is the original beyond them.
`fit_generated_tokens` (fitting the generated tokens to the kept pixels through the decoder) is the
decode-side alternative measured in docs/editing.md: it keeps the pixels but undoes class edits.

VAR goes through the same seams: the tokenizer's `encode` gives the image's code indices at every scale, the
model's sampler (`VAR.sample(..., known=KnownTokens)`) draws every token with its categorical head and then
puts the image's own codes back outside the mask, so they feed f_hat and every later scale as sampled codes
would; the tokenizer's `decode` turns the final f_hat into the image. A code is drawn in one step, so VAR has
no within-scale process for the kept tokens to follow: `known`, `fit_steps` and `resample` are FlowAR's only.

`EditSettings(resample=R)` adds R RePaint-style rounds to each scale's ODE (the generated tokens noised back
to t = `resample_from` and denoised again next to the kept ones); measured in docs/editing.md, off by default.

Masks: True = generate. With `mask_rule="hybrid"` (the default) a token of the finest scale is generated when
its footprint in the image holds any masked pixel, so every masked pixel is regenerated, and a token of a
coarser scale when more than half of its footprint is masked, so the coarse tokens that are mostly the
image's stay the image's. `"any"` and `"most"` apply one of the two at every scale.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flowar_jax import precision
from flowar_jax.models.flowar import FlowAR
from flowar_jax.models.var import VAR, KnownTokens
from flowar_jax.models.vae import AutoencoderKL, decode_from_latents, encode_to_latents
from flowar_jax.parallel.batch import replicated_batch, round_up_to_data_parallel, to_host
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.heads.flow_sampling import integrate
from flowar_jax.sampling.sampler import SamplingSettings, sample_keys, to_uint8
from flowar_jax.models.time_grid import time_grid
from flowar_jax.scales import ScaleSchedule, next_scale_input, scale_targets
from flowar_jax.scales.resize import apply_axis_matrices, area_matrix
from flowar_jax.tokenizers.msvq import MultiScaleVQVAE

MASK_RULES = ("hybrid", "any", "most")
KNOWN_RULES = ("path", "after_scale")


def reduce_mask(mask: jax.Array | np.ndarray, side: int, rule: str = "any") -> jax.Array:
  """Pixel mask `[B, H, W]` (True = generate) -> token mask `[B, side, side]` bool.

  The share of masked pixels under each token is the mask area-resized to `side` (the resize the pyramid
  uses); 'any' generates a token with a share > 0, 'most' one with a share > 1/2.
  """
  if rule not in ("any", "most"):
    raise ValueError(f"a scale's mask rule must be 'any' or 'most', got {rule!r}")
  mask = jnp.asarray(mask, jnp.float32)
  share = apply_axis_matrices(mask[..., None], area_matrix(mask.shape[1], side),
                              area_matrix(mask.shape[2], side))[..., 0]
  # Area weights are 1/n sums: a share that is exactly zero stays zero; 1e-6 absorbs rounding near 1/2.
  return share > 0 if rule == "any" else share > 0.5 + 1e-6


def token_masks(mask: jax.Array | np.ndarray, schedule: ScaleSchedule, rule: str = "hybrid") -> list[jax.Array]:
  """Pixel mask `[B, H, W]` -> per scale k, bool `[B, side_k, side_k]` (True = generated), by `rule` (see the
  module docstring)."""
  if rule not in MASK_RULES:
    raise ValueError(f"mask_rule must be one of {MASK_RULES}, got {rule!r}")
  last = len(schedule.sides) - 1
  rules = [("most" if k < last else "any") if rule == "hybrid" else rule for k in range(last + 1)]
  return [reduce_mask(mask, side, r) for side, r in zip(schedule.sides, rules)]


def _follow_path(velocity, keep: jax.Array, y: jax.Array, eps: jax.Array):
  """The head's velocity with the kept tokens' replaced by the real path's, eps - y (`keep` `[B, N, 1]`)."""
  target = eps - y

  def head(x, t, z):
    v = velocity(x, t, z)
    reps = x.shape[0] // keep.shape[0]  # guided steps evaluate the conditional and unconditional branch at once
    return jnp.where(jnp.tile(keep, (reps, 1, 1)), jnp.tile(target, (reps, 1, 1)).astype(v.dtype), v)

  return head


def edit_latents(model: FlowAR, latents: jax.Array, masks: list[jax.Array], labels: jax.Array, keys: jax.Array,
                 settings: SamplingSettings, known: str = "path", resample: int = 0, resample_from: float = 0.5
                 ) -> jax.Array:
  """The image latents `[B, S, S, C]` (model units) with the masked tokens regenerated -> `[B, S, S, C]`.

  masks: `token_masks` (True = generate); labels `[B]` (`num_classes` = no class: unconditional); keys `[B]`
  as `sample_keys` (a token draws the same starting noise as in plain sampling with that key).
  resample: after each scale's ODE, this many times the generated tokens are noised back to the last grid
  time <= `resample_from` along x_t = (1 - t) x + t eps' (fresh eps'), the kept ones put back on their path,
  and the ODE is run again from there (RePaint's resampling, for the flow's straight paths).
  """
  if known not in KNOWN_RULES:
    raise ValueError(f"known must be one of {KNOWN_RULES}, got {known!r}")
  with precision.compute_dtype(settings.compute_dtype):
    return _edit_latents(model, latents, masks, labels, keys, settings, known, resample, resample_from)


def _edit_latents(model, latents, masks, labels, keys, settings, known, resample, resample_from):
  # The scale loop of `sampler._sample_latents` (same noise, CFG ramp and next-scale inputs) plus the kept
  # tokens; kept apart so that the published sampling program stays exactly as it is.
  schedule = model.schedule
  b, c = labels.shape[0], model.latent_channels
  targets = scale_targets(latents.astype(jnp.float32), schedule)
  use_cfg = settings.cfg != 1.0
  class_emb = model.class_embedding(labels)
  if use_cfg:
    class_emb = jnp.concatenate([class_emb, model.class_embedding(jnp.full_like(labels, model.num_classes))])
  grid = time_grid(settings.num_steps)
  tokens = class_emb[:, None]
  caches = None
  x = None
  for k in range(schedule.num_scales):
    z, caches = model.backbone.cached_step(k, tokens, class_emb, caches)
    n = schedule.lengths[k]
    x0 = jax.vmap(lambda key, k=k, n=n: jax.random.normal(jax.random.fold_in(key, k), (n, c)))(keys)
    y = targets[k].reshape(b, n, c)
    keep = ~masks[k].reshape(b, n, 1)
    cfg_k = settings.cfg_at(k, schedule.num_scales)
    head = model.flownet
    velocity = head.velocity if known == "after_scale" else _follow_path(head.velocity, keep, y, x0)
    z_uncond = head.conditioning(z[b:]) if use_cfg and cfg_k != 1.0 else None
    z_cond = head.conditioning(z[:b])
    x = integrate(velocity, x0, z_cond, z_uncond, cfg_k, grid, settings.guidance, settings.solver)
    if resample:
      tail = grid[grid <= resample_from + 1e-9]
      t = float(tail[0])
      first = x
      for r in range(resample):
        fresh = jax.vmap(lambda key, k=k, n=n, r=r: jax.random.normal(
            jax.random.fold_in(jax.random.fold_in(key, k), r + 1), (n, c)))(keys)
        start = jnp.where(keep, (1 - t) * y + t * x0, (1 - t) * x + t * fresh)
        x = integrate(velocity, start, z_cond, z_uncond, cfg_k, tail, settings.guidance, settings.solver)
      # Resampling fits the generated tokens to kept ones; a scale that keeps none stays as plain sampling.
      x = jnp.where(jnp.any(keep, axis=(1, 2), keepdims=True), x, first)
    x = jnp.where(keep, y, x)  # exactly the image's tokens at the end of every scale
    if k == schedule.num_scales - 1:
      break
    side = schedule.sides[k]
    nxt = next_scale_input(x.reshape(b, side, side, c), schedule, k)
    tokens = model.backbone.z_proj(nxt.reshape(b, -1, c))
    if use_cfg:
      tokens = jnp.concatenate([tokens, tokens])
  side = schedule.latent_side
  return x.reshape(b, side, side, c)


def edit_var(model: VAR, tokenizer: MultiScaleVQVAE, images: jax.Array, masks: list[jax.Array],
             labels: jax.Array, keys: jax.Array, settings) -> jax.Array:
  """VAR: images `[B, H, W, 3]` in [-1, 1] with the masked tokens regenerated -> f_hat `[B, h, h, Cvae]` (for
  the tokenizer's `decode`).

  masks: `token_masks` (True = generated), one `[B, pn, pn]` per scale; labels `[B]` (`num_classes` = no
  class); keys `[B]` as `sample_keys` (a token draws what it draws in plain sampling with that key);
  settings: a `CategoricalSampling`. The kept codes are the tokenizer's own indices of the image.
  """
  indices = tokenizer.encode(images)
  generate = [m.reshape(m.shape[0], -1) for m in masks]  # row-major, as the codes are
  with precision.compute_dtype(settings.compute_dtype):
    return model.sample(tokenizer, labels, keys, settings, known=KnownTokens(indices, generate))


def fit_generated_tokens(vae: AutoencoderKL, latents: jax.Array, generated: jax.Array, images: jax.Array,
                         keep_pixels: jax.Array, latent_scale: float, steps: int, learning_rate: float = 0.05
                         ) -> jax.Array:
  """Edited latents `[B, S, S, C]` (model units) with only the generated tokens (`generated` bool `[B, S, S]`)
  moved by `steps` Adam steps on the mean squared error between their decode and `images` `[B, H, W, 3]`
  (in [-1, 1]) over the kept pixels (`keep_pixels` bool `[B, H, W]`). The kept tokens stay exactly.

  The decoder mixes every latent token into every pixel (its convolutions reach across the mask's boundary;
  its attention and group norms span the image), so new tokens move kept pixels; this picks, near the
  model's tokens, generated tokens whose decode leaves the kept pixels as the image has them.
  """
  gen = generated[..., None]
  weight = keep_pixels.astype(jnp.float32)[..., None]
  total = jnp.maximum(jnp.sum(weight, axis=(1, 2, 3)), 1.0)
  fixed = latents

  def loss(z):
    decoded = vae.decode(jnp.where(gen, z, fixed) / latent_scale)
    # Per image, so that each image's step does not depend on the batch it is in.
    return jnp.sum(jnp.sum(weight * (decoded - images) ** 2, axis=(1, 2, 3)) / total)

  tx = optax.adam(learning_rate)

  def step(carry, _):
    z, opt_state = carry
    updates, opt_state = tx.update(jax.grad(loss)(z), opt_state)
    return (optax.apply_updates(z, updates), opt_state), None

  (z, _), _ = jax.lax.scan(step, (latents, tx.init(latents)), None, steps)
  return jnp.where(gen, z, fixed)


def to_model_input(images: np.ndarray | jax.Array) -> jax.Array:
  """uint8 `[B, H, W, 3]` -> float32 in [-1, 1], as the data pipeline feeds the VAE."""
  return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0


def edit_weight(mask: np.ndarray, feather: int) -> np.ndarray:
  """float `[B, H, W]`: 1 on the mask `[B, H, W]` (True = generated), 1 - d / (feather + 1) on a kept pixel d
  <= feather pixels from it (Chebyshev distance: a square step in every direction), 0 further out."""
  mask = np.asarray(mask, bool)
  weight, grown = mask.astype(np.float64), mask
  h, w = mask.shape[1:]
  for d in range(1, feather + 1):
    padded = np.pad(grown, ((0, 0), (1, 1), (1, 1)))
    grown = np.zeros_like(mask)
    for dy in range(3):
      for dx in range(3):
        grown |= padded[:, dy:dy + h, dx:dx + w]
    weight = np.where(grown & (weight == 0), 1.0 - d / (feather + 1), weight)
  return weight


def blend(edited: np.ndarray, original: np.ndarray, mask: np.ndarray, feather: int = 0) -> np.ndarray:
  """uint8 `[B, H, W, 3]` edits with the original's pixels outside `mask` `[B, H, W]` (True = generated);
  `feather` > 0 ramps from the edit to the original over that many kept pixels (`edit_weight`)."""
  if feather < 0:
    raise ValueError(f"feather must be >= 0 pixels, got {feather}")
  weight = edit_weight(mask, feather)[..., None]
  out = weight * np.asarray(edited, np.float64) + (1.0 - weight) * np.asarray(original, np.float64)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class EditSettings:
  """How an edit is made (see the module docstring and docs/editing.md for what each was measured against).

  mask_rule: which tokens a pixel mask generates ('hybrid' | 'any' | 'most'); known: how kept tokens enter
  the ODE ('path' | 'after_scale'); feather: the decoded edit fades into the original over this many kept
  pixels next to the mask (`blend`), 0 pastes the original back exactly, None keeps the decode as it is;
  fit_steps: Adam steps of `fit_generated_tokens` before decoding (0: none), at fit_learning_rate;
  resample, resample_from: RePaint-style resampling rounds inside each scale's ODE (`edit_latents`).
  """

  mask_rule: str = "hybrid"
  known: str = "path"
  feather: int | None = 2
  fit_steps: int = 0
  fit_learning_rate: float = 0.05
  resample: int = 0
  resample_from: float = 0.5

  def __post_init__(self):
    if self.mask_rule not in MASK_RULES:
      raise ValueError(f"mask_rule must be one of {MASK_RULES}, got {self.mask_rule!r}")
    if self.known not in KNOWN_RULES:
      raise ValueError(f"known must be one of {KNOWN_RULES}, got {self.known!r}")
    if self.feather is not None and (not isinstance(self.feather, int) or self.feather < 0):
      raise ValueError(f"feather must be None or an integer >= 0 (pixels), got {self.feather!r}")
    if not isinstance(self.fit_steps, int) or self.fit_steps < 0:
      raise ValueError(f"fit_steps must be an integer >= 0, got {self.fit_steps!r}")
    if not self.fit_learning_rate > 0:
      raise ValueError(f"fit_learning_rate must be > 0, got {self.fit_learning_rate}")
    if not isinstance(self.resample, int) or self.resample < 0:
      raise ValueError(f"resample must be an integer >= 0, got {self.resample!r}")
    if not 0 < self.resample_from <= 1:
      raise ValueError(f"resample_from must be in (0, 1], got {self.resample_from}")

  def check_family(self, family: str) -> None:
    """Refuses, for a VAR model (`family` 'var', as `config.model.name`), the settings that act on FlowAR's flow
    head: there is no ODE and no continuous latent to act on."""
    if family == "var" and (self.known != "path" or self.fit_steps or self.resample):
      raise ValueError("known='after_scale', fit_steps and resample are FlowAR's (its flow head's ODE, its "
                       "continuous latents); VAR draws each code in one step and keeps the image's codes after "
                       "the draw: leave them out for a VAR run (edit --resample 0)")


class Editor:
  """Compiled editor: `editor(images, masks, labels, seed, first_index)` -> uint8 images `[B, H, W, 3]`.

  model: a FlowAR (with its KL VAE as `tokenizer`, at `latent_scale`) or a VAR (with its multi-scale VQVAE;
  `latent_scale` unused). images uint8 `[B, H, W, 3]` at the model's resolution, masks bool `[B, H, W]`
  (True = generate), labels `[B]` in 0..num_classes (num_classes = no class). Encodes (FlowAR: the VAE's
  posterior mean; VAR: the image's codes), edits the tokens, decodes, then fades the decode into the
  original over `edit.feather` kept pixels next to the mask (on the host; `feather=None` returns the decode
  as it is). One program per batch size (the masks are inputs, not constants); sharded like `Sampler`:
  each batch is split over `plan`'s data-parallel devices and padded when it does not divide. Sample i
  draws its noise from (seed, first_index + i), as `Sampler` does.
  """

  def __init__(self, model: FlowAR | VAR, tokenizer: AutoencoderKL | MultiScaleVQVAE, latent_scale: float,
               settings, edit: EditSettings = EditSettings(), plan: ShardingPlan | None = None):
    if isinstance(model, VAR):
      edit.check_family("var")
    elif not isinstance(model, FlowAR):
      raise ValueError(f"editing supports FlowAR and VAR, got {type(model).__name__}")
    self.settings, self.edit = settings, edit
    self.num_classes = model.num_classes
    self.schedule = model.schedule
    self.latent_scale = float(latent_scale)
    self.plan = plan or ShardingPlan.single_device()
    self._graph, state = nnx.split((model, tokenizer))
    self._state = self.plan.place(state)
    batch, scalar = self.plan.batch_sharding(), self.plan.replicated
    state_sh = jax.tree.map(lambda x: x.sharding, self._state)
    self._fn = self.plan.jit(self._run, in_shardings=(state_sh, batch, batch, batch, scalar, scalar),
                             out_shardings=batch)
    self._round_trip = self.plan.jit(self._reconstruct, in_shardings=(state_sh, batch), out_shardings=batch)

  def _reconstruct(self, state, images):
    _, tokenizer = nnx.merge(self._graph, state)
    if isinstance(tokenizer, MultiScaleVQVAE):
      return to_uint8(tokenizer.reconstruct(to_model_input(images)))
    latents = encode_to_latents(tokenizer, to_model_input(images), self.latent_scale, None)
    return to_uint8(decode_from_latents(tokenizer, latents, self.latent_scale))

  def round_trip(self, images: np.ndarray) -> np.ndarray:
    """uint8 `[B, H, W, 3]` -> the tokenizer's encode (FlowAR: posterior mean; VAR: every scale's codes) then
    decode, uint8: what an edit that changed no token would give, so the least any edit can move the kept
    pixels."""
    images = np.asarray(images, np.uint8)
    real = len(images)
    images = np.resize(images, (round_up_to_data_parallel(self.plan, real),) + images.shape[1:])
    return to_host(self._round_trip(self._state, replicated_batch(self.plan, images)))[:real]

  def _run(self, state, images, masks, labels, seed, first_index):
    model, tokenizer = nnx.merge(self._graph, state)
    pixels = to_model_input(images)
    keys = sample_keys(seed, first_index, labels.shape[0])
    tokens = token_masks(masks, self.schedule, self.edit.mask_rule)
    if isinstance(model, VAR):
      return to_uint8(tokenizer.decode(edit_var(model, tokenizer, pixels, tokens, labels, keys, self.settings)))
    latents = encode_to_latents(tokenizer, pixels, self.latent_scale, None)
    out = edit_latents(model, latents, tokens, labels, keys, self.settings, self.edit.known, self.edit.resample,
                       self.edit.resample_from)
    if self.edit.fit_steps:
      out = fit_generated_tokens(tokenizer, out, tokens[-1], pixels, ~masks, self.latent_scale, self.edit.fit_steps,
                                 self.edit.fit_learning_rate)
    return to_uint8(decode_from_latents(tokenizer, out, self.latent_scale))

  def check_labels(self, labels: np.ndarray) -> np.ndarray:
    """Labels `[B]` in 0..num_classes-1, or num_classes for 'no class'; a clear error otherwise."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be a non-empty 1-D integer array, got shape {labels.shape} {labels.dtype}")
    bad = labels[(labels < 0) | (labels > self.num_classes)]
    if bad.size:
      raise ValueError(f"class label {int(bad[0])} is out of range: the model has {self.num_classes} classes "
                       f"(0..{self.num_classes - 1})")
    return labels.astype(np.int32)

  def __call__(self, images: np.ndarray, masks: np.ndarray, labels: np.ndarray, seed: int,
               first_index: int = 0) -> np.ndarray:
    labels = self.check_labels(labels)
    images, masks = np.asarray(images, np.uint8), np.asarray(masks, bool)
    if images.ndim != 4 or masks.shape != images.shape[:3] or len(labels) != len(images):
      raise ValueError(f"expected images [B, H, W, 3], masks [B, H, W] and labels [B], got {images.shape}, "
                       f"{masks.shape} and {labels.shape}")
    empty = np.flatnonzero(~masks.reshape(len(masks), -1).any(axis=1))
    if empty.size:
      raise ValueError(f"the mask of image {int(empty[0])} is empty: there is nothing to generate")
    real = len(labels)
    size = round_up_to_data_parallel(self.plan, real)
    pad = lambda x: np.resize(x, (size,) + x.shape[1:])
    args = replicated_batch(self.plan, (pad(images), pad(masks), pad(labels)))
    out = to_host(self._fn(self._state, *args, np.int32(seed), np.int32(first_index)))[:real]
    if self.edit.feather is None:
      return out
    return blend(out, images, masks, self.edit.feather)
