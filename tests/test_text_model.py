"""Text-conditional FlowAR: the conditioning seam, condition dropout against the empty prompt, sampling from
prompts, and the errors of the prompt path. A small stand-in encoder (a word table) keeps these fast; the
bundled MiniLM is exercised where the run uses it."""
from __future__ import annotations


import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import tiny_config
from flowar_jax.commands import sample as sample_command
from flowar_jax.config import config_from_dict, validate_config
from flowar_jax.config_text import add_text_section, encoder_widths
from flowar_jax.models.conditioning import Condition, drop_text
from flowar_jax.models.registry import build_model, build_vae
from flowar_jax.sampling.generate import settings_from
from flowar_jax.sampling.prompts import generate_from_prompts, null_encoding, prompt_sampler, read_prompts_file
from flowar_jax.text.base import TextEncoding, TokenizedPrompts

WORDS = "a an 0 1 2 3 4 5 6 7 8 9 to the left of right above below two pair 4s".split()


class StandInEncoder:
  """A frozen TextEncoder of the protocol's shape: [CLS] words [SEP], a random table, mean-pooled."""

  context_length = 12

  def __init__(self, width: int, pooled_width: int):
    self.width, self.pooled_width = width, pooled_width
    keys = jax.random.split(jax.random.key(42), 2)
    self.table = jax.random.normal(keys[0], (len(WORDS) + 3, width))
    self.pool = jax.random.normal(keys[1], (width, pooled_width)) / width ** 0.5

  def tokenize(self, prompts):
    ids = np.zeros((len(prompts), self.context_length), np.int32)
    for i, prompt in enumerate(prompts):
      unknown = [w for w in prompt.split() if w not in WORDS]
      if unknown:
        raise ValueError(f"prompt {prompt!r}: unknown token {unknown[0]!r}")
      row = [1] + [WORDS.index(w) + 3 for w in prompt.split()] + [2]
      if len(row) > self.context_length:
        raise ValueError(f"prompt {prompt!r} is {len(row)} tokens, longer than the context {self.context_length}")
      ids[i, :len(row)] = row
    return TokenizedPrompts(ids, ids > 0)

  def __call__(self, ids, mask):
    mask = jnp.asarray(mask)
    states = self.table[jnp.asarray(ids)] * mask[..., None]
    pooled = jnp.tanh(states.sum(1) / mask.sum(1, keepdims=True) @ self.pool)
    return TextEncoding(states, mask, pooled)


def text_config():
  config = tiny_config()
  add_text_section(config)
  config.text.weights = "random"
  config.text.max_length = StandInEncoder.context_length
  config.stage = "flowar"
  return config


@pytest.fixture(scope="module")
def encoder():
  return StandInEncoder(*encoder_widths(text_config().text))


@pytest.fixture(scope="module")
def model():
  return build_model(text_config(), seed=0)


def latents(batch: int, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, 4, 4, 4))


def encode(encoder, prompts) -> TextEncoding:
  tokens = encoder.tokenize(prompts)
  return encoder(tokens.ids, tokens.mask)


def test_class_model_has_no_text_parameters_and_reads_a_bare_vector_as_before():
  model = build_model(tiny_config(), seed=0)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]
  assert not [n for n in names if "text_cond" in n or "cross_attn" in n]
  labels = jnp.array([0, 3, 9])
  targets, inputs = model.pyramid().teacher_forcing(latents(3))
  vector = model.class_embedding(labels)
  bare = model.backbone(vector, inputs)
  wrapped = model.backbone(Condition(vector), inputs)
  np.testing.assert_array_equal(np.asarray(bare), np.asarray(wrapped))


def test_text_model_rejects_labels_and_class_model_rejects_encodings(model, encoder):
  with pytest.raises(ValueError, match="takes a TextEncoding"):
    model.loss(latents(2), jnp.array([1, 2]), jax.random.key(0), null=encode(encoder, [""]))
  with pytest.raises(ValueError, match="not a prompt encoding"):
    build_model(tiny_config()).loss(latents(1), encode(encoder, ["two 4s"]), jax.random.key(0))
  with pytest.raises(ValueError, match="empty prompt's encoding"):
    model.loss(latents(1), encode(encoder, ["two 4s"]), jax.random.key(0))  # dropout on, no null


