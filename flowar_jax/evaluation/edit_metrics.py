"""Image-space measures of an edit: how far the kept region moved, and how visible the seam is.

Both work on uint8 images averaged to grey in [0, 1], so they read the same for the RGB-replicated digits
and for colour images.
"""
from __future__ import annotations

import numpy as np


def _grey(images: np.ndarray) -> np.ndarray:
  """uint8 `[N, H, W, C]` -> float64 `[N, H, W]` in [0, 1]."""
  return np.asarray(images, np.float64).mean(axis=-1) / 255.0


def grow(masks: np.ndarray, margin: int) -> np.ndarray:
  """bool `[N, H, W]` masks grown by `margin` pixels in every direction (a square neighbourhood)."""
  masks = np.asarray(masks, bool)
  out = masks.copy()
  h, w = masks.shape[1:]
  for dy in range(-margin, margin + 1):
    for dx in range(-margin, margin + 1):
      out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] |= \
          masks[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
  return out


def kept_change(images: np.ndarray, reference: np.ndarray, masks: np.ndarray, margin: int = 0) -> float:
  """Mean absolute grey difference (0..1) between `images` and `reference` `[N, H, W, C]` over the kept pixels
  (`masks` `[N, H, W]` False), leaving out those within `margin` pixels of a generated one."""
  keep = ~grow(masks, margin)
  if not keep.any():
    raise ValueError("the masks keep no pixel: there is no kept region to compare")
  return float(np.abs(_grey(images) - _grey(reference))[keep].mean())


def seam_energy(images: np.ndarray, masks: np.ndarray) -> float:
  """Mean squared grey step across the mask's boundary: over every pair of 4-neighbour pixels of which one
  is generated and one kept (`masks` `[N, H, W]`, True = generated); images uint8 `[N, H, W, C]`."""
  grey, masks = _grey(images), np.asarray(masks, bool)
  steps = []
  for axis in (1, 2):
    d = np.diff(grey, axis=axis)
    across = np.diff(masks.astype(np.int8), axis=axis) != 0
    steps.append(d[across] ** 2)
  steps = np.concatenate(steps)
  if steps.size == 0:
    raise ValueError("the masks have no boundary (all generated or all kept)")
  return float(steps.mean())
