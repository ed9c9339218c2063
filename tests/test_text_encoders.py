"""Frozen text encoders: tokenization, the registry's errors, weight loading, and parity with the reference
PyTorch implementations (transformers, sentence-transformers) through the fixtures in tests/data/text_parity/
(made by benchmarks/parity_text_encoders.py)."""
from __future__ import annotations

import importlib.util
import logging
import os

import jax
import numpy as np
import pytest

from flowar_jax.text import clip, minilm
from flowar_jax.text.registry import TextDims, build_text_encoder, text_encoder_dims
from flowar_jax.text.tokenization import PromptTokenizer, byte_level_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a 3 to the left of a 7", "two 4s", "", "A 5 above a 2."]


@pytest.fixture(scope="module")
def bundled():
  return build_text_encoder(dict(encoder="minilm", weights="", max_length=16))


@pytest.fixture(scope="module")
def tiny_clip():
  return build_text_encoder(dict(encoder="clip", weights="random", clip_size="tiny", max_length=12,
                                 truncate=True))


def test_minilm_tokenization_adds_special_tokens_and_pads(bundled):
  tokens = bundled.tokenize(PROMPTS)
  assert tokens.ids.shape == tokens.mask.shape == (4, 16) and tokens.ids.dtype == np.int32
  lengths = tokens.mask.sum(1)
  for row, n in zip(tokens.ids, lengths):
    assert row[0] == 101 and row[n - 1] == 102 and (row[n:] == 0).all()  # [CLS] ... [SEP] [PAD]...
  assert lengths[2] == 2  # the empty prompt: [CLS] [SEP]
  assert (tokens.mask[:, :1]).all() and not tokens.mask[2, 2:].any()


def test_over_long_prompt_is_an_error_or_truncated(bundled, caplog):
  long = "a 3 to the left of a 7 and " * 4
  with pytest.raises(ValueError, match=r"prompt 'a 3 to the left.*is 38 tokens long.*context is 16"):
    bundled.tokenize(["two 4s", long])
  cut = PromptTokenizer(bundled.tokenizer.tokenizer, max_length=16, truncate=True, **minilm.SPECIAL_TOKENS)
  with caplog.at_level(logging.WARNING):
    tokens = cut(["two 4s", long])
  assert tokens.mask[1].all() and tokens.ids[1, -1] == 102  # cut to 16 with [SEP] kept at the end
  assert tokens.ids[1, :15].tolist() == bundled.tokenizer.tokenizer.encode(long).ids[:15]
  assert cut.truncated_prompts == 1 and "1 prompt(s) longer than 16 tokens were truncated" in caplog.text
  with pytest.raises(ValueError, match="is 38 tokens long"):  # the shared tokenizer kept its own setting
    bundled.tokenize([long])


def test_unknown_wordpiece_token_becomes_unk_with_a_warning(bundled, caplog):
  with caplog.at_level(logging.WARNING):
    tokens = bundled.tokenize(["a 🤖 above a 2", "two 4s"])
  assert (tokens.ids[0] == 100).sum() == 1  # [UNK]
  assert "1 token(s) in 1 prompt(s)" in caplog.text and "'a 🤖 above a 2'" in caplog.text
  strict = PromptTokenizer(bundled.tokenizer.tokenizer, max_length=16, unknown="error", **minilm.SPECIAL_TOKENS)
  with pytest.raises(ValueError, match="not in the vocabulary of the tokenizer and became \\[UNK\\]"):
    strict(["a 🤖 above a 2"])


def test_byte_level_tokenizer_has_no_unknown_tokens(tiny_clip, caplog):
  with caplog.at_level(logging.WARNING):
    tokens = tiny_clip.tokenize(["a 🤖", "ü"])
  assert not caplog.text
  assert list(tokens.ids[0, :tokens.mask[0].sum()]) == [256] + list("a 🤖".encode()) + [257]
  assert tokens.mask.sum(1).tolist() == [2 + len("a 🤖".encode()), 2 + len("ü".encode())]
  assert tiny_clip.tokenizer.truncate and tiny_clip.tokenize(["x" * 20]).ids[0, -1] == 257  # as configured


def test_bad_prompts_are_refused(bundled):
  with pytest.raises(TypeError, match="a list of prompts"):
    bundled.tokenize("two 4s")
  with pytest.raises(TypeError, match="must be a string"):
    bundled.tokenize(["two 4s", 4])


def test_minilm_encoding_is_masked_and_normalised(bundled):
  tokens = bundled.tokenize(PROMPTS)
  out = bundled(tokens.ids, tokens.mask)
  assert out.states.shape == (4, 16, 384) and out.pooled.shape == (4, 384)
  assert (bundled.width, bundled.pooled_width, bundled.context_length) == (384, 384, 16)
  np.testing.assert_allclose(np.linalg.norm(out.pooled, axis=-1), 1.0, atol=1e-5)
  assert not np.asarray(out.states)[~tokens.mask].any() and np.asarray(out.states)[tokens.mask].any()
  # Padding changes nothing: the same prompts in a shorter context give the same pooled vectors.
  short = bundled(tokens.ids[:, :12], tokens.mask[:, :12])
  np.testing.assert_allclose(short.pooled, out.pooled, atol=1e-5)
  np.testing.assert_allclose(short.states, out.states[:, :12], atol=1e-5)


def test_encoder_is_frozen(bundled):
  tokens = bundled.tokenize(PROMPTS[:2])

  def loss(params):
    return bundled._encode(params, tokens.ids, tokens.mask).pooled.sum()  # pylint: disable=protected-access

  grads = jax.grad(loss)(bundled.params)
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))


