"""Writing samples: PNG grids and the `samples.npz` archive, to a local or gs:// directory."""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from flowar_jax.runs import fs

GRID_MAX_IMAGES = 256


def make_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
  """uint8 `[N, H, W, C]` -> one uint8 image `[rows * (H + pad) + pad, columns * (W + pad) + pad, C]`."""
  n, h, w, c = images.shape
  rows = math.ceil(n / columns)
  grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
  return grid


def grid_columns(labels: np.ndarray) -> int:
  """One column per class when the labels cycle over at most 16 classes; else a square-ish grid."""
  distinct = len(np.unique(labels))
  if distinct <= 16 and len(labels) >= distinct:
    return distinct
  return max(1, min(16, math.ceil(math.sqrt(len(labels)))))


def enlarge(images: np.ndarray, min_side: int = 64) -> np.ndarray:
  """uint8 `[N, H, W, C]` -> `[N, f H, f W, C]` (nearest neighbour), f the smallest integer with f H >= min_side."""
  factor = max(1, math.ceil(min_side / images.shape[1]))
  return images if factor == 1 else images.repeat(factor, axis=1).repeat(factor, axis=2)


def write_samples(directory: str, images: np.ndarray, labels: np.ndarray, upscale_to: int = 64) -> list[str]:
  """Writes `samples.npz` (images uint8 [N, H, W, C], labels int [N]) and grids of at most 256 images.

  Small images are enlarged (nearest neighbour) to at least `upscale_to` pixels so grids are viewable.
  Returns the paths written.
  """
  npz = fs.join(directory, "samples.npz")
  fs.save_npz(npz, images=images, labels=np.asarray(labels, np.int64))
  paths = [npz]
  columns = grid_columns(labels)
  for start in range(0, len(images), GRID_MAX_IMAGES):
    chunk = enlarge(images[start:start + GRID_MAX_IMAGES], upscale_to)
    grid = make_grid(chunk, columns)
    name = "grid.png" if len(images) <= GRID_MAX_IMAGES else f"grid_{start // GRID_MAX_IMAGES:03d}.png"
    path = fs.join(directory, name)
    png = io.BytesIO()
    Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(png, format="PNG")
    fs.write_bytes(path, png.getvalue())
    paths.append(path)
  return paths
