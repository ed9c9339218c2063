"""Tests for flowar_jax.data: sources, pure image functions and the grain pipelines (CPU, tiny sizes)."""
from __future__ import annotations

import io
import os
import sys

import numpy as np
from PIL import Image
import pytest

from flowar_jax import config as config_lib
from flowar_jax import data
from flowar_jax.data import digits
from flowar_jax.data import image_folder
from flowar_jax.data import imagenet
from flowar_jax.data import preprocess
from flowar_jax.data import splits


def _data_config(**overrides):
  c = config_lib.base_config().data
  c.update(dict(name="digits", image_size=8, resize_size=0, random_crop=False, random_flip=False))
  c.update(overrides)
  return c


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


# ----------------------------------------------------------------------------- digits


def test_digits_splits_cover_all_disjoint_and_stratified():
  _, all_labels = digits._load()
  train = digits.split_indices("train", 0.1)
  held_out = digits.split_indices("eval", 0.1)
  assert len(all_labels) == 1797
  assert len(train) + len(held_out) == 1797
  assert np.intersect1d(train, held_out).size == 0
  for label in range(10):
    in_class = np.sum(all_labels == label)
    assert np.sum(all_labels[held_out] == label) == int(np.floor(0.1 * in_class + 0.5))
  # The split does not depend on anything but eval_fraction (no training seed involved).
  np.testing.assert_array_equal(held_out, digits.split_indices("eval", 0.1))


def test_digits_source_sizes_and_value_mapping():
  train = data.build_source(_data_config(), "train")
  held_out = data.build_source(_data_config(), "eval")
  assert len(train) + len(held_out) == 1797
  assert train.num_classes == 10 and train.class_names == [str(d) for d in range(10)]
  raw_images, raw_labels = digits._load()
  assert raw_images[0][0, 2] == 5.0 and raw_images[0][0, 3] == 13.0  # load_digits()'s first image
  source = train if 0 in train.indices else held_out
  example = source[int(np.flatnonzero(source.indices == 0)[0])]
  assert example["image"].shape == (8, 8, 3) and example["image"].dtype == np.uint8
  assert example["label"].dtype == np.int32 and example["label"] == raw_labels[0]
  assert example["image"][0, 2].tolist() == [80, 80, 80]  # round(5 * 255 / 16): ink stays bright
  assert example["image"][0, 3].tolist() == [207, 207, 207]  # round(13 * 255 / 16)
  assert example["image"][0, 0].tolist() == [0, 0, 0]
  np.testing.assert_array_equal(digits.to_uint8(np.array([0.0, 8.0, 16.0])), [0, 128, 255])


def test_digits_source_resizes_to_image_size():
  example = data.build_source(_data_config(image_size=20), "train")[0]
  assert example["image"].shape == (20, 20, 3)
  assert np.array_equal(example["image"][..., 0], example["image"][..., 2])  # gray replicated


def test_load_digits_split_matches_sources():
  train_x, train_y = data.load_digits_split("train")
  eval_x, eval_y = data.load_digits_split("eval")
  assert train_x.shape == (1618, 8, 8) and eval_x.shape == (179, 8, 8)
  assert train_x.dtype == np.float32 and train_x.max() == 16.0 and train_x.min() == 0.0
  assert train_y.dtype == np.int32
  source = data.build_source(_data_config(), "eval")
  np.testing.assert_array_equal(eval_y, [source[i]["label"] for i in range(len(source))])
  train_rows = {x.tobytes() for x in train_x}
  assert not any(x.tobytes() in train_rows for x in eval_x)


def test_eval_mask_rejects_bad_fraction():
  with pytest.raises(ValueError, match="eval_fraction"):
    splits.eval_mask(np.zeros(4), 1.0)


# ----------------------------------------------------------------------------- pipeline


def test_train_batches_shapes_dtypes_range():
  config = _data_config(image_size=12, resize_size=14, random_crop=True, random_flip=True)
  batch = next(data.make_train_iterator(config, batch_size=16, seed=0))
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (16, 12, 12, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert batch["image"].min() == -1.0  # digit background is black
  assert set(batch["label"].tolist()) <= set(range(10))


def test_train_iterator_is_deterministic_per_seed():
  config = _data_config(image_size=10, resize_size=12, random_crop=True, random_flip=True)
  first = _take(data.make_train_iterator(config, 8, seed=3), 4)
  again = _take(data.make_train_iterator(config, 8, seed=3), 4)
  other = _take(data.make_train_iterator(config, 8, seed=4), 4)
  _assert_batches_equal(first, again)
  assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(first, other))


