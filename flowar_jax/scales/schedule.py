"""The scale schedule: which sides the latent is predicted at, where each scale sits in the token sequence,
and the scale-causal visibility rule. Every other module asks this one instead of recomputing offsets."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ScaleSchedule:
  """Sides of the scales, coarse to fine; the last side is the latent side.

  Scale k holds `sides[k] ** 2` tokens in row-major order; scales are laid out one after another, so the
  sequence has `num_tokens = sum(side ** 2)` tokens (341 for (1, 2, 4, 8, 16)).
  """

  sides: tuple[int, ...]

  def __post_init__(self):
    sides = tuple(int(s) for s in self.sides)
    object.__setattr__(self, "sides", sides)
    if not sides:
      raise ValueError("scale schedule is empty: give at least one side, ending at the latent side")
    if any(s < 1 for s in sides):
      raise ValueError(f"scale sides must be positive, got {sides}")
    if list(sides) != sorted(set(sides)):
      raise ValueError(f"scale sides must be strictly increasing, got {sides}")

  @classmethod
  def for_latent(cls, sides: Sequence[int], latent_side: int) -> "ScaleSchedule":
    """Checks that `sides` ends at `latent_side` (the config error users hit most)."""
    schedule = cls(tuple(sides))
    if schedule.sides[-1] != latent_side:
      raise ValueError(
          f"model.scales must end at the latent side {latent_side} (image_size / VAE stride), "
          f"got {schedule.sides}")
    return schedule

  @property
  def num_scales(self) -> int:
    return len(self.sides)

  @property
  def latent_side(self) -> int:
    return self.sides[-1]

  @property
  def lengths(self) -> tuple[int, ...]:
    return tuple(s * s for s in self.sides)

  @property
  def offsets(self) -> tuple[int, ...]:
    """Start of each scale in the sequence, plus the total length at the end."""
    return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.lengths)]))

  @property
  def num_tokens(self) -> int:
    return self.offsets[-1]

  def scale_ids(self) -> np.ndarray:
    """[L] int32: the scale index of every token."""
    return np.repeat(np.arange(self.num_scales, dtype=np.int32), self.lengths)

  def visibility(self, q_ids: jnp.ndarray | None = None, kv_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """[Lq, Lk] bool: query token i sees key token j iff j's scale is not later than i's.

    Built from per-token scale ids (O(L) host data), never a host-side L x L table.
    """
    ids = jnp.asarray(self.scale_ids())
    q_ids = ids if q_ids is None else q_ids
    kv_ids = ids if kv_ids is None else kv_ids
    return kv_ids[None, :] <= q_ids[:, None]

  def split(self, tokens: jnp.ndarray) -> list[jnp.ndarray]:
    """[B, L, ...] -> per-scale list of [B, side**2, ...]."""
    o = self.offsets
    return [tokens[:, o[k]:o[k + 1]] for k in range(self.num_scales)]
