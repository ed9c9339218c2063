"""The dataset registry: `config.data.name` -> a random-access source of decoded, un-augmented images."""
from __future__ import annotations

from typing import Protocol

import ml_collections
import numpy as np

from flowar_jax.data import captioned_folder
from flowar_jax.data import compositions
from flowar_jax.data import digits
from flowar_jax.data import image_folder
from flowar_jax.data import imagenet
from flowar_jax.data import splits

DATASET_NAMES = ("digits", "image_folder", "imagenet", "digits_text", "captioned_folder")
# Sources of captioned images: each example also has 'text' (str), and `source.captions[i]` is example i's.
TEXT_DATASET_NAMES = ("digits_text", "captioned_folder")


class ImageSource(Protocol):
  """What every dataset provides; also a grain random-access data source.

  `source[i]` is `{'image': uint8 [H0, W0, 3], 'label': int32 scalar}`, decoded but not augmented; the
  captioned datasets (TEXT_DATASET_NAMES) add `'text': str` and label -1.
  """

  num_classes: int
  class_names: list[str]

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


def check_data_config(data_config: ml_collections.ConfigDict) -> None:
  """Fails early on a dataset name or sizes the pipeline cannot serve."""
  if data_config.name not in DATASET_NAMES:
    raise ValueError(
        f"Unknown config.data.name {data_config.name!r}; valid names: {', '.join(DATASET_NAMES)}."
    )
  if data_config.image_size <= 0:
    raise ValueError(f"config.data.image_size must be positive, got {data_config.image_size}.")
  if data_config.resize_size and data_config.resize_size < data_config.image_size:
    raise ValueError(
        f"config.data.resize_size ({data_config.resize_size}) must be 0 or >= image_size "
        f"({data_config.image_size}), since images are cropped to image_size after resizing."
    )


def resize_size(data_config: ml_collections.ConfigDict) -> int:
  """Shorter side before cropping: `resize_size`, or `image_size` when it is 0."""
  return data_config.resize_size or data_config.image_size


def build_source(data_config: ml_collections.ConfigDict, split: str) -> ImageSource:
  """The 'train' or 'eval' split of the dataset named by `data_config.name`."""
  check_data_config(data_config)
  splits.check_split(split)
  if data_config.name == "digits":
    return digits.DigitsSource(split, data_config.image_size, data_config.eval_fraction)
  if data_config.name == "image_folder":
    return image_folder.ImageFolderSource(
        data_config.data_dir, split, data_config.eval_fraction, min_side=resize_size(data_config)
    )
  if data_config.name == "digits_text":
    return compositions.CompositionSource(split, data_config.image_size, data_config.eval_fraction)
  if data_config.name == "captioned_folder":
    return captioned_folder.CaptionedFolderSource(
        data_config.data_dir, split, data_config.eval_fraction, min_side=resize_size(data_config)
    )
  return imagenet.imagenet_source(data_config.data_dir, split, min_side=resize_size(data_config))


def num_classes(data_config: ml_collections.ConfigDict) -> int:
  """Number of labels, without reading any image (image_folder lists its class folders)."""
  check_data_config(data_config)
  if data_config.name == "digits":
    return digits.NUM_CLASSES
  if data_config.name == "image_folder":
    return len(image_folder.class_names(data_config.data_dir))
  if data_config.name in TEXT_DATASET_NAMES:
    return 0  # captioned images have no class labels
  return imagenet.NUM_CLASSES
