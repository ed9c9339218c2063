"""Training VAR's multi-scale VQ tokenizer: the straight-through quantisation, its losses and gradients, codebook
usage and dead-code restarts, and the stage end to end (checkpoints, resume, loading the trained VQVAE)."""
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import persistent_compilation_cache
from flowar_jax.config import base_config
from flowar_jax.models.params import flat_params
from flowar_jax.runs.loaders import load_params
from flowar_jax.runs.metrics import read_metrics
from flowar_jax.runs.workdir import find_vae_checkpoints, vae_dir
from flowar_jax.tokenizers import MultiScaleVQVAE, phi_index
from flowar_jax.training import codebook
from flowar_jax.training.vq_loss import vq_loss
from flowar_jax.training.vq_stage import check_vq_config, train_vq, vq_stage_loss, vq_trainable

# Stride 2 (ch_mult (1, 2)): the last scale 4 is an 8 px image. ch 32: the official GroupNorm has 32 groups.
TINY_VQ = dict(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, quant_resi=0.5,
               share_quant_resi=4, using_znorm=False, quant_conv_ks=3, patch_nums=(1, 2, 4))
TRAIN = dict(batch_size=8, num_train_steps=4, learning_rate=1e-3, warmup_steps=1, l1_weight=1.0, l2_weight=1.0,
             commitment_weight=0.25, usage_decay=0.99, restart_every_steps=3, dead_code_threshold=0.03)


def vq_config(**train):
  c = base_config()
  c.unlock()
  c.data.update(name="digits", image_size=8, resize_size=0, random_crop=False, random_flip=False)
  c.vae = ml_collections.ConfigDict(TINY_VQ)
  c.vae.train = ml_collections.ConfigDict(dict(TRAIN, **train))
  c.model.name = "var"  # the registry builds the tokenizer of the model it names
  c.checkpoint_every_steps, c.keep_checkpoints, c.log_every_steps = 2, 3, 1
  return c


def _randomized(model, seed):
  keys = iter(jax.random.split(jax.random.key(seed), 200))
  nnx.update(model, jax.tree.map(lambda p: 0.3 * jax.random.normal(next(keys), p.shape), nnx.state(model, nnx.Param)))
  return model


@pytest.fixture(scope="module")
def vq():
  return _randomized(MultiScaleVQVAE(**TINY_VQ, rngs=nnx.Rngs(0)), 1)


def _features(seed=0, batch=3):
  return jax.random.normal(jax.random.key(seed), (batch, 4, 4, TINY_VQ["z_channels"]))


def test_training_quantisation_has_the_inference_values(vq):
  f = _features()
  indices, f_hats = vq.quantize.quantize(f)
  q = vq.quantize.quantize_for_training(f)
  for got, want in zip(q.indices, indices):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(q.f_hat), np.asarray(f_hats[-1]))
  # The losses compare f_hat after each scale with f, averaged over the scales.
  mse = np.mean([np.mean(np.square(np.asarray(fh - f))) for fh in f_hats])
  np.testing.assert_allclose(float(q.codebook_loss), mse, rtol=1e-6)
  np.testing.assert_allclose(float(q.commitment_loss), mse, rtol=1e-6)
  # The residuals are what each scale quantised: their nearest codes are the indices.
  for z, idx in zip(q.residuals, indices):
    np.testing.assert_array_equal(np.asarray(vq.quantize.nearest(z)), np.asarray(idx).reshape(-1))


def test_straight_through_and_loss_gradients(vq):
  f = _features(1)
  weights = jax.random.normal(jax.random.key(2), f.shape)
  graphdef, params = nnx.split(vq.quantize)

  def grads(term):
    def fn(params, f):
      q = nnx.merge(graphdef, params).quantize_for_training(f)
      return {"f_hat": jnp.sum(q.f_hat * weights), "codebook": q.codebook_loss,
              "commitment": q.commitment_loss}[term]
    return jax.grad(fn, argnums=(0, 1))(params, f)

  (p_grad, f_grad) = grads("f_hat")
  np.testing.assert_array_equal(np.asarray(f_grad), np.asarray(weights))  # identity to the features
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(p_grad))  # nothing to the codebook
  p_grad, f_grad = grads("codebook")
  assert float(jnp.abs(f_grad).max()) == 0.0
  flat = flat_params(p_grad)
  used_rows = np.unique(np.concatenate([np.asarray(i).ravel() for i in vq.quantize.quantize(f)[0]]))
  rows = np.abs(np.asarray(flat["embedding.embedding"])).sum(-1)
  assert (rows[used_rows] > 0).all() and (np.delete(rows, used_rows) == 0).all()
  used_phis = {phi_index(k, 3, vq.quantize.num_phi) for k in range(3)}
  for name, g in flat.items():
    if name.startswith("quant_resi."):
      assert (float(jnp.abs(g).max()) > 0) == (int(name.split(".")[1]) in used_phis), name
  p_grad, f_grad = grads("commitment")
  assert float(jnp.abs(f_grad).max()) > 0
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(p_grad))


