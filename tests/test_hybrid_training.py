"""Training HART's hybrid tokenizer in the VQ stage: the alternating paths' objective against HART's training
forward, the residual statistics, the path draw, the config errors, and a short seeded run end to end."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from flowar_jax import data
from flowar_jax.config import base_config
from flowar_jax.runs.loaders import load_params
from flowar_jax.runs.metrics import read_metrics
from flowar_jax.runs.workdir import find_vae_checkpoints, vae_dir
from flowar_jax.tokenizers import MultiScaleVQVAE
from flowar_jax.tokenizers.hybrid import HybridTokenizer
from flowar_jax.tokenizers.vq_trainable import VQTrainable, vqvae_kwargs
from flowar_jax.training.vq_loss import hybrid_vq_loss
from flowar_jax.training.vq_stage import check_vq_config, train_vq, vq_stage_loss

# var_digits' tokenizer layout shrunk: stride 2, scales 1, 2, 4 on 8 px digits.
TINY_VQ = dict(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, quant_resi=0.5,
               share_quant_resi=4, using_znorm=False, quant_conv_ks=3, patch_nums=(1, 2, 4))
TRAIN = dict(batch_size=16, num_train_steps=40, learning_rate=3e-3, warmup_steps=5, l1_weight=1.0, l2_weight=1.0,
             commitment_weight=0.25, usage_decay=0.99, restart_every_steps=10, dead_code_threshold=0.03,
             skip_continuous_prob=0.5)


def hybrid_config(**train):
  c = base_config()
  c.unlock()
  c.data.update(name="digits", image_size=8, resize_size=0, random_crop=False, random_flip=False)
  c.vae = ml_collections.ConfigDict(TINY_VQ)
  c.vae.train = ml_collections.ConfigDict(dict(TRAIN, **train))
  c.model.name = "var"
  c.checkpoint_every_steps, c.keep_checkpoints, c.log_every_steps = 40, 1, 1
  return c


def hybrid_trainable(config, seed=0) -> VQTrainable:
  return VQTrainable(HybridTokenizer(**vqvae_kwargs(config.vae), rngs=nnx.Rngs(seed)))


PATH = {False: "discrete", True: "continuous"}


def _images(seed=0, batch=4):
  return jax.random.uniform(jax.random.key(seed), (batch, 8, 8, 3), minval=-1, maxval=1)


@nnx.jit
def probe(tokenizer: HybridTokenizer, images: jax.Array) -> dict:
  """Both paths' objective (ours and HART's `training_forward` scored with the same L1 + L2), both
  reconstructions, and the residual; one compiled program for every tokenizer of the module."""
  train = ml_collections.ConfigDict(TRAIN)
  out = {}
  for continuous in (False, True):
    loss, metrics, quantized = hybrid_vq_loss(tokenizer, images, train, continuous)
    f_hat, vq, _ = tokenizer.training_forward(tokenizer.features(images), continuous,
                                               beta=train.commitment_weight)
    error = tokenizer.decoder(tokenizer.post_quant_conv(f_hat)) - images
    harts = jnp.mean(jnp.abs(error)) + jnp.mean(jnp.square(error)) + vq
    out[PATH[continuous]] = dict(loss=loss, metrics=metrics, harts=harts,
                                 recon=tokenizer.reconstruct_hybrid(images, continuous=continuous))
  out.update(residual=tokenizer.residual(tokenizer.encode(images)), features=tokenizer.features(images),
             training_residual=tokenizer.training_residual(quantized))
  return out


@pytest.fixture(scope="module")
def heldout():
  return jnp.asarray(next(data.make_eval_batches(hybrid_config().data, 16))["image"])


@pytest.fixture(scope="module")
def untrained(heldout):
  return jax.device_get(probe(hybrid_trainable(hybrid_config()).vae, heldout))


def test_objective_is_harts_training_forward_plus_reconstruction(untrained):
  """On either path the loss equals HART's `training_forward` (beta = commitment_weight) decoded and scored with
  the VQ stage's L1 + L2; the two paths' losses differ."""
  for continuous in (False, True):
    got = untrained[PATH[continuous]]
    np.testing.assert_allclose(float(got["loss"]), float(got["harts"]), rtol=1e-5)
    assert float(got["metrics"]["continuous"]) == float(continuous)
  assert float(untrained["discrete"]["metrics"]["l2"]) != float(untrained["continuous"]["metrics"]["l2"])


def test_residual_statistics_are_of_the_heads_target(untrained):
  residual = np.asarray(untrained["residual"]).reshape(-1, TINY_VQ["z_channels"])
  np.testing.assert_allclose(np.asarray(untrained["training_residual"]), residual, atol=1e-6)
  f = np.asarray(untrained["features"])
  for continuous in (False, True):
    metrics = untrained[PATH[continuous]]["metrics"]
    np.testing.assert_allclose(float(metrics["residual_abs"]), np.abs(residual).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["residual_energy_share"]),
                               np.square(residual).sum() / np.square(f).sum(), rtol=1e-5)
  assert float(untrained["discrete"]["metrics"]["residual_energy_share"]) > 0


def test_the_path_is_drawn_with_skip_continuous_prob():
  config = hybrid_config(skip_continuous_prob=0.25)
  model = hybrid_trainable(config)
  loss_fn = vq_stage_loss(config.vae.train, TINY_VQ["vocab_size"])
  images = _images(2, 1)
  draw = nnx.jit(jax.vmap(lambda rng: loss_fn(model, {"image": images}, rng, None, 0)[1]["continuous"]))
  paths = np.asarray(draw(jax.random.split(jax.random.key(0), 200)))
  assert set(paths.tolist()) == {0.0, 1.0}
  assert 0.65 < paths.mean() < 0.85  # 0.75 expected; 200 draws give a standard error of 0.031


def test_skip_continuous_prob_is_required_for_a_hybrid_tokenizer_only():
  config = hybrid_config()
  del config.vae.train["skip_continuous_prob"]
  hybrid = nnx.eval_shape(lambda: hybrid_trainable(config)).vae
  with pytest.raises(ValueError, match="skip_continuous_prob is missing"):
    check_vq_config(config, hybrid)
  loss_fn = vq_stage_loss(config.vae.train, TINY_VQ["vocab_size"])
  with pytest.raises(ValueError, match="skip_continuous_prob is missing"):
    loss_fn(hybrid_trainable(config), {"image": _images()}, jax.random.key(0), None, 0)
  check_vq_config(config)  # the registry's VQVAE trains without it
  check_vq_config(config, nnx.eval_shape(lambda: MultiScaleVQVAE(**TINY_VQ, rngs=nnx.Rngs(0))))
  with pytest.raises(ValueError, match=r"skip_continuous_prob must be a probability in \[0, 1\], got 1.5"):
    check_vq_config(hybrid_config(skip_continuous_prob=1.5), hybrid)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = hybrid_config()
  workdir = str(tmp_path_factory.mktemp("hybrid"))
  factory = functools.partial(hybrid_trainable, config, config.seed)
  train_vq(config, vae_dir(config, workdir), model_factory=factory)
  model = load_params(factory, find_vae_checkpoints(config, workdir), use_ema=False)
  return config, factory, model, read_metrics(vae_dir(config, workdir))


def test_a_seeded_run_takes_both_paths_and_reports_the_statistics(trained):
  config, _, _, records = trained
  records = [r for r in records if "loss" in r]
  assert [r["step"] for r in records] == list(range(1, 41))
  for r in records:
    for key in ("l1", "l2", "vq_mse", "continuous", "residual_abs", "residual_energy_share", "codebook_usage",
                "codebook_perplexity", "codebook_restarted", "codebook_restarted_total"):
      assert np.isfinite(r[key]), (r["step"], key)
    assert 0 <= r["codebook_usage"] <= 1 and 1 <= r["codebook_perplexity"] <= TINY_VQ["vocab_size"]
    assert r["residual_abs"] > 0 and 0 < r["residual_energy_share"]
  paths = [r["continuous"] for r in records]
  assert set(paths) == {0.0, 1.0}
  # Each path's loss falls: its last five steps against its first five.
  for path in (0.0, 1.0):
    losses = [r["loss"] for r in records if r["continuous"] == path]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), (path, losses)


def test_after_training_hybrid_reconstructs_better_than_discrete_only(trained, untrained, heldout):
  """On held-out digits: both paths' losses fell, and decoding the residual too beats the discrete tokens."""
  after = jax.device_get(probe(trained[2].vae, heldout))
  for continuous in (False, True):
    assert float(after[PATH[continuous]]["loss"]) < float(untrained[PATH[continuous]]["loss"]), continuous
  discrete, hybrid, x = (np.asarray(a) for a in (after["discrete"]["recon"], after["continuous"]["recon"], heldout))
  assert np.abs(hybrid - discrete).max() > 1e-3
  assert np.square(hybrid - x).mean() < np.square(discrete - x).mean()
