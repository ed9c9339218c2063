"""ImageNet-1k (ILSVRC 2012) read through `tensorflow_datasets` array_record files, without TensorFlow.

Reading needs only `tensorflow_datasets` + `array_record`; the one-off preparation from the original
tar files needs TensorFlow as well (tfds' ImageNet builder uses `tf.io`), see `prepare_imagenet`.
Split 'train' is ImageNet's train set (1,281,167 images), 'eval' its validation set (50,000).
Images are fetched as encoded JPEG bytes and decoded here, so the decode can use a reduced JPEG scale
and the same RGB conversion as every other source.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from flowar_jax.data import preprocess
from flowar_jax.data import splits

TFDS_NAME = "imagenet2012"
NUM_CLASSES = 1000
TFDS_SPLITS = {"train": "train", "eval": "validation"}
ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
_DEFAULT_TFDS_DIR = "~/tensorflow_datasets"


def _dirs(data_dir: str) -> tuple[str, str]:
  """(tfds data_dir holding the prepared files, manual_dir holding the tar files): both `data_dir`."""
  root = os.path.abspath(os.path.expanduser(data_dir or _DEFAULT_TFDS_DIR))
  return root, root


def missing_message(data_dir: str, detail: str = "") -> str:
  """What to download and where to put it, for an ImageNet that is not prepared in `data_dir`."""
  tfds_dir, manual_dir = _dirs(data_dir)
  present = [a for a in ARCHIVES if os.path.exists(os.path.join(manual_dir, a))]
  lines = [
      f"ImageNet (tfds '{TFDS_NAME}', array_record format) is not prepared in {tfds_dir}."
      + (f" ({detail})" if detail else ""),
      "To set it up once:",
      "  1. Download ILSVRC2012_img_train.tar (~138 GB) and ILSVRC2012_img_val.tar (~6.3 GB) from "
      "https://image-net.org/download-images (free account; ImageNet terms of access apply)",
      f"     and put both files in {manual_dir}"
      + (f" (found there already: {', '.join(present)})." if present else "."),
      "  2. Prepare the array_record files (needs `pip install tensorflow` for this step only, ~hours):",
      f"     python -c \"from flowar_jax.data.imagenet import prepare_imagenet; "
      f"prepare_imagenet('{tfds_dir}')\"",
      f"     (equivalently: tfds build {TFDS_NAME} --data_dir={tfds_dir} --manual_dir={manual_dir} "
      "--file_format=array_record)",
      f"Then set config.data.data_dir={tfds_dir}.",
  ]
  return "\n".join(lines)


def prepare_imagenet(data_dir: str) -> None:
  """Builds the array_record files in `data_dir` from the two tar files in `data_dir` (needs TF)."""
  import tensorflow_datasets as tfds  # Imported here: only this dataset needs tfds.

  tfds_dir, manual_dir = _dirs(data_dir)
  builder = tfds.builder(TFDS_NAME, data_dir=tfds_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
  )


class EncodedImageSource:
  """Random access to records `{'image': encoded bytes, 'label': int}` as decoded examples.

  Yields `{'image': uint8 [H0, W0, 3], 'label': int32 scalar}`; `min_side` as in
  `preprocess.decode_image`.
  """

  def __init__(self, records: Sequence[Any], class_names: list[str], min_side: int = 0):
    self._records = records
    self.class_names = list(class_names)
    self.num_classes = len(self.class_names)
    self._min_side = min_side

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self._records[index]
    data = record["image"]
    if isinstance(data, np.ndarray):  # tfds may hand back a 0-d object array.
      data = data.item()
    image = preprocess.decode_image(bytes(data), self._min_side)
    return {"image": image, "label": np.int32(record["label"])}

  def __repr__(self) -> str:
    return f"EncodedImageSource(len={len(self)}, classes={self.num_classes})"


def imagenet_source(data_dir: str, split: str, min_side: int = 0) -> EncodedImageSource:
  """One ImageNet split as a random-access source; raises FileNotFoundError if not prepared."""
  splits.check_split(split)
  import tensorflow_datasets as tfds  # Imported here: only this dataset needs tfds.

  tfds_dir, _ = _dirs(data_dir)
  if not os.path.isdir(tfds_dir):
    raise FileNotFoundError(missing_message(data_dir, f"{tfds_dir} does not exist"))
  builder = tfds.builder(TFDS_NAME, data_dir=tfds_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(missing_message(data_dir))
  try:
    records = builder.as_data_source(
        split=TFDS_SPLITS[split], decoders={"image": tfds.decode.SkipDecoding()}
    )
  except (NotImplementedError, ValueError) as e:  # Prepared, but as tfrecord only.
    raise FileNotFoundError(missing_message(data_dir, f"tfds says: {e}")) from e
  names = builder.info.features["label"].names
  return EncodedImageSource(records, names, min_side)