def test_augmentation_varies_and_is_seeded():
  """Same order, different augmentation seeds would be a bug; check crops/flips actually vary."""
  config = _data_config(image_size=8, resize_size=12, random_crop=True, random_flip=True)
  batch = next(data.make_train_iterator(config, 64, seed=0))
  plain = next(data.make_train_iterator(_data_config(image_size=8, resize_size=12), 64, seed=0))
  np.testing.assert_array_equal(batch["label"], plain["label"])  # augmentation does not move order
  assert not np.array_equal(batch["image"], plain["image"])


def test_iterator_state_restores_exact_next_batches():
  config = _data_config(image_size=10, resize_size=12, random_crop=True, random_flip=True)
  iterator = data.make_train_iterator(config, 32, seed=1)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  resumed = data.make_train_iterator(config, 32, seed=1)
  resumed.set_state(state)
  _assert_batches_equal(expected, _take(resumed, 3))


def test_iterator_state_restores_across_epoch_boundary():
  config = _data_config()
  steps = data.steps_per_epoch(1618, 256)
  iterator = data.make_train_iterator(config, 256, seed=0)
  _take(iterator, steps - 1)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  resumed = data.make_train_iterator(config, 256, seed=0)
  resumed.set_state(state)
  _assert_batches_equal(expected, _take(resumed, 3))


def _epoch_images(iterator, steps):
  return [img.tobytes() for batch in _take(iterator, steps) for img in batch["image"]]


def test_shards_are_disjoint_within_an_epoch_and_epochs_reshuffle():
  config = _data_config()  # no augmentation: images identify examples (all 1,797 are distinct)
  steps = data.steps_per_epoch(1618, 64, shard_count=2)
  shard_iterators = [
      data.make_train_iterator(config, 64, seed=0, shard_index=i, shard_count=2) for i in range(2)
  ]
  first, second = (_epoch_images(it, steps) for it in shard_iterators)
  assert next(shard_iterators[0])["image"].shape[0] == 32  # local batch = 64 // 2
  assert steps == 25 and len(first) == len(second) == 25 * 32
  assert len(set(first)) == len(first) and len(set(second)) == len(second)
  assert not set(first) & set(second)
  epoch_two = _epoch_images(shard_iterators[0], steps)
  assert epoch_two[: len(first) - 32] != first[32:]  # order changes between epochs


def test_single_process_epoch_sees_each_example_once():
  config = _data_config()
  steps = data.steps_per_epoch(1618, 100)
  images = _epoch_images(data.make_train_iterator(config, 100, seed=5), steps)
  assert len(images) == 1600 and len(set(images)) == 1600


def test_batch_size_must_divide_by_shard_count():
  with pytest.raises(ValueError, match="multiple of shard_count"):
    data.make_train_iterator(_data_config(), 10, seed=0, shard_index=0, shard_count=3)


def test_unknown_dataset_name_lists_valid_names():
  with pytest.raises(ValueError, match="digits, image_folder, imagenet"):
    data.build_source(_data_config(name="mnist"), "train")
  with pytest.raises(ValueError, match="split"):
    data.build_source(_data_config(), "validation")


def test_resize_size_smaller_than_image_size_fails():
  with pytest.raises(ValueError, match="resize_size"):
    data.build_source(_data_config(image_size=16, resize_size=12), "train")


def test_eval_batches_are_ordered_complete_and_padded():
  config = _data_config(random_crop=True, random_flip=True)  # eval ignores both
  source = data.build_source(config, "eval")
  batches = list(data.make_eval_batches(config, 64))
  assert len(batches) == 3
  for batch in batches:
    assert batch["image"].shape == (64, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == len(source) == 179 and mask[:179].all()
  images = np.concatenate([b["image"] for b in batches])[:179]
  expected = np.stack([preprocess.to_float(source[i]["image"]) for i in range(179)])
  np.testing.assert_array_equal(images, expected)
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels[:179], [source[i]["label"] for i in range(179)])
  assert not batches[-1]["image"][51:].any() and not labels[179:].any()


def test_num_classes():
  assert data.num_classes(_data_config()) == 10
  assert data.num_classes(_data_config(name="imagenet", data_dir="/nowhere")) == 1000