def test_vq_loss_reaches_every_used_parameter(vq):
  images = jax.random.uniform(jax.random.key(3), (2, 8, 8, 3), minval=-1, maxval=1)
  train = ml_collections.ConfigDict(TRAIN)
  graphdef, params = nnx.split(vq)
  loss, grads = jax.value_and_grad(lambda p: vq_loss(nnx.merge(graphdef, p), images, train)[0])(params)
  assert np.isfinite(float(loss))
  used_phis = {phi_index(k, 3, vq.quantize.num_phi) for k in range(3)}
  zero = {name for name, g in flat_params(grads).items() if float(jnp.abs(g).max()) == 0.0}
  assert zero == {f"quantize.quant_resi.{i}.conv.{p}" for i in range(vq.quantize.num_phi) if i not in used_phis
                  for p in ("bias", "kernel")}


def test_usage_and_perplexity_on_a_known_hit_pattern():
  # Codes 0-3 take 3/4 of the hits evenly, code 4 the rest, codes 5-7 none: rates 1.5 / 2 / 0 of the fair share.
  hits = jnp.array([6.0, 6.0, 6.0, 6.0, 8.0, 0.0, 0.0, 0.0])
  np.testing.assert_allclose(np.asarray(codebook.relative_rate(hits)), [1.5] * 4 + [2.0, 0, 0, 0])
  rate = weight = jnp.zeros(8)
  for _ in range(3):
    rate, weight = codebook.update_usage(rate, weight, hits, 0.9)
  np.testing.assert_allclose(np.asarray(weight), 1 - 0.9 ** 3, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(codebook.usage(rate, weight)), [1.5] * 4 + [2.0, 0, 0, 0], rtol=1e-6)
  assert np.asarray(codebook.alive(rate, weight, 0.03)).tolist() == [True] * 5 + [False] * 3
  p = np.array([0.1875] * 4 + [0.25])
  np.testing.assert_allclose(float(codebook.perplexity(hits)), np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
  np.testing.assert_allclose(float(codebook.perplexity(jnp.ones(8))), 8.0, rtol=1e-6)
  assert np.asarray(codebook.code_hits([jnp.array([[0, 1]]), jnp.array([[1, 1, 3, 0]])], 5)).tolist() == \
      [2, 3, 0, 1, 0]


def test_post_update_tracks_usage_and_restarts_dead_codes_when_due():
  config = vq_config(restart_every_steps=2, usage_decay=0.5, dead_code_threshold=0.5)
  model = vq_trainable(config)
  update = codebook.codebook_update(config.vae.train)
  before = np.asarray(model.vae.quantize.embedding.embedding[...])
  # Code 3 gets a quarter of the fair share (dead at threshold 0.5), codes 9-15 none, the rest more.
  hits = jnp.array([4.0] * 3 + [1.0] + [4.0] * 5 + [0.0] * 7)
  candidates = jax.random.normal(jax.random.key(0), (16, 4))
  metrics = update(model, {"l1": 1.0, codebook.HITS: hits, codebook.CANDIDATES: candidates}, jnp.array(0))
  assert set(metrics) == {"l1", "codebook_usage", "codebook_perplexity", "codebook_restarted",
                          "codebook_restarted_total"}
  assert float(metrics["codebook_usage"]) == 8 / 16 and int(metrics["codebook_restarted"]) == 0
  np.testing.assert_array_equal(np.asarray(model.vae.quantize.embedding.embedding[...]), before)
  metrics = update(model, {codebook.HITS: hits, codebook.CANDIDATES: candidates}, jnp.array(1))  # step 2: due
  dead = np.array([False] * 3 + [True] + [False] * 5 + [True] * 7)
  assert float(metrics["codebook_usage"]) == 8 / 16  # measured before the restart
  assert int(metrics["codebook_restarted"]) == 8 and float(metrics["codebook_restarted_total"]) == 8
  after = np.asarray(model.vae.quantize.embedding.embedding[...])
  np.testing.assert_array_equal(after[dead], np.asarray(candidates)[dead])
  np.testing.assert_array_equal(after[~dead], before[~dead])
  assert (np.asarray(model.codebook_stats.weight[...])[dead] == 0).all()
  assert (np.asarray(model.codebook_stats.weight[...])[~dead] == 0.75).all()


def test_a_dead_code_is_restarted_from_the_batch_residuals():
  """A code placed far from every feature never wins; when due, the update moves it onto a residual that the
  batch quantised (the stage's loss function draws the candidates)."""
  config = vq_config(restart_every_steps=2)
  model = vq_trainable(config)
  embedding = model.vae.quantize.embedding.embedding
  far = 1e3 * np.ones(4, np.float32)
  embedding[...] = embedding[...].at[5].set(far)
  loss_fn, update = vq_stage_loss(config.vae.train, 16), codebook.codebook_update(config.vae.train)
  images = jax.random.uniform(jax.random.key(1), (8, 8, 8, 3), minval=-1, maxval=1)

  @nnx.jit
  def step(model, step):
    _, metrics = loss_fn(model, {"image": images}, jax.random.key(step), None, step)
    residuals = model.vae.quantize.quantize_for_training(model.vae.features(images)).residuals
    return update(model, dict(metrics), step), metrics[codebook.HITS], jnp.concatenate(residuals)

  metrics, hits, _ = step(model, jnp.array(0))
  assert float(hits[5]) == 0 and int(metrics["codebook_restarted"]) == 0
  np.testing.assert_array_equal(np.asarray(embedding[...])[5], far)
  metrics, hits, residuals = step(model, jnp.array(1))  # the second step: due
  assert float(hits[5]) == 0 and float(metrics["codebook_usage"]) < 1
  assert int(metrics["codebook_restarted"]) == int(np.sum(np.asarray(codebook.usage(
      model.codebook_stats.rate[...], model.codebook_stats.weight[...])) == 0))  # restarted codes start at 0
  code = np.asarray(embedding[...])[5]
  assert np.abs(np.asarray(residuals) - code).max(axis=1).min() == 0.0  # code 5 is now one of the residuals
  assert float(model.codebook_stats.weight[...][5]) == 0.0


def test_config_errors_name_the_key():
  config = vq_config()
  del config.vae.train["usage_decay"]
  with pytest.raises(ValueError, match="usage_decay"):
    check_vq_config(config)
  with pytest.raises(ValueError, match="restart_every_steps must be >= 0"):
    check_vq_config(vq_config(restart_every_steps=-1))
  config = vq_config()
  config.data.image_size = 16
  with pytest.raises(ValueError, match="image_size 16 != last scale x tokenizer stride = 8"):
    check_vq_config(config)


def test_stage_trains_resumes_exactly_and_loads_as_a_vqvae(tmp_path, compilation_cache_dir):
  """4 steps with restarts at step 3; dropping checkpoint 4 and training again resumes from step 2 (usage
  statistics included) and reproduces step 4 exactly. The result loads as a plain MultiScaleVQVAE."""
  config = vq_config(dead_code_threshold=1.0)  # codes below a fair share are dead: restarts are certain
  workdir = str(tmp_path / "run")
  with persistent_compilation_cache(compilation_cache_dir):  # the resumed run loads the same train step
    train_vq(config, vae_dir(config, workdir))
  stage = os.path.join(workdir, "vae")
  records = [r for r in read_metrics(stage) if "loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert all(0 <= r["codebook_usage"] <= 1 and 1 <= r["codebook_perplexity"] <= 16 for r in records)
  assert [r["codebook_restarted"] > 0 for r in records] == [False, False, True, False]
  assert records[-1]["codebook_restarted_total"] == records[2]["codebook_restarted"]
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, "vae", "checkpoints", "4"))
  with persistent_compilation_cache(compilation_cache_dir):
    train_vq(config, vae_dir(config, copy))
  factory = functools.partial(vq_trainable, config, config.seed)
  a = flat_params(load_params(factory, find_vae_checkpoints(config, workdir), use_ema=False))
  b = flat_params(load_params(factory, find_vae_checkpoints(config, copy), use_ema=False))
  assert float(a["codebook_stats.restarted"]) > 0
  for name in a:
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
  vqvae = load_params(factory, find_vae_checkpoints(config, workdir), use_ema=False).vae
  assert isinstance(vqvae, MultiScaleVQVAE)
  np.testing.assert_array_equal(np.asarray(vqvae.quantize.embedding.embedding[...]),
                                np.asarray(a["vae.quantize.embedding.embedding"]))
  images = jnp.zeros((1, 8, 8, 3))
  assert vqvae.reconstruct(images).shape == (1, 8, 8, 3)
