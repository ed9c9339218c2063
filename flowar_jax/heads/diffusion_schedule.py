"""The Gaussian diffusion schedule of HART's residual head (IDDPM as in MAR's DiffLoss): cosine betas over 1000
steps, respaced to a few sampling steps, epsilon prediction with a learned variance range.

Training draws t from all 1000 steps; sampling keeps `space_timesteps(1000, steps)` of them (evenly strided,
rounded) and recomputes betas from the kept cumulative alphas, so a kept step i stands for original step
`timestep_map[i]`, the timestep the network sees. Coefficients are float64 on the host and enter the
computation as float32, as the official `_extract_into_tensor` does.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

TRAIN_STEPS = 1000


def cosine_betas(num_steps: int = TRAIN_STEPS, max_beta: float = 0.999) -> np.ndarray:
  """[num_steps] float64: betas of alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2."""
  alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                   for i in range(num_steps)])


def space_timesteps(num_steps: int, sections: str | int) -> list[int]:
  """The kept original steps, ascending: `sections` is a step count ("8"), or comma-separated counts per equal
  part of [0, num_steps)."""
  counts = [int(x) for x in str(sections).split(",")]
  size_per, extra = divmod(num_steps, len(counts))
  kept, start = [], 0
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if not 1 <= count <= size:
      raise ValueError(f"cannot divide a section of {size} diffusion steps into {count}")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    kept += [start + round(j * stride) for j in range(count)]
    start += size
  return sorted(set(kept))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The per-step coefficients of a (possibly respaced) diffusion, float64 `[T]` each."""
  betas: np.ndarray
  timestep_map: np.ndarray  # step i -> the original timestep the network is given

  @property
  def num_steps(self) -> int:
    return len(self.betas)

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(1.0 - self.betas)

  @property
  def alphas_cumprod_prev(self) -> np.ndarray:
    return np.append(1.0, self.alphas_cumprod[:-1])

  @property
  def posterior_variance(self) -> np.ndarray:
    return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

  @property
  def posterior_log_variance_clipped(self) -> np.ndarray:
    # The posterior variance is 0 at step 0; its log takes step 1's value there.
    v = self.posterior_variance
    return np.log(np.append(v[1], v[1:])) if len(v) > 1 else np.array([])

  @property
  def posterior_mean_coef1(self) -> np.ndarray:
    return self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

  @property
  def posterior_mean_coef2(self) -> np.ndarray:
    return (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.alphas_cumprod)


def schedule(sections: str | int | None = None, num_steps: int = TRAIN_STEPS) -> Schedule:
  """The cosine schedule over `num_steps`, respaced to `sections` (None: all steps, the training diffusion)."""
  betas = cosine_betas(num_steps)
  if sections is None or sections == "":
    return Schedule(betas, np.arange(num_steps))
  kept = space_timesteps(num_steps, sections)
  alphas_cumprod = np.cumprod(1.0 - betas)
  new_betas, last = [], 1.0
  for i in kept:
    new_betas.append(1 - alphas_cumprod[i] / last)
    last = alphas_cumprod[i]
  return Schedule(np.array(new_betas), np.array(kept))