# ----------------------------------------------------------------------------- preprocess


def test_to_rgb_handles_every_mode():
  rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 255))
  rgba.putpixel((0, 0), (10, 20, 30, 0))
  out = np.asarray(preprocess.to_rgb(rgba))
  assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [10, 20, 30]
  half = np.asarray(preprocess.to_rgb(Image.new("LA", (1, 1), (0, 128))))
  assert abs(int(half[0, 0, 0]) - 127) <= 1  # black at 50% alpha over white
  wide = Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.uint16))
  assert np.asarray(preprocess.to_rgb(wide))[0, :, 0].tolist() == [0, 255, 128]
  as_int = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
  assert np.asarray(preprocess.to_rgb(as_int))[0, :, 0].tolist() == [0, 255]
  as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
  assert np.asarray(preprocess.to_rgb(as_float))[0, :, 0].tolist() == [0, 128, 255]
  palette = Image.new("P", (2, 1))
  palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
  palette.putpixel((1, 0), 1)
  assert np.asarray(preprocess.to_rgb(palette))[0].tolist() == [[255, 0, 0], [0, 0, 255]]
  palette.info["transparency"] = 0
  assert np.asarray(preprocess.to_rgb(palette))[0].tolist() == [[255, 255, 255], [0, 0, 255]]
  bits = Image.new("1", (2, 1))
  bits.putpixel((1, 0), 1)
  assert np.asarray(preprocess.to_rgb(bits))[0].tolist() == [[0, 0, 0], [255, 255, 255]]
  cmyk = np.asarray(preprocess.to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))))
  assert cmyk[0, 0].tolist() == [255, 0, 0]
  for mode in ("L", "RGB", "YCbCr", "HSV", "RGBX", "I;16B", "PA", "La", "RGBa"):
    converted = preprocess.to_rgb(Image.new(mode, (3, 2)))
    assert converted.mode == "RGB" and converted.size == (3, 2), mode


def test_resize_crop_flip_to_float():
  image = np.arange(30 * 50 * 3, dtype=np.uint8).reshape(30, 50, 3)
  assert preprocess.resize_shorter_side(image, 15).shape == (15, 25, 3)
  assert preprocess.resize_shorter_side(image, 60).shape == (60, 100, 3)
  assert preprocess.resize_shorter_side(np.zeros((5, 3, 3), np.uint8), 8).shape == (13, 8, 3)
  assert preprocess.resize_shorter_side(image, 30) is image
  np.testing.assert_array_equal(preprocess.center_crop(image, 10), image[10:20, 20:30])
  rng = np.random.default_rng(0)
  crops = {preprocess.random_crop(image, 10, rng).tobytes() for _ in range(20)}
  assert len(crops) > 1
  for crop in crops:
    window = np.frombuffer(crop, np.uint8).reshape(10, 10, 3)
    assert any(np.array_equal(window, image[t:t + 10, l:l + 10]) for t in range(21) for l in range(41))
  np.testing.assert_array_equal(preprocess.flip(image)[:, 0], image[:, -1])
  with pytest.raises(ValueError, match="Cannot crop"):
    preprocess.center_crop(image, 31)
  scaled = preprocess.to_float(np.array([0, 255], np.uint8))
  assert scaled.dtype == np.float32 and scaled.tolist() == [-1.0, 1.0]


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", **kwargs)
  return buffer.getvalue()


def test_decode_large_jpeg_with_and_without_reduced_scale():
  encoded = _jpeg_bytes(Image.new("RGB", (6000, 4000), (200, 100, 50)), quality=80)
  full = preprocess.decode_image(encoded)
  assert full.shape == (4000, 6000, 3)
  reduced = preprocess.decode_image(encoded, min_side=288)
  assert reduced.shape == (500, 750, 3)  # 1/8 scale keeps both sides >= 288
  assert np.abs(reduced.astype(int) - [200, 100, 50]).max() <= 3


def test_decode_applies_exif_orientation():
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  encoded = _jpeg_bytes(Image.new("RGB", (40, 20)), exif=exif.tobytes())
  assert preprocess.decode_image(encoded).shape == (40, 20, 3)


# ----------------------------------------------------------------------------- image_folder


