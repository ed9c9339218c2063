"""The flow-matching head: a small transformer over one scale's tokens that predicts the velocity
v = eps - y at time t from x_t and the backbone's z. One set of weights serves every scale. It implements
the head seam (`flowar_jax.heads.base.Head`): `loss` is flow matching, `sample` integrates the ODE from noise.

Variant 'v1' (FlowAR-S): per-token adaLN from SiLU(t_emb + c). Variant 'v2' (FlowAR-L/H): self-attention
modulated by t_emb only, cross-attention to the raw z, MLP modulated per token by SiLU(c + t_emb).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from flowar_jax import precision
from flowar_jax.heads.flow_sampling import SamplingSettings, integrate
from flowar_jax.models.attention import CrossAttention, SelfAttention
from flowar_jax.models.layers import TOKENS, GatedMLP, RMSNorm, linear, linear_chunks, mlp_hidden, modulate, rms_norm
from flowar_jax.models.rope import rope_tables
from flowar_jax.models.time_grid import time_grid
from flowar_jax.parallel.logical import constrain
from flowar_jax.parallel.blocks import run_blocks

TIME_FREQUENCY_DIM = 256


@functools.lru_cache(maxsize=None)
def _frequency_table(half: int, max_period: float) -> np.ndarray:
  """[half] float32 max_period ** (-i / half), each rounded once from float64.

  The sinusoid's argument is up to 1000 times a frequency, so half a unit in the last place of a frequency moves
  it by up to 3e-5; a correctly rounded table keeps it where the official float32 `exp` (accurate to about an
  ulp) puts it, closer than a second float32 `exp` does. The exponents are the official float32 ones.
  """
  exponents = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
  return np.exp(exponents.astype(np.float64)).astype(np.float32)


def timestep_frequencies(t: jax.Array, dim: int = TIME_FREQUENCY_DIM, max_period: float = 10000.0) -> jax.Array:
  """t `[B]` in [0, 1] -> `[B, dim]` [cos | sin] of the integer timestep int(1000 t), as the official head."""
  steps = jnp.floor(t.astype(jnp.float32) * 1000.0)
  args = steps[:, None] * jnp.asarray(_frequency_table(dim // 2, max_period))[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
  def __init__(self, width: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.mlp = nnx.List([linear(TIME_FREQUENCY_DIM, width, rngs=rngs, kernel_init=init, axes=("time", "embed")),
                         linear(width, width, rngs=rngs, kernel_init=init, axes=("embed", "embed"))])

  def __call__(self, t: jax.Array) -> jax.Array:
    """t `[B]` -> `[B, W]`."""
    return self.mlp[1](jax.nn.silu(self.mlp[0](timestep_frequencies(t))))


class HeadBlockV1(nnx.Module):
  def __init__(self, width: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs):
    self.attn = SelfAttention(width, num_heads, qkv_bias=False, rngs=rngs)
    self.mlp = GatedMLP(width, mlp_hidden(width, mlp_ratio), rngs=rngs)
    self.ada_lin = linear(width, 6 * width, rngs=rngs, axes=("embed", "modulation"))

  def __call__(self, x, t_emb, c, z, cos, sin):
    """x, c `[B, N, W]`, t_emb `[B, 1, W]`, z unused -> `[B, N, W]`."""
    g1, g2, s1, s2, b1, b2 = linear_chunks(self.ada_lin, jax.nn.silu(t_emb + c), 6)
    x = x + self.attn(modulate(rms_norm(x), b1, s1), cos, sin) * g1
    return x + self.mlp(modulate(rms_norm(x), b2, s2)) * g2


class HeadBlockV2(nnx.Module):
  def __init__(self, width: int, cond_dim: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs):
    self.attn = SelfAttention(width, num_heads, qkv_bias=False, rngs=rngs)
    self.crossattn = CrossAttention(width, cond_dim, num_heads, rngs=rngs)
    self.norm2_1 = RMSNorm(width)
    self.norm2_2 = RMSNorm(cond_dim)
    self.mlp = GatedMLP(width, mlp_hidden(width, mlp_ratio), rngs=rngs)
    self.ada_lin_attn = linear(width, 3 * width, rngs=rngs, axes=("embed", "modulation"))
    self.ada_lin_mlp = linear(width, 3 * width, rngs=rngs, axes=("embed", "modulation"))

  def __call__(self, x, t_emb, c, z, cos, sin):
    """x, c `[B, N, W]`, t_emb `[B, 1, W]`, z `[B, N, D]` -> `[B, N, W]`."""
    g1, s1, b1 = linear_chunks(self.ada_lin_attn, jax.nn.silu(t_emb), 3)
    g2, s2, b2 = linear_chunks(self.ada_lin_mlp, jax.nn.silu(c + t_emb), 3)
    x = x + self.attn(modulate(rms_norm(x), b1, s1), cos, sin) * g1
    x = x + self.crossattn(self.norm2_1(x), self.norm2_2(z), cos, sin)
    return x + self.mlp(modulate(rms_norm(x), b2, s2)) * g2


class FinalLayer(nnx.Module):
  def __init__(self, width: int, out_channels: int, *, rngs: nnx.Rngs):
    self.linear = linear(width, out_channels, rngs=rngs, kernel_init=nnx.initializers.zeros_init(),
                         axes=("embed", "latent"))
    self.adaLN_modulation = linear(width, 2 * width, rngs=rngs, axes=("embed", "modulation"))  # pylint: disable=invalid-name

  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    shift, scale = linear_chunks(self.adaLN_modulation, jax.nn.silu(cond), 2)
    return self.linear(modulate(rms_norm(x), shift, scale))


class FlowHead(nnx.Module):
  """Velocity field v(x_t, t | z) for the tokens of one scale."""

  def __init__(self, config: ml_collections.ConfigDict, cond_dim: int, latent_channels: int, rope_grid: int,
               *, rngs: nnx.Rngs, remat_policy: str = "none", scan_blocks: bool = False):
    """`config` is `config.model.head`; `cond_dim` the backbone width; `rope_grid` the latent side;
    `remat_policy` (`flowar_jax.parallel.remat`) and `scan_blocks` say how the blocks run
    (`flowar_jax.parallel.blocks.run_blocks`)."""
    width = config.width
    if width % config.head_dim:
      raise ValueError(f"model.head.width {width} is not divisible by model.head.head_dim {config.head_dim}")
    num_heads = width // config.head_dim
    self.rope_grid = rope_grid
    self.head_dim = config.head_dim
    self.remat_policy = remat_policy
    self.scan_blocks = scan_blocks
    self.time_embed = TimestepEmbedder(width, rngs=rngs)
    self.cond_embed = linear(cond_dim, width, rngs=rngs, axes=("embed", "embed"))
    self.input_proj = linear(latent_channels, width, rngs=rngs, axes=("latent", "embed"))
    if config.variant == "v1":
      blocks = [HeadBlockV1(width, num_heads, config.mlp_ratio, rngs=rngs) for _ in range(config.depth)]
    elif config.variant == "v2":
      blocks = [HeadBlockV2(width, cond_dim, num_heads, config.mlp_ratio, rngs=rngs) for _ in range(config.depth)]
    else:
      raise ValueError(f"model.head.variant must be 'v1' or 'v2', got {config.variant!r}")
    self.res_blocks = nnx.List(blocks)
    self.final_layer = FinalLayer(width, latent_channels, rngs=rngs)

  def __call__(self, x_t: jax.Array, t: jax.Array, z: jax.Array) -> jax.Array:
    """x_t `[B, s*s, C]`, t `[B]`, z `[B, s*s, D]` -> velocity `[B, s*s, C]` (tokens of one s x s scale)."""
    return self.velocity(x_t, t, self.conditioning(z))

  def conditioning(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """z `[B, N, D]` -> (z, its embedding `[B, N, W]`): the part of the head that does not depend on the
    time, computed once per scale by the sampler rather than at every ODE step."""
    return z, constrain(self.cond_embed(z), TOKENS)

  def velocity(self, x_t: jax.Array, t: jax.Array, conditioning: tuple[jax.Array, jax.Array], *,
               remat: bool = True) -> jax.Array:
    """`__call__` from `conditioning(z)`. `remat=False` runs the blocks without rematerialisation, for
    callers that never differentiate (the sampler): the same values and the same program whatever the policy."""
    z, c = conditioning
    side = math.isqrt(x_t.shape[1])
    if side * side != x_t.shape[1]:
      raise ValueError(f"the flow head takes the s*s tokens of one scale, got {x_t.shape[1]} tokens")
    cos, sin = rope_tables(side, self.rope_grid, self.head_dim)
    x = constrain(self.input_proj(x_t), TOKENS)
    t_emb = self.time_embed(t)[:, None]
    x = run_blocks(self.res_blocks, x, t_emb, c, z, cos, sin, remat_policy=self.remat_policy if remat else "none",
                   scan=self.scan_blocks, names=TOKENS)
    return self.final_layer(x, c + t_emb)

  def matching_loss(self, z: jax.Array, target: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """Flow matching of one scale for given times and noise: z `[B, l, D]`, target `[B, s, s, C]`, t `[B]`,
    eps `[B, l, C]` -> the mean squared error of the velocity (x_t = (1 - t) y + t eps, target eps - y)."""
    y = target.reshape(target.shape[0], -1, target.shape[-1])
    x_t = (1 - t[:, None, None]) * y + t[:, None, None] * eps
    pred = self(x_t, t, z)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - (eps - y).astype(jnp.float32)))

  def loss(self, cond: jax.Array, target: jax.Array, rng: jax.Array) -> jax.Array:
    """The seam's loss: times uniform in [0, 1) and Gaussian noise from `rng`, then `matching_loss`."""
    r_t, r_eps = jax.random.split(rng)
    b, l, c = target.shape[0], target.shape[1] * target.shape[2], target.shape[3]
    t = jax.random.uniform(r_t, (b,), jnp.float32)
    eps = jax.random.normal(r_eps, (b, l, c), target.dtype)
    return self.matching_loss(cond, target, t, eps)

  def draw(self, keys: jax.Array, scale: int, length: int) -> jax.Array:
    """Keys `[B]` -> starting noise `[B, length, C]`, from fold_in(key, scale) of each sample."""
    channels = self.final_layer.linear.kernel.shape[-1]
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, scale), (length, channels)))(keys)

  def sample(self, cond: jax.Array, uncond: jax.Array | None, noise: jax.Array, settings: SamplingSettings,
             scale: int, num_scales: int) -> jax.Array:
    """z `[B, l, D]` (and the unconditional z, or None) and noise `[B, l, C]` -> the scale's tokens
    `[B, l, C]`: the ODE from t = 1 to 0 on the official grid, CFG at `settings.cfg_at(scale, num_scales)`."""
    cfg = settings.cfg_at(scale, num_scales)
    z_uncond = self.conditioning(uncond) if uncond is not None and cfg != 1.0 else None
    velocity = functools.partial(self.velocity, remat=False)  # nothing here is differentiated
    with precision.compute_dtype(settings.compute_dtype):
      return integrate(velocity, noise, self.conditioning(cond), z_uncond, cfg, time_grid(settings.steps_at(scale, num_scales)),
                       settings.guidance, settings.solver)