def test_registry_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown text encoder 'bert'.*'clip', 'minilm'"):
    build_text_encoder(dict(encoder="bert"))
  with pytest.raises(FileNotFoundError, match="do not exist"):
    build_text_encoder(dict(encoder="minilm", weights=str(tmp_path / "absent")))
  with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
    build_text_encoder(dict(encoder="minilm", weights=str(tmp_path)))
  with pytest.raises(ValueError, match="CLIP has no bundled weights"):
    build_text_encoder(dict(encoder="clip", weights=""))
  with pytest.raises(ValueError, match="clip_size='XL'"):
    build_text_encoder(dict(encoder="clip", weights="random", clip_size="XL"))
  with pytest.raises(ValueError, match="max_length=600: the minilm encoder takes 2..512"):
    build_text_encoder(dict(encoder="minilm", weights="random", max_length=600))
  # A tokenizer that does not match: CLIP-style byte tokens given to MiniLM, and MiniLM's ids beyond tiny CLIP.
  byte_json = tmp_path / "bytes.json"
  byte_json.write_text(byte_level_tokenizer().to_str())
  with pytest.raises(ValueError, match=r"does not match the encoder: it has no start token '\[CLS\]'"):
    build_text_encoder(dict(encoder="minilm", weights="random", tokenizer=str(byte_json)))
  with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
    (tmp_path / "bad.json").write_text("{}")
    build_text_encoder(dict(encoder="minilm", weights="random", tokenizer=str(tmp_path / "bad.json")))


def test_clip_random_shapes_and_causality(tiny_clip):
  tokens = tiny_clip.tokenize(["two 4s", "two 4s and more"])
  out = tiny_clip(tokens.ids, tokens.mask)
  assert out.states.shape == (2, 12, 64) and out.pooled.shape == (2, clip.SIZES["tiny"].projection_dim)
  # Causal: the shared prefix has the same states whatever follows.
  n = len("two 4s".encode()) + 1
  np.testing.assert_allclose(out.states[0, :n], out.states[1, :n], atol=1e-5)
  assert not np.allclose(out.pooled[0], out.pooled[1], atol=1e-3)


def _parity_module():
  spec = importlib.util.spec_from_file_location(
      "parity_text_encoders", os.path.join(ROOT, "benchmarks", "parity_text_encoders.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _assert_parity(errors: dict[str, float], expected: set[str]):
  assert set(errors) == expected, errors
  for name, error in errors.items():
    assert error == 0 if name.startswith("tokens_") else error <= 1e-4, (name, error)


RANDOM_CASES = {"tokens_bert", "bert_states", "bert_pooled", "tokens_clip", "clip_states", "clip_pooled",
                "clip_pooled_no_projection"}
REAL_CASES = {"tokens_minilm_real", "minilm_real_states", "minilm_real_pooled"}


def test_parity_with_recorded_reference_outputs(bundled):
  """The random BERT and CLIP checkpoints through the converters, and the bundled MiniLM against the recorded
  sentence-transformers embeddings (and its token ids), all within 1e-4."""
  parity = _parity_module()
  _assert_parity(parity.compare(parity.FIXTURES, bundled), RANDOM_CASES | REAL_CASES)


def test_parity_live_against_transformers(tmp_path, bundled):
  """The same comparison against transformers run now, where torch and transformers are installed."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  parity = _parity_module()
  real = importlib.util.find_spec("sentence_transformers") is not None
  parity.make_inputs(str(tmp_path))
  parity.reference(str(tmp_path), minilm.bundled_archive() if real else "")
  _assert_parity(parity.compare(str(tmp_path), bundled), RANDOM_CASES | (REAL_CASES if real else set()))


def test_dims_without_building(bundled, tiny_clip):
  fixtures = os.path.join(ROOT, "tests", "data", "text_parity")
  assert text_encoder_dims(dict(encoder="minilm", weights="", max_length=16)) == TextDims(16, 384, 384)
  assert text_encoder_dims(dict(encoder="minilm", weights="random")) == TextDims(256, 384, 384)
  assert text_encoder_dims(dict(encoder="clip", weights="random")) == TextDims(77, 768, 768)
  assert text_encoder_dims(dict(encoder="clip", weights="random", clip_size="tiny", max_length=12)) == (
      TextDims(tiny_clip.context_length, tiny_clip.width, tiny_clip.pooled_width))
  assert text_encoder_dims(dict(encoder="clip", weights=os.path.join(fixtures, "clip_random"))) == (
      TextDims(16, 32, 24))
  assert (bundled.context_length, bundled.width, bundled.pooled_width) == (16, 384, 384)
  with pytest.raises(ValueError, match="unknown text encoder"):
    text_encoder_dims(dict(encoder="t5"))


def test_clip_sizes_from_a_full_clip_model_config():
  """A CLIPModel's config.json nests the text tower's sizes and keeps projection_dim at the top."""
  config = dict(model_type="clip", projection_dim=768, text_config=dict(
      hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
      max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", layer_norm_eps=1e-5))
  assert clip.ClipSize.from_hf_config(config) == clip.SIZES["L/14"]
  with pytest.raises(ValueError, match="describes a 'bert' model"):
    clip.ClipSize.from_hf_config(dict(model_type="bert", hidden_size=1, num_hidden_layers=1,
                                      num_attention_heads=1, intermediate_size=1))
