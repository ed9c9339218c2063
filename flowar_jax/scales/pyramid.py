"""The scale pyramid: per-scale targets and the inputs that predict them.

Target at scale k: the latent area-resized to side_k (the last target is the latent itself).
Input for scale k+1: scale k resized bicubic up to the full latent side, then area down to side_{k+1}.
Both the training loss (ground-truth scale k) and the sampler (sampled scale k) call `next_scale_input`.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from flowar_jax.scales.resize import apply_axis_matrices, area_matrix, bicubic_matrix
from flowar_jax.scales.schedule import ScaleSchedule


def scale_targets(latents: jnp.ndarray, schedule: ScaleSchedule) -> list[jnp.ndarray]:
  """[B, S, S, C] -> list over scales of [B, side, side, C]."""
  side = latents.shape[1]
  if latents.shape[1:3] != (schedule.latent_side, schedule.latent_side):
    raise ValueError(f"latents of spatial shape {latents.shape[1:3]} don't match the scale schedule's "
                     f"latent side {schedule.latent_side}")
  out = []
  for s in schedule.sides[:-1]:
    m = area_matrix(side, s)
    out.append(apply_axis_matrices(latents, m, m))
  out.append(latents)
  return out


@functools.lru_cache(maxsize=None)
def _up_then_down(side_in: int, full: int, side_out: int) -> np.ndarray:
  # Composing the two linear maps on the host keeps one small matmul per axis on device.
  return area_matrix(full, side_out) @ bicubic_matrix(side_in, full)


def next_scale_input(scale_latent: jnp.ndarray, schedule: ScaleSchedule, k: int) -> jnp.ndarray:
  """[B, side_k, side_k, C] -> [B, side_{k+1}, side_{k+1}, C]: the input tokens for scale k + 1."""
  m = _up_then_down(schedule.sides[k], schedule.latent_side, schedule.sides[k + 1])
  return apply_axis_matrices(scale_latent, m, m)


def teacher_forcing_inputs(targets: list[jnp.ndarray], schedule: ScaleSchedule) -> jnp.ndarray:
  """Per-scale targets -> [B, L - 1, C]: the input tokens of scales 1..K-1, flattened row-major."""
  parts = []
  for k in range(schedule.num_scales - 1):
    x = next_scale_input(targets[k], schedule, k)
    parts.append(x.reshape(x.shape[0], -1, x.shape[-1]))
  if not parts:
    b, c = targets[0].shape[0], targets[0].shape[-1]
    return jnp.zeros((b, 0, c), targets[0].dtype)
  return jnp.concatenate(parts, axis=1)
