"""A flow-matching variant of HART's residual head: the same adaLN MLP and condition, trained as this
framework's flow heads are, and sampled by their ODE integrator.

The network predicts the velocity v = eps - y (C outputs, no variance) of x_t = (1 - t) y + t eps for the
residual y / 0.6 (HART's `vae_scale`), t uniform in [0, 1), seen by the time embedding as 1000 t. Sampling
integrates from noise at t = 1 to 0 on a uniform grid of `num_steps` steps (so n steps are n Euler steps; FlowAR's
grid would give 2 for 3) with `heads.flow_sampling.integrate` (Euler or Heun) and multiplies by 0.6.
Guidance follows the flow heads: v = v_u + cfg (v_c - v_u) with cfg from `SamplingSettings.cfg_at` (HART's
diffusion head writes the same as (1 + g) eps_c - g eps_u, i.e. cfg = 1 + g).
This variant has no official counterpart, so no parity; it exists to compare with the diffusion head at equal
step counts (`config.model.residual.kind = 'flow'`: HART's sampler runs `num_steps` Euler steps, with the
diffusion head's guidance weight, i.e. flow cfg = 1 + residual_cfg).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowar_jax.heads.flow_sampling import SamplingSettings, integrate
from flowar_jax.heads.residual import VAE_SCALE, ResidualMLP, layer_norm
from flowar_jax.models.layers import RMSNorm


class FlowResidualHead(nnx.Module):
  """channels: Cvae; cond_dim: the transformer's width D; width / depth: the MLP's; norm: the condition's norm
  ('layer' or 'rms'), as `heads.residual.ResidualHead`; num_steps: the sampler's ODE steps; batch_mul: training
  repeats of each token with fresh times and noise (HART's diffusion head: 4)."""

  def __init__(self, channels: int, cond_dim: int, *, width: int = 1024, depth: int = 6, norm: str = "layer",
               norm_eps: float = 1e-6, num_steps: int = 8, batch_mul: int = 1, rngs: nnx.Rngs):
    if not (isinstance(num_steps, int) and num_steps >= 1):
      raise ValueError(f"num_steps must be a positive int (the flow head's ODE steps), got {num_steps!r}")
    if not (isinstance(batch_mul, int) and batch_mul >= 1):
      raise ValueError(f"batch_mul must be a positive int, got {batch_mul!r}")
    if norm == "layer":
      self.decoder_norm = layer_norm(cond_dim, eps=norm_eps, rngs=rngs)
    elif norm == "rms":
      self.decoder_norm = RMSNorm(cond_dim, eps=norm_eps)
    else:
      raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    self.net = ResidualMLP(channels, cond_dim, width, depth, out_channels=channels, rngs=rngs)
    self.channels, self.num_steps, self.batch_mul = channels, num_steps, batch_mul

  def condition(self, hidden: jax.Array, discrete: jax.Array) -> jax.Array:
    """Last hidden states `[B, L, D]` + word-embedded codes `[B, L, D]` -> z `[B, L, D]`."""
    return self.decoder_norm(hidden + discrete)

  def velocity(self, x: jax.Array, t: jax.Array, z: jax.Array) -> jax.Array:
    """x `[B, L, C]`, t `[B]` in [0, 1], z `[B, L, D]` -> v `[B, L, C]` (tokens are independent)."""
    b, length, c = x.shape
    steps = jnp.repeat(t.astype(jnp.float32) * 1000.0, length)
    return self.net(x.reshape(-1, c), steps, z.reshape(b * length, -1)).reshape(b, length, c)

  def matching_loss(self, z: jax.Array, target: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """Mean squared velocity error for targets `[B, L, C]` at times `t [B]` with noise `eps [B, L, C]`."""
    y = target / VAE_SCALE
    x_t = (1.0 - t)[:, None, None] * y + t[:, None, None] * eps
    return jnp.mean((self.velocity(x_t, t, z) - (eps - y)) ** 2)

  # The head seam (`flowar_jax.heads.base.Head`).

  def loss(self, cond: jax.Array, target: jax.Array, rng: jax.Array) -> jax.Array:
    """z `[B, L, D]`, residual targets `[B, L, C]` -> scalar flow-matching loss (t uniform, Gaussian noise), over
    `batch_mul` repeats of the batch."""
    if self.batch_mul > 1:
      cond = jnp.tile(cond, (self.batch_mul, 1, 1))
      target = jnp.tile(target, (self.batch_mul, 1, 1))
    t_key, n_key = jax.random.split(rng)
    t = jax.random.uniform(t_key, (target.shape[0],), jnp.float32)
    return self.matching_loss(cond, target, t, jax.random.normal(n_key, target.shape, target.dtype))

  def draw(self, keys: jax.Array, scale: int, length: int) -> jax.Array:
    """Per-sample keys `[B]` -> starting noise `[B, length, C]` from fold_in(key, scale)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, scale), (length, self.channels)))(keys)

  def sample(self, cond: jax.Array, uncond: jax.Array | None, noise: jax.Array, settings: SamplingSettings,
             scale: int, num_scales: int) -> jax.Array:
    """z `[B, L, D]` (and the unconditional z, or None) and noise `[B, L, C]` -> residuals `[B, L, C]`."""
    cfg = settings.cfg_at(scale, num_scales)
    z_uncond = uncond if uncond is not None and cfg != 1.0 else None
    grid = np.linspace(1.0, 0.0, settings.num_steps + 1)
    x = integrate(self.velocity, noise, cond, z_uncond, cfg, grid, settings.guidance, settings.solver)
    return x * VAE_SCALE
