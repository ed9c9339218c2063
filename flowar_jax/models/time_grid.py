"""The ODE time grid of the official sampler (t = 1 is noise, t = 0 is data), and the solvers that step along it."""
from __future__ import annotations

import numpy as np

# Kept beside the grid, free of jax, so that the CLI and the config schema name them without importing the sampler.
SOLVERS = ("euler", "heun")


def time_grid(num_steps: int) -> np.ndarray:
  """[n + 1] float64 decreasing from 1 to 0.

  50 steps: uniform. Otherwise, as the official sampler: linspace(1, 0.3, n // 2) then
  linspace(0.25, 0, n // 2 + 1), which has n // 2 * 2 steps (24 for n = 25). One step is [1, 0].
  """
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
  if num_steps == 50 or num_steps == 1:
    return np.linspace(1.0, 0.0, num_steps + 1)
  return np.concatenate([np.linspace(1.0, 0.3, num_steps // 2), np.linspace(0.25, 0.0, num_steps // 2 + 1)])