def test_dropout_replaces_the_condition_by_the_empty_prompt(model, encoder):
  cond, null = encode(encoder, ["a 3 to the left of a 7", "two 4s"]), encode(encoder, [""])
  kept = drop_text(cond, null, 0.0, jax.random.key(0))
  dropped = drop_text(cond, null, 1.0, jax.random.key(0))
  for k, d, c, n in zip(kept, dropped, cond, null):
    np.testing.assert_array_equal(np.asarray(k), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(d), np.broadcast_to(np.asarray(n), c.shape))
  # The training loss with every condition dropped is the loss of the empty prompt.
  rng = jax.random.key(3)
  model.text_drop_prob = 1.0
  try:
    all_dropped, _ = model.loss(latents(2), cond, rng, null=null)
  finally:
    model.text_drop_prob = text_config().text.drop_prob
  empty = TextEncoding(*(jnp.broadcast_to(x, (2, *x.shape[1:])) for x in null))
  model.text_drop_prob = 0.0
  try:
    as_empty, _ = model.loss(latents(2), empty, rng, null=null)
  finally:
    model.text_drop_prob = text_config().text.drop_prob
  assert float(all_dropped) == float(as_empty)
  # (At initialisation the flow head's output layer is zero, so the loss alone cannot tell prompts apart.)
  z_prompt, _ = model.teacher_forced_z(latents(2), cond)
  z_empty, _ = model.teacher_forced_z(latents(2), empty)
  assert not np.allclose(np.asarray(z_prompt), np.asarray(z_empty))


def test_text_loss_decreases(encoder):
  config = text_config()
  model = build_model(config, seed=1)
  cond = encode(encoder, ["a 3 to the left of a 7", "two 4s", "a 5 above a 2", "a pair of 4s"])
  null = encode(encoder, [""])
  x = latents(4, seed=5)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, i):
    def loss(p):
      return nnx.merge(graphdef, p).loss(x, cond, jax.random.fold_in(jax.random.key(0), i), null=null)[0]
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value

  values = []
  for i in range(30):
    params, opt, value = step(params, opt, i)
    values.append(float(value))
  assert np.mean(values[-5:]) < 0.8 * np.mean(values[:5]), values


@pytest.fixture(scope="module")
def sampler(encoder):
  """A prompt sampler over a text model whose parameters are perturbed (at initialisation the flow head's
  output layer is zero, so no condition could change an image)."""
  config = text_config()
  model = build_model(config, seed=0)
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                                 for x, k in zip(leaves, keys)]))
  return prompt_sampler(model, build_vae(config), encoder, settings_from(config), latent_scale=1.0)


def test_sampler_guides_against_the_empty_prompt(sampler, encoder):
  null = null_encoding(encoder)
  for got, want in zip(sampler.sampler._null, encode(encoder, [""])):
    np.testing.assert_array_equal(got, np.asarray(want))
  assert null.states.shape == (1, encoder.context_length, encoder.width)


def test_sample_from_prompts(sampler):
  prompts = ["a 3 to the left of a 7", "two 4s", "a 3 to the left of a 7"]
  images = generate_from_prompts(sampler, prompts, seed=0, batch_size=2)
  assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
  again = sampler(prompts[:1], seed=0)
  np.testing.assert_array_equal(images[0], again[0])  # sample i's noise comes from (seed, i) alone
  other = sampler(["two 4s"], seed=0)
  assert not np.array_equal(again, other)  # the prompt changes the image


def test_prompt_errors(sampler, tmp_path):
  with pytest.raises(ValueError, match="unknown token 'zebra'"):
    sampler(["a zebra"], seed=0)
  with pytest.raises(ValueError, match="longer than the context"):
    sampler(["a 3 to the left of a 7 to the right of a 9"], seed=0)
  with pytest.raises(ValueError, match="non-empty text"):
    sampler(["  "], seed=0)
  with pytest.raises(ValueError, match="class labels"):
    sampler.sampler(np.array([1, 2]), seed=0)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    read_prompts_file(str(tmp_path / "missing.txt"))
  (tmp_path / "blank.txt").write_text("\n  \n")
  with pytest.raises(ValueError, match="holds no prompts"):
    read_prompts_file(str(tmp_path / "blank.txt"))
  (tmp_path / "two.txt").write_text("two 4s\n\na 5 above a 2\n")
  assert read_prompts_file(str(tmp_path / "two.txt")) == ["two 4s", "a 5 above a 2"]


def test_sample_command_refuses_prompts_for_a_class_run_and_labels_for_a_text_run(tmp_path):
  class_config = tiny_config()
  with pytest.raises(ValueError, match="class-conditional"):
    sample_command.run(class_config, str(tmp_path), seed=0, prompts=["two 4s"])
  with pytest.raises(ValueError, match="text-conditional"):
    sample_command.run(text_config(), str(tmp_path), seed=0, labels=[1])
  with pytest.raises(ValueError, match="exclude each other"):
    sample_command.run(text_config(), str(tmp_path), seed=0, labels=[1], prompts=["two 4s"])


def test_text_config_round_trips_and_errors_name_the_key():
  config = text_config()
  validate_config(config)
  restored = config_from_dict(config.to_dict())
  assert restored.text.to_dict() == config.text.to_dict()
  for key, value, match in (("text.encoder", "bert", "text.encoder"), ("text.max_length", 600, "text.max_length"),
                            ("text.drop_prob", 1.0, "text.drop_prob"), ("eval.every_steps", 10, "eval.every_steps")):
    bad = text_config()
    section, name = key.split(".")
    bad[section][name] = value
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
      validate_config(bad)
  orphan = tiny_config()
  orphan.unlock()
  orphan.text = text_config().text
  with pytest.raises(ValueError, match=r"config\.text\.encoder"):  # a text section needs conditioning 'text'
    validate_config(orphan)


