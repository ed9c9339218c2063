"""FlowAR: the scale-wise backbone plus the per-scale flow-matching head, and the training objective."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from flowar_jax.models.backbone import Backbone
from flowar_jax.models.flow_head import FlowHead
from flowar_jax.scales import ScaleSchedule, scale_targets, teacher_forcing_inputs


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

  def teacher_forced_z(self, latents: jax.Array, labels: jax.Array, rng: jax.Array | None = None
                       ) -> tuple[jax.Array, list[jax.Array]]:
    """latents `[B, S, S, C]`, labels `[B]` -> z `[B, L, D]` and the per-scale targets `[B, s, s, C]`."""
    targets = scale_targets(latents, self.schedule)
    z = self.backbone(self.class_embedding(labels), teacher_forcing_inputs(targets, self.schedule), rng)
    return z, targets

  def loss(self, latents: jax.Array, labels: jax.Array, rng: jax.Array, *, train: bool = True
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss, summed over scales with weights side**2 / latent_side**2.

    latents `[B, S, S, C]` (already times the VAE's latent scale), labels `[B]`. Label dropout and network
    dropout only act when `train`.
    """
    r_drop, r_net, r_flow = jax.random.split(rng, 3)
    if train and self.label_drop_prob > 0:
      dropped = jax.random.bernoulli(r_drop, self.label_drop_prob, labels.shape)
      labels = jnp.where(dropped, self.num_classes, labels)
    z, targets = self.teacher_forced_z(latents, labels, r_net if train else None)
    times, noises = [], []
    for k, y in enumerate(targets):
      r_t, r_eps = jax.random.split(jax.random.fold_in(r_flow, k))
      times.append(jax.random.uniform(r_t, (y.shape[0],), jnp.float32))
      noises.append(jax.random.normal(r_eps, (y.shape[0], y.shape[1] * y.shape[2], y.shape[3]), y.dtype))
    return self.flow_matching_loss(z, targets, times, noises)

  def flow_matching_loss(self, z: jax.Array, targets: list[jax.Array], times: list[jax.Array],
                         noises: list[jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss for given flow times and noise: z `[B, L, D]`, per scale k: targets `[B, s, s, C]`, times `[B]`,
    noises `[B, s*s, C]` (x_t = (1 - t) y + t noise, velocity target noise - y)."""
    metrics = {}
    total = jnp.zeros((), jnp.float32)
    full = self.schedule.latent_side ** 2
    for k, (y, z_k, t, eps) in enumerate(zip(targets, self.schedule.split(z), times, noises)):
      y = y.reshape(y.shape[0], -1, y.shape[-1])
      x_t = (1 - t[:, None, None]) * y + t[:, None, None] * eps
      pred = self.flownet(x_t, t, z_k)
      loss_k = jnp.mean(jnp.square(pred.astype(jnp.float32) - (eps - y).astype(jnp.float32)))
      metrics[f"loss_scale_{self.schedule.sides[k]}"] = loss_k
      total = total + loss_k * (self.schedule.sides[k] ** 2 / full)
    metrics["loss"] = total
    return total, metrics