def _save(image: Image.Image, path, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, **kwargs)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
  """cat/: 9 readable images in many modes + 3 bad files; dog/: 4 readable images."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  cat, dog = root / "cat", root / "dog"
  rgba = Image.new("RGBA", (40, 24), (0, 0, 255, 255))
  rgba.paste((0, 0, 0, 0), (0, 0, 20, 24))
  _save(rgba, cat / "rgba.png")
  _save(Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)), cat / "gray.png")
  _save(Image.new("RGB", (25, 25), (9, 200, 9)).convert("P"), cat / "palette.png")
  _save(Image.fromarray(np.full((20, 30), 65535, np.uint16)), cat / "wide.png")
  _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), cat / "cmyk.jpg")
  _save(Image.new("1", (24, 24), 1), cat / "bits.png")
  _save(Image.new("RGB", (3, 5), (255, 0, 0)), cat / "tiny.png")
  _save(Image.new("RGB", (6000, 4000), (10, 120, 240)), cat / "large.jpg", quality=80)
  _save(Image.new("RGB", (64, 48), (1, 2, 3)), cat / "nested" / "deeper.webp")
  (cat / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
  (cat / "notes.txt").write_text("not an image")
  (cat / "truncated.jpg").write_bytes(
      _jpeg_bytes(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))[:900]
  )
  (cat / ".hidden.png").write_bytes(b"ignored")
  for i in range(3):
    _save(Image.fromarray(rng.integers(0, 256, (18 + i, 26, 3), dtype=np.uint8)), dog / f"{i}.png")
  _save(Image.new("LA", (22, 22), (255, 0)), dog / "clear.png")
  return str(root)


def _folder_config(root, **overrides):
  return _data_config(**dict(dict(name="image_folder", data_dir=root, image_size=16, resize_size=20,
                                  eval_fraction=0.25), **overrides))


def test_image_folder_loads_every_readable_image_as_rgb(image_root):
  train = data.build_source(_folder_config(image_root), "train")
  held_out = data.build_source(_folder_config(image_root), "eval")
  assert train.class_names == ["cat", "dog"] and train.num_classes == 2
  assert train.num_skipped == 3  # corrupt.png, notes.txt, truncated.jpg; .hidden.png is not a candidate
  assert len(train) + len(held_out) == 13
  assert not set(train.paths) & set(held_out.paths)
  assert sorted(held_out.labels.tolist()) == [0, 0, 1]  # round(0.25 * 9), round(0.25 * 4)
  examples = {}
  for source in (train, held_out):
    for i in range(len(source)):
      example = source[i]
      assert example["image"].dtype == np.uint8 and example["image"].ndim == 3
      assert example["image"].shape[2] == 3 and example["label"].dtype == np.int32
      examples[os.path.relpath(source.paths[i], image_root)] = example
  assert examples["cat/rgba.png"]["image"][0, 0].tolist() == [255, 255, 255]  # transparent -> white
  assert examples["cat/rgba.png"]["image"][0, 39].tolist() == [0, 0, 255]
  assert examples["cat/wide.png"]["image"].max() == 255 and examples["cat/wide.png"]["image"].min() == 255
  assert examples["cat/tiny.png"]["image"].shape == (5, 3, 3)
  assert examples["cat/large.jpg"]["image"].shape == (500, 750, 3)  # decoded at 1/8, sides >= 20
  assert examples["dog/clear.png"]["image"].min() == 255
  cmyk = examples["cat/cmyk.jpg"]["image"].astype(int)
  assert np.abs(cmyk - [255, 0, 0]).max() <= 8
  assert examples["dog/0.png"]["label"] == 1 and examples["cat/bits.png"]["label"] == 0


def test_image_folder_batches_have_the_right_size(image_root):
  config = _folder_config(image_root, random_crop=True, random_flip=True)
  batch = next(data.make_train_iterator(config, 4, seed=0))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  batches = list(data.make_eval_batches(config, 2))
  assert [b["mask"].tolist() for b in batches] == [[True, True], [True, False]]
  assert all(b["image"].shape == (2, 16, 16, 3) for b in batches)
  assert data.num_classes(config) == 2


def test_image_folder_logs_skipped_count(image_root, caplog):
  image_folder._SCANS.clear()  # the scan (and its warning) happens once per process while files stay the same
  with caplog.at_level("WARNING"):
    data.build_source(_folder_config(image_root), "train")
  assert any("Skipped 3 unreadable file(s) of 16" in r.getMessage() for r in caplog.records)


def _png_bytes(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


@pytest.fixture(scope="module")
def every_kind_root(tmp_path_factory):
  """modes/: one readable file per PIL mode and size extreme; broken/: one readable file among bad ones;
  unreadable_only/ and no_files/: classes that end up without an image."""
  root = tmp_path_factory.mktemp("every_kind")
  modes, broken = root / "modes", root / "broken"
  readable = {
      "l.png": Image.new("L", (10, 12), 80),
      "la.png": Image.new("LA", (10, 12), (0, 0)),  # fully transparent: white
      "rgba.webp": Image.new("RGBA", (10, 12), (200, 10, 20, 255)),
      "palette.gif": Image.new("P", (10, 12), 0),
      "i16.png": Image.fromarray(np.full((12, 10), 65535, np.uint16)),
      "i32.tif": Image.fromarray(np.full((12, 10), 65535, np.int32), mode="I"),
      "float.tif": Image.fromarray(np.full((12, 10), 1.0, np.float32)),
      "cmyk.tif": Image.new("CMYK", (10, 12), (0, 255, 255, 0)),
      "cmyk.jpg": Image.new("CMYK", (10, 12), (0, 255, 255, 0)),
      "bits.bmp": Image.new("1", (10, 12), 1),
      "one_pixel.png": Image.new("RGB", (1, 1), (7, 8, 9)),
      "nested/deep/huge.png": Image.new("RGB", (5000, 3000), (10, 120, 240)),
  }
  for name, image in readable.items():
    _save(image, modes / name)
  truncated_png = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)))
  _save(Image.new("RGB", (9, 9), (1, 2, 3)), broken / "ok.png")
  (broken / "truncated.png").write_bytes(truncated_png[:len(truncated_png) // 2])
  (broken / "truncated.jpg").write_bytes(_jpeg_bytes(Image.new("RGB", (64, 64), (5, 5, 5)))[:300])
  (broken / "empty.jpg").write_bytes(b"")
  (broken / "readme.txt").write_text("not an image")
  (broken / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: not even a candidate
  (root / "unreadable_only").mkdir()
  (root / "unreadable_only" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
  (root / "no_files").mkdir()
  return str(root)


def test_image_folder_reads_every_mode_and_size_and_skips_bad_files(every_kind_root, caplog):
  image_folder._SCANS.clear()
  with caplog.at_level("WARNING"):
    source = data.build_source(_folder_config(every_kind_root, eval_fraction=0.0), "train")
  assert source.class_names == ["broken", "modes", "no_files", "unreadable_only"]
  assert len(source) == 13 and source.num_skipped == 5
  messages = " ".join(r.getMessage() for r in caplog.records)
  assert "Skipped 5 unreadable file(s) of 18" in messages
  assert "broken/empty.jpg (UnidentifiedImageError" in messages and "broken/readme.txt (" in messages
  assert "broken/truncated.png (" in messages
  assert "without a readable image: no_files, unreadable_only" in messages
  pixels = {os.path.relpath(path, os.path.join(every_kind_root, "modes")): source[i]["image"]
            for i, path in enumerate(source.paths)}
  for name, image in pixels.items():
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
  assert pixels["l.png"][0, 0].tolist() == [80, 80, 80]
  assert pixels["la.png"][0, 0].tolist() == [255, 255, 255]
  assert pixels["i16.png"][0, 0].tolist() == [255, 255, 255]
  assert pixels["i32.tif"][0, 0].tolist() == [255, 255, 255]
  assert pixels["float.tif"][0, 0].tolist() == [255, 255, 255]
  assert pixels["cmyk.tif"][0, 0].tolist() == [255, 0, 0]
  assert pixels["bits.bmp"][0, 0].tolist() == [255, 255, 255]
  assert pixels["one_pixel.png"].shape == (1, 1, 3)
  assert pixels["nested/deep/huge.png"].shape == (3000, 5000, 3)
  # Every one of them comes out of the pipeline at the training size.
  config = _folder_config(every_kind_root, eval_fraction=0.0, random_crop=True, random_flip=True)
  batches = _take(data.make_train_iterator(config, 13, seed=0), 2)
  for batch in batches:
    assert batch["image"].shape == (13, 16, 16, 3) and np.isfinite(batch["image"]).all()
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert sorted(batches[0]["label"].tolist()) == [0] + [1] * 12


def test_image_folder_scan_is_cached_until_a_file_changes(every_kind_root, monkeypatch):
  image_folder.scan(every_kind_root)
  calls = []
  original = image_folder._read_problem
  monkeypatch.setattr(image_folder, "_read_problem", lambda path: calls.append(path) or original(path))
  image_folder.scan(every_kind_root)
  assert not calls
  ok = os.path.join(every_kind_root, "broken", "ok.png")
  os.utime(ok, ns=(0, 0))
  paths, _, _, skipped = image_folder.scan(every_kind_root)
  assert len(calls) == 18 and len(paths) == 13 and len(skipped) == 5


def test_images_beyond_the_size_guard_are_skipped(tmp_path, monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # so that 5000x3000 stands for a decompression bomb
  _save(Image.new("RGB", (20, 20)), tmp_path / "a" / "small.png")
  _save(Image.new("RGB", (5000, 3000)), tmp_path / "a" / "bomb.png")
  paths, _, _, skipped = image_folder.scan(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["small.png"]
  assert [os.path.basename(p) for p in skipped] == ["bomb.png"]


def test_image_folder_errors_name_the_path(tmp_path):
  missing = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match=missing):
    data.build_source(_folder_config(missing), "train")
  with pytest.raises(FileNotFoundError, match=missing):
    data.make_eval_batches(_folder_config(missing), 2)  # fails when called, not when iterated
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=f"{empty}.*empty"):
    data.build_source(_folder_config(str(empty)), "train")
  with pytest.raises(ValueError, match=f"{empty}.*empty"):
    data.num_classes(_folder_config(str(empty)))
  unreadable = tmp_path / "unreadable"
  (unreadable / "a").mkdir(parents=True)
  (unreadable / "a" / "x.png").write_bytes(b"nope")
  with pytest.raises(ValueError, match=f"{unreadable}.*no readable images"):
    data.build_source(_folder_config(str(unreadable)), "train")
  with pytest.raises(ValueError, match="data_dir"):
    data.build_source(_folder_config(""), "train")


# ----------------------------------------------------------------------------- imagenet


def test_imagenet_missing_data_says_what_to_download(tmp_path):
  config = _data_config(name="imagenet", data_dir=str(tmp_path), image_size=256, resize_size=288)
  with pytest.raises(FileNotFoundError) as error:
    data.build_source(config, "train")
  message = str(error.value)
  for needed in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", str(tmp_path),
                 "image-net.org", "array_record"):
    assert needed in message
  assert "tensorflow" not in sys.modules  # reading never imports TensorFlow
  (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"")
  assert "found there already: ILSVRC2012_img_val.tar" in imagenet.missing_message(str(tmp_path))


def test_encoded_image_source_decodes_records():
  records = [
      {"image": _jpeg_bytes(Image.new("RGB", (600, 400), (0, 255, 0))), "label": np.int64(7)},
      {"image": np.array(_jpeg_bytes(Image.new("L", (40, 30))), dtype=object), "label": 3},
  ]
  source = imagenet.EncodedImageSource(records, [f"c{i}" for i in range(1000)], min_side=100)
  assert len(source) == 2 and source.num_classes == 1000
  first, second = source[0], source[1]
  assert first["image"].shape == (100, 150, 3) and first["label"] == 7  # 1/4 scale keeps >= 100
  assert first["label"].dtype == np.int32
  assert second["image"].shape == (30, 40, 3)


# ----------------------------------------------------------------------------- multiprocessing


def test_worker_processes_give_the_serial_stream_and_restore():
  serial = _data_config(image_size=10, resize_size=12, random_crop=True, random_flip=True)
  parallel = _data_config(image_size=10, resize_size=12, random_crop=True, random_flip=True,
                          num_workers=2)
  expected = _take(data.make_train_iterator(serial, 16, seed=2), 4)
  iterator = data.make_train_iterator(parallel, 16, seed=2)
  got = _take(iterator, 2)
  state = iterator.get_state()
  got += _take(iterator, 2)
  _assert_batches_equal(expected, got)
  resumed = data.make_train_iterator(parallel, 16, seed=2)
  resumed.set_state(state)
  _assert_batches_equal(expected[2:], _take(resumed, 2))
  eval_serial = list(data.make_eval_batches(serial, 64))
  eval_parallel = list(data.make_eval_batches(parallel, 64))
  _assert_batches_equal(eval_serial, eval_parallel)