def reduced_text_preset():
  """configs/flowar_s_text.py (CLIP-L/14 widths, 77 tokens) with a tiny backbone, head and VAE at 64 px, on
  data 2 x fsdp 2: what the preset compiles, at a size CI can afford."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "flowar_s_text.py")
  spec = importlib.util.spec_from_file_location("flowar_s_text", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.stage = "flowar"
  c.batch_size, c.sampling.batch_size, c.sampling.num_steps = 8, 4, 2
  c.mesh.data, c.mesh.fsdp = 2, 2
  c.data.image_size = 64
  c.model.scales = (1, 2, 4)
  c.model.width, c.model.depth, c.model.num_heads = 64, 1, 2
  c.model.head.width, c.model.head.depth, c.model.head.head_dim = 64, 1, 32
  c.vae.base_channels, c.vae.norm_groups, c.vae.encoder_blocks, c.vae.decoder_blocks = 8, 8, 1, 1
  return c


@pytest.mark.tpu_aot
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (the tpu extra)")
def test_reduced_text_preset_compiles_for_v5e_2x2():
  from flowar_jax.commands import compile as compile_command  # pylint: disable=g-import-not-at-top
  config = reduced_text_preset()
  report = compile_command.compile_for_topology(config, "v5e:2x2")
  assert [p.name for p in report.programs] == ["flowar train step", "sampler"]
  assert report.fits
  # The new parameters have mesh rules: the prompt projections' rows ('text') stay whole, 'embed' is split
  # over fsdp like every other kernel.
  plan = compile_command.topology_plan(config, "v5e:2x2")
  model = nnx.eval_shape(lambda: build_model(config))
  shardings = plan.shardings(nnx.state(model, nnx.Param))
  assert tuple(shardings["text_cond"]["states_proj"]["kernel"].spec) == (None, "fsdp")
  assert tuple(shardings["backbone"]["encoder_blocks"][0]["cross_attn"]["kv"]["kernel"].spec) == ("fsdp", None)


def test_a_text_run_trains_and_samples_from_prompts_and_files(text_run, tmp_path):
  config, workdir = text_run
  written = json.loads(open(os.path.join(workdir, "samples", "prompts.json")).read())
  assert len(written["prompts"]) == 8 and len(written["per_image"]) == 8  # train's samples from eval captions
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("two 4s\n\na 5 above a 2\n")
  images, per_image = sample_command.run(config, workdir, seed=0, prompts=["a 4 to the left of a 9"],
                                         prompts_file=str(prompts_file), num_samples=2, num_steps=2)
  assert images.shape == (6, 16, 16, 3)
  assert per_image == ["a 4 to the left of a 9", "two 4s", "a 5 above a 2"] * 2
  with pytest.raises(ValueError, match="not in the vocabulary"):  # MiniLM's [UNK], refused when sampling
    sample_command.run(config, workdir, seed=0, prompts=["a 4 \N{SNOWMAN} a 9"], num_steps=2)
  with pytest.raises(ValueError, match="tokens long"):  # over text.max_length = 16, without truncation
    sample_command.run(config, workdir, seed=0, prompts=["a 4 to the left of a 9 " * 3], num_steps=2)


def test_truncation_is_documented_behaviour(text_run):
  config, _ = text_run
  from flowar_jax.text.registry import build_text_encoder  # pylint: disable=g-import-not-at-top
  truncating = config_from_dict(config.to_dict())
  truncating.text.truncate = True
  encoder = build_text_encoder(truncating.text)
  tokens = encoder.tokenize(["a 4 to the left of a 9 " * 3])
  assert tokens.mask.sum() == truncating.text.max_length  # cut to max_length, the end token kept


def test_evaluate_alignment_reports_seen_and_heldout_beside_real(text_run, tmp_path, capsys):
  from flowar_jax.commands import evaluate  # pylint: disable=g-import-not-at-top
  config, workdir = text_run
  report = evaluate.run(config, workdir, num_samples=8, seed=0, settings=settings_from(config, num_steps=2),
                        batch_size=8, metrics=("alignment",))
  metrics = report["metrics"]
  assert metrics["alignment_num_seen"] == 4 and metrics["alignment_num_heldout"] == 4
  for key in ("alignment", "alignment_seen", "alignment_heldout", "alignment_real", "alignment_real_heldout"):
    assert 0.0 <= metrics[key] <= 1.0, key
  assert metrics["alignment_real"] > 0.5  # the classifier reads real compositions
  assert "alignment_heldout" in capsys.readouterr().out
  with pytest.raises(ValueError, match="runs alone"):
    evaluate.run(config, workdir, num_samples=8, seed=0, settings=settings_from(config), batch_size=8,
                 metrics=("alignment", "fid"))
