"""FlowAR's tokenizer: a KL VAE's latent (times the latent scale) and the scale pyramid built from it.

Scale k's target is the latent area-resized to side k; the input of scale k + 1 is scale k bicubic-upsampled
to the latent side and area-resized to side k + 1 (`flowar_jax.scales.pyramid`). Sampling keeps the last
sampled scale as its state: after the last scale it is the whole latent, which the VAE decodes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flowar_jax.models.vae import AutoencoderKL, decode_from_latents
from flowar_jax.scales import ScaleSchedule, next_scale_input, scale_targets, teacher_forcing_inputs


@dataclasses.dataclass(frozen=True)
class ScalePyramid:
  """The pyramid of a latent `[B, S, S, C]` over `schedule`, without the VAE (what FlowAR's loss needs)."""

  schedule: ScaleSchedule

  def teacher_forcing(self, latents: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """latents `[B, S, S, C]` -> (targets `[B, s, s, C]` per scale, inputs `[B, L - 1, C]`)."""
    targets = scale_targets(latents, self.schedule)
    return targets, teacher_forcing_inputs(targets, self.schedule)

  def empty_state(self, batch: int) -> None:
    return None

  def next_input(self, scale: int, state: jax.Array | None, sampled: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sampled `[B, s, s, C]` -> (it, the inputs of scale + 1 `[B, s', s', C]`; itself at the last scale)."""
    del state
    if scale == self.schedule.num_scales - 1:
      return sampled, sampled
    return sampled, next_scale_input(sampled, self.schedule, scale)


@dataclasses.dataclass(frozen=True)
class KLTokenizer(ScalePyramid):
  """The pyramid plus the VAE at `latent_scale`; `sample_posterior`: training tokens are a posterior sample."""

  vae: AutoencoderKL = None
  latent_scale: float = 1.0
  sample_posterior: bool = True

  def encode(self, images: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Images `[B, H, W, 3]` -> latents `[B, S, S, C]` times the latent scale (a posterior sample with `rng`)."""
    posterior = self.vae.encode(images)
    return self.latents_from_moments(posterior.mean, posterior.logvar, rng)

  def latents_from_moments(self, mean: jax.Array, logvar: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Posterior moments `[B, S, S, C]` each -> scaled latents, sampled when `sample_posterior` and `rng`."""
    latents = mean
    if self.sample_posterior and rng is not None:
      latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return latents * self.latent_scale

  def decode(self, state: jax.Array) -> jax.Array:
    """Scaled latents `[B, S, S, C]` -> images `[B, H, W, 3]` in [-1, 1]."""
    return decode_from_latents(self.vae, state, self.latent_scale)
