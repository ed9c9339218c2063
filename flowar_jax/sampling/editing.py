"""Zero-shot editing (inpainting, outpainting, class editing) with a trained FlowAR, no retraining.

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
from flax import nnx

from flowar_jax import precision
from flowar_jax.models.flowar import FlowAR
from flowar_jax.models.vae import AutoencoderKL, decode_from_latents, encode_to_latents
from flowar_jax.parallel.batch import replicated_batch, round_up_to_data_parallel, to_host
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.heads.flow_sampling import integrate
from flowar_jax.sampling.sampler import SamplingSettings, sample_keys, to_uint8
from flowar_jax.models.time_grid import time_grid
from flowar_jax.scales import ScaleSchedule, next_scale_input, scale_targets
from flowar_jax.scales.resize import apply_axis_matrices, area_matrix

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
                 settings: SamplingSettings, known: str = "path") -> jax.Array:
  """The image latents `[B, S, S, C]` (model units) with the masked tokens regenerated -> `[B, S, S, C]`.

  masks: `token_masks` (True = generate); labels `[B]` (`num_classes` = no class: unconditional); keys `[B]`
  as `sample_keys` (a token draws the same starting noise as in plain sampling with that key).
  """
  if known not in KNOWN_RULES:
    raise ValueError(f"known must be one of {KNOWN_RULES}, got {known!r}")
  with precision.compute_dtype(settings.compute_dtype):
    return _edit_latents(model, latents, masks, labels, keys, settings, known)


def _edit_latents(model, latents, masks, labels, keys, settings, known):
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
    x = integrate(velocity, x0, head.conditioning(z[:b]), z_uncond, cfg_k, grid, settings.guidance,
                  settings.solver)
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


def to_model_input(images: np.ndarray | jax.Array) -> jax.Array:
  """uint8 `[B, H, W, 3]` -> float32 in [-1, 1], as the data pipeline feeds the VAE."""
  return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0


def blend(edited: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """uint8 `[B, H, W, 3]` edits with the original's pixels outside `mask` `[B, H, W]` (True = generated)."""
  return np.where(np.asarray(mask, bool)[..., None], edited, original).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class EditSettings:
  """mask_rule: which tokens a pixel mask generates ('hybrid' | 'any' | 'most'); known: how kept tokens enter
  the ODE ('path' | 'after_scale'); see the module docstring."""

  mask_rule: str = "hybrid"
  known: str = "path"

  def __post_init__(self):
    if self.mask_rule not in MASK_RULES:
      raise ValueError(f"mask_rule must be one of {MASK_RULES}, got {self.mask_rule!r}")
    if self.known not in KNOWN_RULES:
      raise ValueError(f"known must be one of {KNOWN_RULES}, got {self.known!r}")


class Editor:
  """Compiled editor: `editor(images, masks, labels, seed, first_index)` -> uint8 images `[B, H, W, 3]`.

  images uint8 `[B, H, W, 3]` at the model's resolution, masks bool `[B, H, W]` (True = generate), labels
  `[B]` in 0..num_classes (num_classes = no class). Encodes with the VAE's posterior mean, edits the latents,
  decodes. One program per batch size (the masks are inputs, not constants); sharded like `Sampler`: each
  batch is split over `plan`'s data-parallel devices and padded when it does not divide. Sample i draws
  its noise from (seed, first_index + i), as `Sampler` does.
  """

  def __init__(self, model: FlowAR, vae: AutoencoderKL, latent_scale: float, settings: SamplingSettings,
               edit: EditSettings = EditSettings(), plan: ShardingPlan | None = None):
    self.settings, self.edit = settings, edit
    self.num_classes = model.num_classes
    self.schedule = model.schedule
    self.latent_scale = float(latent_scale)
    self.plan = plan or ShardingPlan.single_device()
    self._graph, state = nnx.split((model, vae))
    self._state = self.plan.place(state)
    batch, scalar = self.plan.batch_sharding(), self.plan.replicated
    state_sh = jax.tree.map(lambda x: x.sharding, self._state)
    self._fn = self.plan.jit(self._run, in_shardings=(state_sh, batch, batch, batch, scalar, scalar),
                             out_shardings=batch)
    self._round_trip = self.plan.jit(self._reconstruct, in_shardings=(state_sh, batch), out_shardings=batch)

  def _reconstruct(self, state, images):
    _, vae = nnx.merge(self._graph, state)
    latents = encode_to_latents(vae, to_model_input(images), self.latent_scale, None)
    return to_uint8(decode_from_latents(vae, latents, self.latent_scale))

  def round_trip(self, images: np.ndarray) -> np.ndarray:
    """uint8 `[B, H, W, 3]` -> the VAE's encode (posterior mean) then decode, uint8: what an edit that changed
    no token would give, so the least any latent edit can move the kept pixels."""
    images = np.asarray(images, np.uint8)
    real = len(images)
    images = np.resize(images, (round_up_to_data_parallel(self.plan, real),) + images.shape[1:])
    return to_host(self._round_trip(self._state, replicated_batch(self.plan, images)))[:real]

  def _run(self, state, images, masks, labels, seed, first_index):
    model, vae = nnx.merge(self._graph, state)
    latents = encode_to_latents(vae, to_model_input(images), self.latent_scale, None)
    keys = sample_keys(seed, first_index, labels.shape[0])
    out = edit_latents(model, latents, token_masks(masks, self.schedule, self.edit.mask_rule), labels, keys,
                       self.settings, self.edit.known)
    return to_uint8(decode_from_latents(vae, out, self.latent_scale))

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
    out = self._fn(self._state, *args, np.int32(seed), np.int32(first_index))
    return to_host(out)[:real]
