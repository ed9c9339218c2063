"""The flow head's sampling: its settings and the per-scale ODE integration with classifier-free guidance.

The time grid is static, so which steps are guided (t <= guidance) is known at trace time: the grid is cut
into runs of guided and unguided steps, each a `lax.scan`. Unguided steps evaluate the conditional branch
only; guided steps evaluate both branches in one batch of 2B, on the conditional state.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowar_jax import precision
from flowar_jax.models.time_grid import SOLVERS, time_grid

# (x [B,N,C], t [B], z) -> [B,N,C]; z is the condition: an array [B,N,D] or a pytree of them (e.g. the
# head's `conditioning`, computed once per scale).
Velocity = Callable[[jax.Array, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """cfg: guidance scale at the finest scale (ramped linearly from 1 at the coarsest; 1 disables CFG);
  guidance: CFG applies only where t <= guidance; num_steps: ODE steps per scale (official grid);
  compute_dtype: of the FlowAR's matrix products ('float32' | 'bfloat16', `flowar_jax.precision`;
  the ODE state stays float32); scale_steps: ODE steps at each scale, coarsest first, in place of num_steps
  (empty: num_steps at every scale). Coarse scales hold few tokens, so fewer steps there save little work;
  the finest holds most of it."""

  cfg: float = 1.0
  guidance: float = 1.0
  num_steps: int = 25
  solver: str = "euler"
  compute_dtype: str = "float32"
  scale_steps: tuple[int, ...] = ()

  def __post_init__(self):
    if not np.isfinite(self.cfg) or self.cfg < 0:
      raise ValueError(f"cfg must be a finite number >= 0, got {self.cfg}")
    if not 0.0 <= self.guidance <= 1.0:
      raise ValueError(f"guidance must lie in [0, 1] (the time below which CFG applies), got {self.guidance}")
    time_grid(self.num_steps)  # validates num_steps
    object.__setattr__(self, "scale_steps", tuple(self.scale_steps))  # a list from a config or a flag
    if not all(isinstance(n, (int, np.integer)) and n >= 1 for n in self.scale_steps):
      raise ValueError(f"scale_steps must be positive whole step counts, one per scale, got {self.scale_steps}")
    if self.solver not in SOLVERS:
      raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
    if self.compute_dtype not in precision.COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype must be one of {sorted(precision.COMPUTE_DTYPES)}, got {self.compute_dtype!r}")

  @classmethod
  def from_config(cls, sampling: ml_collections.ConfigDict, **overrides) -> "SamplingSettings":
    """The settings of a config's `sampling` section, with `overrides` that are not None."""
    values = dict(cfg=sampling.cfg, guidance=sampling.guidance, num_steps=sampling.num_steps,
                  solver=sampling.solver, compute_dtype=sampling.compute_dtype,
                  scale_steps=tuple(sampling.get("scale_steps", ())))  # configs stored before it lack the key
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)

  def steps_at(self, k: int, num_scales: int) -> int:
    """ODE steps at scale k of num_scales: scale_steps[k], or num_steps when scale_steps is empty."""
    if not self.scale_steps:
      return self.num_steps
    if len(self.scale_steps) != num_scales:
      raise ValueError(f"scale_steps {self.scale_steps} gives {len(self.scale_steps)} step counts for a model of "
                       f"{num_scales} scales: give one per scale, coarsest first")
    return self.scale_steps[k]

  def cfg_at(self, k: int, num_scales: int) -> float:
    """Per-scale CFG ramp: 1 + (cfg - 1) * k / (num_scales - 1)."""
    if num_scales == 1:
      return self.cfg
    return 1.0 + (self.cfg - 1.0) * k / (num_scales - 1)


def _concatenate(a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def guided_velocity(head: Velocity, x: jax.Array, t: float | jax.Array, z_cond: Any, z_uncond: Any | None,
                    cfg: float, z_both: Any | None = None) -> jax.Array:
  """v_u + cfg (v_c - v_u), both evaluated at the conditional state x; plain v_c when z_uncond is None.

  `z_both`, the concatenation of z_cond and z_uncond, may be passed precomputed (the ODE loop does)."""
  b = x.shape[0]
  if z_uncond is None:
    return head(x, jnp.full((b,), t, jnp.float32), z_cond)
  z_both = _concatenate(z_cond, z_uncond) if z_both is None else z_both
  v = head(jnp.concatenate([x, x]), jnp.full((2 * b,), t, jnp.float32), z_both)
  v_c, v_u = v[:b], v[b:]
  return v_u + cfg * (v_c - v_u)


def integrate(head: Velocity, noise: jax.Array, z_cond: Any, z_uncond: Any | None, cfg: float,
              grid: np.ndarray, guidance: float, solver: str = "euler") -> jax.Array:
  """Solve dx/dt = v from t = grid[0] (noise `[B, N, C]`) to grid[-1]; returns x at grid[-1], float32.

  Guidance (needs z_uncond) applies on steps whose start time is <= `guidance`. Heun uses a second
  evaluation at t_next, except on a step that ends at t = 0 (Euler there, as usual for flow samplers).
  """
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
  steps = []
  for t_cur, t_next in zip(grid[:-1], grid[1:]):
    guided = z_uncond is not None and t_cur <= guidance
    second = solver == "heun" and t_next > 0
    # The step size is taken from the float64 grid: a difference of float32 times would be off by up to 1e-6
    # relative (the official sampler steps in float64).
    steps.append((guided, second, np.float32(t_cur), np.float32(t_next), np.float32(t_next - t_cur)))

  x = noise.astype(jnp.float32)
  z_both = None if z_uncond is None else _concatenate(z_cond, z_uncond)  # once, outside the loops
  for (guided, second), run in itertools.groupby(steps, key=lambda s: s[:2]):
    run = list(run)
    times = jnp.asarray(np.array([s[2:] for s in run], np.float32))
    zu = z_uncond if guided else None

    def step(x, ts, zu=zu, second=second):
      t_cur, t_next, dt = ts[0], ts[1], ts[2]
      d = guided_velocity(head, x, t_cur, z_cond, zu, cfg, z_both)
      x_next = x + dt * d
      if second:
        d2 = guided_velocity(head, x_next, t_next, z_cond, zu, cfg, z_both)
        x_next = x + dt * (0.5 * d + 0.5 * d2)
      return x_next, None

    x, _ = jax.lax.scan(step, x, times)
  return x
