"""HART's residual head: a small adaLN MLP denoiser that generates, token by token, the continuous residual
the last scale's codes miss (MAR's DiffLoss, as HART uses it), behind the head seam.

Condition: z = decoder_norm(h + word_embed(embed(idx))) `[B, L, D]`, the transformer's last hidden states of
the last scale plus the input embedding of that scale's (sampled) codes; `condition` computes the norm, the
transformer supplies both terms. Network (`ResidualMLP`, official `SimpleMLPAdaLN`): x `[N, C]` -> input_proj,
y = time_embed(t) + cond_embed(z); `depth` residual blocks x + gate * fc2(silu(fc1(LN(x) * (1 + scale) +
shift))) with (shift, scale, gate) = adaLN_modulation(silu(y)); a final adaLN layer (LayerNorm without affine)
outputs `[N, 2 C]`: epsilon, then the variance interpolation value v in [-1, 1].

Diffusion (`heads.diffusion_schedule`): targets are divided by 0.6 (`vae_scale`); training draws t from 1000
cosine steps, loss = MSE(eps) + the variational bound of the learned variance (mean frozen), in bits; the
official trainer repeats each token `batch_mul` = 4 times with fresh t and noise. Sampling runs `num_steps`
("8") respaced steps from x_T ~ N(0, I): x0 = clip((x - sqrt(1 - a) eps) / sqrt(a), -1, 1), the posterior
mean from x0, log variance = (v + 1)/2 log beta + (1 - v)/2 log posterior variance, noise scaled by the
temperature and skipped at the final step; the result is multiplied by 0.6. Guidance (official
`forward_with_cfg`): eps = (1 + g) eps_cond - g eps_uncond, with both rows evaluated at the conditional x and
the variance taken from the conditional row; g = cfg * scale / (num_scales - 1), and g == 1 means no guidance
(the official sampler's test is `cfg != 1.0`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowar_jax.heads.diffusion_schedule import TRAIN_STEPS, Schedule, schedule
from flowar_jax.models.flow_head import TIME_FREQUENCY_DIM, _frequency_table  # pylint: disable=protected-access
from flowar_jax.models.layers import RMSNorm, linear, modulate
from flowar_jax.parallel.logical import with_axes

VAE_SCALE = 0.6


@functools.lru_cache(maxsize=None)
def schedule_for(sections: str | None) -> Schedule:
  """`diffusion_schedule.schedule(sections)`, computed once per step spec."""
  return schedule(sections)


@dataclasses.dataclass(frozen=True)
class ResidualSampling:
  """cfg: guidance scale at the last scale (HART's default 1.5); temperature: of the per-step noise."""
  cfg: float = 1.5
  temperature: float = 1.0


def step_frequencies(t: jax.Array) -> jax.Array:
  """Integer timesteps `[N]` -> `[N, 256]` [cos | sin] (GLIDE's embedding, max period 10000)."""
  args = t.astype(jnp.float32)[:, None] * jnp.asarray(_frequency_table(TIME_FREQUENCY_DIM // 2, 10000.0))[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def layer_norm(width: int, affine: bool = True, eps: float = 1e-6, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """torch's LayerNorm (its scale and bias named 'norm' for the sharding rules)."""
  return nnx.LayerNorm(width, epsilon=eps, use_scale=affine, use_bias=affine, rngs=rngs,
                       scale_init=with_axes(nnx.initializers.ones_init(), "norm"),
                       bias_init=with_axes(nnx.initializers.zeros_init(), "norm"))


class TimeEmbedder(nnx.Module):
  def __init__(self, width: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.linear_1 = linear(TIME_FREQUENCY_DIM, width, rngs=rngs, kernel_init=init, axes=("time", "embed"))
    self.linear_2 = linear(width, width, rngs=rngs, kernel_init=init, axes=("embed", "embed"))

  def __call__(self, t: jax.Array) -> jax.Array:
    """t `[N]` -> `[N, W]`."""
    return self.linear_2(jax.nn.silu(self.linear_1(step_frequencies(t))))


class ResBlock(nnx.Module):
  def __init__(self, width: int, *, rngs: nnx.Rngs):
    zeros = nnx.initializers.zeros_init()
    self.in_ln = layer_norm(width, True, rngs=rngs)
    self.fc1 = linear(width, width, rngs=rngs, axes=("embed", "mlp"))
    self.fc2 = linear(width, width, rngs=rngs, axes=("mlp", "embed"))
    self.adaLN_modulation = linear(width, 3 * width, rngs=rngs, kernel_init=zeros,  # pylint: disable=invalid-name
                                   axes=("embed", "modulation"))

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """x, y `[N, W]` -> `[N, W]`."""
    shift, scale, gate = jnp.split(self.adaLN_modulation(jax.nn.silu(y)), 3, axis=-1)
    h = self.fc2(jax.nn.silu(self.fc1(modulate(self.in_ln(x), shift, scale))))
    return x + gate * h


class FinalLayer(nnx.Module):
  def __init__(self, width: int, out_channels: int, *, rngs: nnx.Rngs):
    zeros = nnx.initializers.zeros_init()
    self.norm_final = layer_norm(width, False, rngs=rngs)
    self.linear = linear(width, out_channels, rngs=rngs, kernel_init=zeros, axes=("embed", "latent"))
    self.adaLN_modulation = linear(width, 2 * width, rngs=rngs, kernel_init=zeros,  # pylint: disable=invalid-name
                                   axes=("embed", "modulation"))

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(y)), 2, axis=-1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class ResidualMLP(nnx.Module):
  """(x `[N, C]`, t `[N]` (integer steps; fractional ones are embedded too), z `[N, D]`) -> `[N, out]`
  (default 2 C: epsilon, variance value)."""

  def __init__(self, channels: int, cond_dim: int, width: int, depth: int, *, out_channels: int | None = None,
               rngs: nnx.Rngs):
    self.time_embed = TimeEmbedder(width, rngs=rngs)
    self.cond_embed = linear(cond_dim, width, rngs=rngs, axes=("embed", "embed"))
    self.input_proj = linear(channels, width, rngs=rngs, axes=("latent", "embed"))
    self.res_blocks = nnx.List([ResBlock(width, rngs=rngs) for _ in range(depth)])
    self.final_layer = FinalLayer(width, out_channels or 2 * channels, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, z: jax.Array) -> jax.Array:
    x = self.input_proj(x)
    y = self.time_embed(t) + self.cond_embed(z)
    for block in self.res_blocks:
      x = block(x, y)
    return self.final_layer(x, y)


def _at(table: np.ndarray, t: jax.Array) -> jax.Array:
  """float64 table `[T]` at steps `t [N]` -> `[N, 1]` float32 (cast after the lookup, as the official code)."""
  return jnp.asarray(table.astype(np.float32))[t][:, None]


def _approx_std_normal_cdf(x: jax.Array) -> jax.Array:
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-probability (nats) of x under a Gaussian discretised to 255 bins on [-1, 1] (IDDPM's decoder term)."""
  centered, inv_std = x - means, jnp.exp(-log_scales)
  cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def posterior_mean(sched: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
  return _at(sched.posterior_mean_coef1, t) * x0 + _at(sched.posterior_mean_coef2, t) * x_t


def model_mean_log_variance(sched: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array, v: jax.Array,
                            clip: bool) -> tuple[jax.Array, jax.Array]:
  """p(x_{t-1} | x_t) from the network's (eps, v): -> (mean, log variance), `[N, C]` each."""
  frac = (v + 1) / 2
  log_variance = frac * _at(np.log(sched.betas), t) + (1 - frac) * _at(sched.posterior_log_variance_clipped, t)
  alphas_cumprod = sched.alphas_cumprod
  x0 = _at(np.sqrt(1.0 / alphas_cumprod), t) * x_t - _at(np.sqrt(1.0 / alphas_cumprod - 1), t) * eps
  if clip:
    x0 = jnp.clip(x0, -1.0, 1.0)
  return posterior_mean(sched, x0, x_t, t), log_variance


class ResidualHead(nnx.Module):
  """HART's residual head: `net` (official `diffloss.net`) and `decoder_norm` (the condition's norm).

  channels: the tokenizer's Cvae; cond_dim: the transformer's width D; width / depth: the MLP's (HART: 1024 /
  6); num_steps: sampling steps (HART: "8"); batch_mul: training repeats per token (HART: 4); norm: the
  transformer's norm kind, 'layer' (attn_type gpt2) or 'rms' (llama)."""

  def __init__(self, channels: int, cond_dim: int, *, width: int = 1024, depth: int = 6,
               num_steps: str | int = "8", batch_mul: int = 4, norm: str = "layer", norm_eps: float = 1e-6,
               rngs: nnx.Rngs):
    if norm == "layer":
      self.decoder_norm = layer_norm(cond_dim, eps=norm_eps, rngs=rngs)
    elif norm == "rms":
      self.decoder_norm = RMSNorm(cond_dim, eps=norm_eps)
    else:
      raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    self.net = ResidualMLP(channels, cond_dim, width, depth, rngs=rngs)
    self.channels, self.batch_mul = channels, batch_mul
    # The step spec, not its arrays: module attributes are graph metadata, compared as plain values.
    self.sample_steps = str(num_steps)
    schedule_for(self.sample_steps)  # a bad step count fails here, not at the first sample

  @property
  def train_schedule(self) -> Schedule:
    """All 1000 steps (training draws from them)."""
    return schedule_for(None)

  @property
  def sample_schedule(self) -> Schedule:
    """The respaced sampling steps."""
    return schedule_for(self.sample_steps)

  def condition(self, hidden: jax.Array, discrete: jax.Array) -> jax.Array:
    """Last hidden states `[B, L, D]` + word-embedded codes of the same positions `[B, L, D]` -> z `[B, L, D]`."""
    return self.decoder_norm(hidden + discrete)

  def loss_terms(self, z: jax.Array, target: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Per-token loss `[N]` at original steps `t [N]` with `noise [N, C]`: MSE(eps) + variational bound (bits),
    for target residuals `[N, C]` (unscaled) and conditions `z [N, D]`."""
    sched = self.train_schedule
    x0 = target / VAE_SCALE
    ac = sched.alphas_cumprod
    x_t = _at(np.sqrt(ac), t) * x0 + _at(np.sqrt(1.0 - ac), t) * noise
    eps, v = jnp.split(self.net(x_t, t, z), 2, axis=-1)
    mse = jnp.mean((noise - eps) ** 2, axis=-1)
    # The bound trains the variance only: the mean is computed from a stopped eps.
    mean, log_var = model_mean_log_variance(sched, x_t, t, jax.lax.stop_gradient(eps), v, clip=False)
    true_mean = posterior_mean(sched, x0, x_t, t)
    true_log_var = _at(sched.posterior_log_variance_clipped, t)
    kl = 0.5 * (-1.0 + log_var - true_log_var + jnp.exp(true_log_var - log_var)
                + (true_mean - mean) ** 2 * jnp.exp(-log_var))
    kl = jnp.mean(kl, axis=-1) / math.log(2.0)
    nll = -jnp.mean(_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var), axis=-1) / math.log(2.0)
    return mse + jnp.where(t == 0, nll, kl)

  # The head seam (`flowar_jax.heads.base.Head`).

  def loss(self, cond: jax.Array, target: jax.Array, rng: jax.Array) -> jax.Array:
    """z `[B, L, D]`, residual targets `[B, L, C]` -> scalar: the mean per-token loss over `batch_mul` repeats
    with fresh steps and noise."""
    z = jnp.tile(cond.reshape(-1, cond.shape[-1]), (self.batch_mul, 1))
    x = jnp.tile(target.reshape(-1, target.shape[-1]), (self.batch_mul, 1))
    t_key, n_key = jax.random.split(rng)
    t = jax.random.randint(t_key, (x.shape[0],), 0, TRAIN_STEPS)
    return jnp.mean(self.loss_terms(z, x, t, jax.random.normal(n_key, x.shape, x.dtype)))

  def draw(self, keys: jax.Array, scale: int, length: int) -> jax.Array:
    """Per-sample keys `[B]` -> standard normal `[B, S + 1, length, C]` from fold_in(key, scale): x_T, then
    the noise of each of the S sampling steps in the order they run."""
    shape = (self.sample_schedule.num_steps + 1, length, self.channels)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, scale), shape, jnp.float32))(keys)

  def sample(self, cond: jax.Array, uncond: jax.Array | None, noise: jax.Array, settings: ResidualSampling,
             scale: int, num_scales: int) -> jax.Array:
    """z `[B, L, D]` (and the unconditional rows' z, or None) -> residuals `[B, L, C]`."""
    b, length, d = cond.shape
    g = settings.cfg * scale / max(num_scales - 1, 1)
    guided = uncond is not None and g != 1.0
    sched = self.sample_schedule
    z = cond.reshape(-1, d)
    zu = uncond.reshape(-1, d) if guided else None
    x = noise[:, 0].reshape(-1, self.channels)
    for i in reversed(range(sched.num_steps)):
      t = jnp.full((x.shape[0],), i, jnp.int32)
      t_net = jnp.asarray(sched.timestep_map, jnp.int32)[t]
      eps, v = jnp.split(self.net(x, t_net, z), 2, axis=-1)
      if guided:
        eps_u = jnp.split(self.net(x, t_net, zu), 2, axis=-1)[0]
        eps = (1 + g) * eps - g * eps_u
      mean, log_var = model_mean_log_variance(sched, x, t, eps, v, clip=True)
      step_noise = noise[:, sched.num_steps - i].reshape(-1, self.channels)  # in the order steps run
      x = mean + (float(i != 0) * jnp.exp(0.5 * log_var)) * step_noise * settings.temperature
    return (x * VAE_SCALE).reshape(b, length, self.channels)

  def network(self, x: jax.Array, t: jax.Array, z: jax.Array) -> jax.Array:
    """The network alone: (x `[N, C]`, original steps `[N]`, z `[N, D]`) -> `[N, 2 C]`."""
    return self.net(x, t, z)

