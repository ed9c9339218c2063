"""FlowAR: the scale-wise backbone plus the per-scale flow-matching head, the training objective and the
KV-cached sampler. The head is reached through the head seam (`loss`, `draw`, `sample`) and the scales through
the tokenizer seam (`teacher_forcing`, `next_input`) of `flowar_jax.heads.base` and `flowar_jax.tokenizers.base`.

Conditioned on class labels `[B]` or, with `model.conditioning = 'text'`, on a frozen encoder's `TextEncoding`
(`flowar_jax.models.conditioning`); the text model's null condition is the empty prompt's encoding, passed as
`null` wherever the condition is dropped (training) or guided against (CFG)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from flowar_jax.heads.flow_sampling import SamplingSettings
from flowar_jax.models.backbone import Backbone
from flowar_jax.models.conditioning import Condition, TextConditioner, concat_conditions, drop_text, null_like
from flowar_jax.models.flow_head import FlowHead
from flowar_jax.scales import ScaleSchedule
from flowar_jax.text.base import TextEncoding
from flowar_jax.tokenizers.base import Tokenizer
from flowar_jax.tokenizers.kl_vae import ScalePyramid


class FlowAR(nnx.Module):
  """Backbone (`backbone`) and flow head (`flownet`) sized from `config.model`; a text model also has the
  prompt projections (`text_cond`)."""

  def __init__(self, config: ml_collections.ConfigDict, latent_channels: int, *, rngs: nnx.Rngs,
               text_widths: tuple[int, int] | None = None, text_drop_prob: float = 0.0):
    """`config` is `config.model`; `latent_channels` comes from the VAE. A text model
    (`config.conditioning == 'text'`) needs its encoder's `text_widths` (states D, pooled P) and drops the
    condition at `text_drop_prob` in training."""
    self.conditioning = config.get("conditioning", "class")
    if self.conditioning == "text":
      if text_widths is None:
        raise ValueError("a text-conditional FlowAR needs its encoder's text_widths (states, pooled)")
      self.text_cond = TextConditioner(*text_widths, config.width, rngs=rngs)
    self.backbone = Backbone(config, latent_channels, rngs=rngs)
    self.flownet = FlowHead(config.head, config.width, latent_channels, config.scales[-1], rngs=rngs,
                            remat_policy=config.get("remat", "none"), scan_blocks=config.get("scan_blocks", False))
    self.num_classes = config.num_classes
    self.label_drop_prob = config.label_drop_prob
    self.text_drop_prob = text_drop_prob
    self.latent_channels = latent_channels

  @property
  def schedule(self) -> ScaleSchedule:
    return self.backbone.schedule

  def class_embedding(self, labels: jax.Array) -> jax.Array:
    """labels `[B]` (num_classes = the null class) -> `[B, D]`."""
    return self.backbone.class_emb(labels)

  def condition(self, cond: jax.Array | TextEncoding) -> Condition:
    """Class labels `[B]` or a prompt encoding -> the backbone's `Condition`."""
    self._check_condition(cond)
    if self.conditioning == "text":
      return self.text_cond(cond)
    return Condition(self.class_embedding(cond))

  def _check_condition(self, cond) -> None:
    if self.conditioning == "text" and not isinstance(cond, TextEncoding):
      raise ValueError(f"a text-conditional FlowAR takes a TextEncoding, got {type(cond).__name__}")
    if self.conditioning != "text" and isinstance(cond, TextEncoding):
      raise ValueError("a class-conditional FlowAR takes class labels, not a prompt encoding")

  def null_condition(self, batch: int, null: TextEncoding | None = None) -> Condition:
    """The unconditional branch: the null class, or the empty prompt's encoding `null` (batch 1)."""
    if self.conditioning == "text":
      if null is None:
        raise ValueError("a text-conditional FlowAR's null condition is the empty prompt's encoding: pass null")
      return self.text_cond(null_like(null, batch))
    return Condition(self.class_embedding(jnp.full((batch,), self.num_classes, jnp.int32)))

  def pyramid(self) -> ScalePyramid:
    """The scale pyramid of this model's latents (the KL tokenizer's, without its VAE)."""
    return ScalePyramid(self.schedule)

  def teacher_forced_z(self, latents: jax.Array, labels: jax.Array | TextEncoding, rng: jax.Array | None = None,
                       tokenizer: Tokenizer | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """latents `[B, S, S, C]`, labels `[B]` (or a prompt encoding) -> z `[B, L, D]` and the per-scale targets
    `[B, s, s, C]`, through `tokenizer`'s teacher forcing (default: this model's scale pyramid)."""
    targets, inputs = (tokenizer or self.pyramid()).teacher_forcing(latents)
    return self.backbone(self.condition(labels), inputs, rng), targets

  def loss(self, latents: jax.Array, labels: jax.Array | TextEncoding, rng: jax.Array, *, train: bool = True,
           tokenizer: Tokenizer | None = None, null: TextEncoding | None = None
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss, summed over scales with weights side**2 / latent_side**2.

    latents `[B, S, S, C]` (the KL tokenizer's tokens: already times the VAE's latent scale), labels `[B]` or,
    for a text model, the prompts' encoding (then `null`, the empty prompt's, is what dropout puts in their
    place). Condition dropout and network dropout only act when `train`.
    """
    r_drop, r_net, r_flow = jax.random.split(rng, 3)
    self._check_condition(labels)
    if self.conditioning == "text":
      if train and self.text_drop_prob > 0:
        if null is None:
          raise ValueError("text condition dropout replaces prompts by the empty prompt's encoding: pass null")
        labels = drop_text(labels, null, self.text_drop_prob, r_drop)
    elif train and self.label_drop_prob > 0:
      dropped = jax.random.bernoulli(r_drop, self.label_drop_prob, labels.shape)
      labels = jnp.where(dropped, self.num_classes, labels)
    z, targets = self.teacher_forced_z(latents, labels, r_net if train else None, tokenizer)
    losses = [self.flownet.loss(z_k, y, jax.random.fold_in(r_flow, k))
              for k, (y, z_k) in enumerate(zip(targets, self.schedule.split(z)))]
    return self._weighted(losses)

  def flow_matching_loss(self, z: jax.Array, targets: list[jax.Array], times: list[jax.Array],
                         noises: list[jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss for given flow times and noise: z `[B, L, D]`, per scale k: targets `[B, s, s, C]`, times `[B]`,
    noises `[B, s*s, C]` (x_t = (1 - t) y + t noise, velocity target noise - y)."""
    return self._weighted([self.flownet.matching_loss(z_k, y, t, eps) for y, z_k, t, eps
                           in zip(targets, self.schedule.split(z), times, noises)])

  def _weighted(self, losses: list[jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-scale losses -> (their sum weighted by side**2 / latent_side**2, metrics with each)."""
    metrics = {}
    total = jnp.zeros((), jnp.float32)
    full = self.schedule.latent_side ** 2
    for side, loss_k in zip(self.schedule.sides, losses):
      metrics[f"loss_scale_{side}"] = loss_k
      total = total + loss_k * (side ** 2 / full)
    metrics["loss"] = total
    return total, metrics

  def sample(self, tokenizer: Tokenizer, labels: jax.Array | TextEncoding, keys: jax.Array,
             settings: SamplingSettings, noise: list[jax.Array] | None = None, null: TextEncoding | None = None):
    """The KV-cached scale-by-scale pass: labels `[B]` (or a prompt encoding), per-sample keys `[B]` -> the
    tokenizer's state after the last scale (for the KL tokenizer: latents `[B, S, S, C]`). `noise`, when given,
    replaces the drawn starting noise: one `[B, s*s, C]` array per scale. The conditional sample feeds both
    CFG branches; a text model's unconditional branch is the empty prompt's encoding `null` (batch 1)."""
    schedule = self.schedule
    b, c = keys.shape[0], self.latent_channels
    use_cfg = settings.cfg != 1.0
    cond = self.condition(labels)
    if use_cfg:
      cond = concat_conditions(cond, self.null_condition(b, null))
    tokens, caches, state = cond.vector[:, None], None, tokenizer.empty_state(b)
    for k in range(schedule.num_scales):
      z, caches = self.backbone.cached_step(k, tokens, cond, caches)
      x0 = self.flownet.draw(keys, k, schedule.lengths[k]) if noise is None else noise[k]
      x = self.flownet.sample(z[:b], z[b:] if use_cfg else None, x0, settings, k, schedule.num_scales)
      side = schedule.sides[k]
      state, nxt = tokenizer.next_input(k, state, x.reshape(b, side, side, c))
      if k == schedule.num_scales - 1:
        break
      tokens = self.backbone.z_proj(nxt.reshape(b, -1, c))
      if use_cfg:
        tokens = jnp.concatenate([tokens, tokens])
    return state
