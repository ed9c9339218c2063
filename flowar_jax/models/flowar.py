"""FlowAR: the scale-wise backbone plus the per-scale flow-matching head, the training objective and the
KV-cached sampler. The head is reached through the head seam (`loss`, `draw`, `sample`) and the scales through
the tokenizer seam (`teacher_forcing`, `next_input`) of `flowar_jax.heads.base` and `flowar_jax.tokenizers.base`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from flowar_jax.heads.flow_sampling import SamplingSettings
from flowar_jax.models.backbone import Backbone
from flowar_jax.models.flow_head import FlowHead
from flowar_jax.scales import ScaleSchedule
from flowar_jax.tokenizers.base import Tokenizer
from flowar_jax.tokenizers.kl_vae import ScalePyramid


class FlowAR(nnx.Module):
  """Backbone (`backbone`) and flow head (`flownet`) sized entirely from `config.model`."""

  def __init__(self, config: ml_collections.ConfigDict, latent_channels: int, *, rngs: nnx.Rngs):
    """`config` is `config.model`; `latent_channels` comes from the VAE."""
    self.backbone = Backbone(config, latent_channels, rngs=rngs)
    self.flownet = FlowHead(config.head, config.width, latent_channels, config.scales[-1], rngs=rngs,
                            remat_policy=config.get("remat", "none"), scan_blocks=config.get("scan_blocks", False))
    self.num_classes = config.num_classes
    self.label_drop_prob = config.label_drop_prob
    self.latent_channels = latent_channels

  @property
  def schedule(self) -> ScaleSchedule:
    return self.backbone.schedule

  def class_embedding(self, labels: jax.Array) -> jax.Array:
    """labels `[B]` (num_classes = the null class) -> `[B, D]`."""
    return self.backbone.class_emb(labels)

  def pyramid(self) -> ScalePyramid:
    """The scale pyramid of this model's latents (the KL tokenizer's, without its VAE)."""
    return ScalePyramid(self.schedule)

  def teacher_forced_z(self, latents: jax.Array, labels: jax.Array, rng: jax.Array | None = None,
                       tokenizer: Tokenizer | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """latents `[B, S, S, C]`, labels `[B]` -> z `[B, L, D]` and the per-scale targets `[B, s, s, C]`, through
    `tokenizer`'s teacher forcing (default: this model's scale pyramid)."""
    targets, inputs = (tokenizer or self.pyramid()).teacher_forcing(latents)
    return self.backbone(self.class_embedding(labels), inputs, rng), targets

  def loss(self, latents: jax.Array, labels: jax.Array, rng: jax.Array, *, train: bool = True,
           tokenizer: Tokenizer | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss, summed over scales with weights side**2 / latent_side**2.

    latents `[B, S, S, C]` (the KL tokenizer's tokens: already times the VAE's latent scale), labels `[B]`.
    Label dropout and network dropout only act when `train`.
    """
    r_drop, r_net, r_flow = jax.random.split(rng, 3)
    if train and self.label_drop_prob > 0:
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

  def sample(self, tokenizer: Tokenizer, labels: jax.Array, keys: jax.Array, settings: SamplingSettings,
             noise: list[jax.Array] | None = None):
    """The KV-cached scale-by-scale pass: labels `[B]`, per-sample keys `[B]` -> the tokenizer's state after
    the last scale (for the KL tokenizer: latents `[B, S, S, C]`). `noise`, when given, replaces the drawn
    starting noise: one `[B, s*s, C]` array per scale. The conditional sample feeds both CFG branches."""
    schedule = self.schedule
    b, c = labels.shape[0], self.latent_channels
    use_cfg = settings.cfg != 1.0
    class_emb = self.class_embedding(labels)
    if use_cfg:
      class_emb = jnp.concatenate([class_emb, self.class_embedding(jnp.full_like(labels, self.num_classes))])
    tokens, caches, state = class_emb[:, None], None, tokenizer.empty_state(b)
    for k in range(schedule.num_scales):
      z, caches = self.backbone.cached_step(k, tokens, class_emb, caches)
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
