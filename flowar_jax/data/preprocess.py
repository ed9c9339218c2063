"""Pure image functions: decoding to RGB, resizing, cropping, flipping, scaling to [-1, 1].

Arrays are HWC uint8 `[H, W, 3]` until `to_float`. Resampling is PIL bicubic everywhere (PIL widens the
filter support when shrinking, so downscaling is antialiased).

Large photos: PIL's decompression-bomb guard is left at its default (a warning above ~89M pixels, an error
above ~179M). That admits any camera photo (a 150 MP frame only warns); larger files are almost always
scans or synthetic and are treated as unreadable by the folder scan. JPEGs are decoded at a reduced DCT
scale when the caller says how small they may get (`min_side`), so a 6000x4000 JPEG costs about as
much as a 750x500 one.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

_RESAMPLE = Image.Resampling.BICUBIC
_EXIF_ORIENTATION = 0x0112
_WHITE = (255, 255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
  """Converts a PIL image of any mode to mode 'RGB'.

  Transparency (RGBA, LA, PA, P with a transparent colour) is composited on white, so transparent
  regions look like a blank page rather than black. 16-bit and 32-bit integer modes are scaled from
  0..65535 to 0..255 (mode 'I' only when its maximum exceeds 255, since PIL also uses 'I' for 8-bit
  data); float mode 'F' is read as 0..1 when its maximum is at most 1, else as 0..255.
  """
  mode = image.mode
  if mode == "RGB":
    return image
  if mode.startswith("I") or mode == "F":
    return Image.fromarray(_wide_gray_to_uint8(np.asarray(image), mode)).convert("RGB")
  if mode == "P":
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  elif mode == "La":
    image = image.convert("LA")
  if image.mode in ("LA", "PA", "RGBa"):
    image = image.convert("RGBA")
  if image.mode == "RGBA":
    background = Image.new("RGBA", image.size, _WHITE)
    image = Image.alpha_composite(background, image)
  return image.convert("RGB")


def _wide_gray_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
  """Maps a single-channel 16/32-bit integer or float image `[H, W]` to uint8 `[H, W]`."""
  pixels = pixels.astype(np.float64)
  if mode == "F":
    scale = 255.0 if pixels.size and np.nanmax(pixels) <= 1.0 else 1.0
    pixels = np.nan_to_num(pixels) * scale
  elif mode.startswith("I;16") or (pixels.size and pixels.max() > 255):
    pixels = np.clip(pixels, 0, 65535) / 257.0
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def decode_image(data: bytes | str | os.PathLike, min_side: int = 0) -> np.ndarray:
  """Decodes an encoded image (file path or bytes) to RGB uint8 `[H, W, 3]`.

  EXIF orientation is applied. With `min_side > 0`, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale,
  never below `min_side` on either side. Raises whatever PIL raises for unreadable data
  (`PIL.UnidentifiedImageError`, `OSError` for truncated files, ...).
  """
  stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
  with Image.open(stream) as image:
    if min_side > 0 and image.format == "JPEG":
      image.draft(None, (min_side, min_side))
    image.load()
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
      image = ImageOps.exif_transpose(image)
    return np.asarray(to_rgb(image))


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes `[H, W, 3]` uint8 so that min(H, W) == size, keeping the aspect ratio (bicubic)."""
  height, width = image.shape[:2]
  if min(height, width) == size:
    return image
  scale = size / min(height, width)
  new_height = max(size, round(height * scale))
  new_width = max(size, round(width * scale))
  resized = Image.fromarray(image).resize((new_width, new_height), _RESAMPLE)
  return np.asarray(resized)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central `[size, size, 3]` window of `[H, W, 3]` (H, W >= size)."""
  height, width = image.shape[:2]
  _check_crop(height, width, size)
  top, left = (height - size) // 2, (width - size) // 2
  return image[top:top + size, left:left + size]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """A uniformly placed `[size, size, 3]` window of `[H, W, 3]` (H, W >= size)."""
  height, width = image.shape[:2]
  _check_crop(height, width, size)
  top = int(rng.integers(0, height - size + 1))
  left = int(rng.integers(0, width - size + 1))
  return image[top:top + size, left:left + size]


def _check_crop(height: int, width: int, size: int) -> None:
  if height < size or width < size:
    raise ValueError(f"Cannot crop {size}x{size} from a {height}x{width} image.")


def flip(image: np.ndarray) -> np.ndarray:
  """Mirrors `[H, W, C]` left-right."""
  return image[:, ::-1]


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 `[..., 3]` in 0..255 -> float32 in [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0
