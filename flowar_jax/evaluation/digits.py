"""A quality check for the bundled digits that needs no downloads: does a classifier fitted on real digits
recognise each class-conditional sample as the class it was asked for?

The classifier is logistic regression on the 8x8 pixels of scikit-learn's digits (values 0..16), fitted on
the train split; generated images are reduced to 8x8 grey by averaging blocks and mapped back to 0..16.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression

from flowar_jax.data import load_digits_split


@functools.lru_cache(maxsize=1)
def digit_classifier() -> LogisticRegression:
  images, labels = load_digits_split("train")
  return LogisticRegression(max_iter=5000).fit(images.reshape(len(images), -1), labels)


def to_digit_pixels(images: np.ndarray) -> np.ndarray:
  """uint8 `[N, H, W, C]` -> float `[N, 64]` in 0..16 (grey, area-resized to 8x8)."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"expected images [N, H, W, C], got shape {images.shape}")
  grey = images.astype(np.float32).mean(axis=-1)
  small = np.stack([np.asarray(Image.fromarray(g).resize((8, 8), Image.Resampling.BOX)) for g in grey])
  return small.reshape(len(images), 64) * (16.0 / 255.0)


def digit_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
  """Share of images `[N, H, W, C]` uint8 that the real-digit classifier labels as `labels` `[N]`."""
  predicted = digit_classifier().predict(to_digit_pixels(images))
  return float(np.mean(predicted == np.asarray(labels)))


def real_digit_accuracy() -> float:
  """The classifier's accuracy on the real held-out digits: the ceiling samples are compared with."""
  images, labels = load_digits_split("eval")
  return float(np.mean(digit_classifier().predict(images.reshape(len(images), -1)) == labels))
