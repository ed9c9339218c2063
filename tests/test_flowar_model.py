"""FlowAR backbone and flow head: preset sizes, masks, KV-cache equivalence, the loss."""
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from flowar_jax.config import validate_config
from flowar_jax.models.flow_head import _frequency_table, timestep_frequencies
from flowar_jax.models.flowar import FlowAR
from flowar_jax.scales import teacher_forcing_inputs

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def param_count(config) -> int:
  model = nnx.eval_shape(lambda: FlowAR(config.model, config.vae.latent_channels, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("preset,expected_millions", [("flowar_s", 171.72), ("flowar_b", None),
                                                       ("flowar_l", 586.86), ("flowar_h", 1913.32)])
def test_preset_parameter_counts(preset, expected_millions):
  config = load_config(preset)
  validate_config(config)
  n = param_count(config)
  if expected_millions is None:  # FlowAR-B: "about 300M" in the paper
    assert 250e6 < n < 350e6
  else:
    assert round(n / 1e6, 2) == expected_millions


@pytest.mark.parametrize("preset", ["flowar_s", "flowar_l", "flowar_h", "digits"])
def test_preset_shapes_via_eval_shape(preset):
  config = load_config(preset)
  side = config.model.scales[-1]
  c = config.vae.latent_channels

  def loss():
    model = FlowAR(config.model, c, rngs=nnx.Rngs(0))
    return model.loss(jnp.zeros((2, side, side, c)), jnp.zeros((2,), jnp.int32), jax.random.key(0))

  total, metrics = jax.eval_shape(loss)
  assert total.shape == () and total.dtype == jnp.float32
  assert set(metrics) == {"loss"} | {f"loss_scale_{s}" for s in config.model.scales}


def perturbed(model: FlowAR, seed: int = 6) -> FlowAR:
  """`model` with every parameter moved by noise: the zero-initialised output layer would otherwise make the
  head's prediction, and so the loss, independent of everything before it."""
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return nnx.merge(graphdef, jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape)
                                                       for l, k in zip(leaves, keys)]))


@pytest.fixture(params=["v1", "v2"])
def model_and_data(request):
  config = tiny_config(request.param)
  model = FlowAR(config.model, 4, rngs=nnx.Rngs(0))
  latents = jax.random.normal(jax.random.key(1), (3, 4, 4, 4))
  labels = jnp.array([1, 2, 10])  # 10 is the null class
  return model, latents, labels


def test_kv_cached_pass_equals_masked_full_pass(model_and_data):
  model, latents, labels = model_and_data
  z_full, targets = model.teacher_forced_z(latents, labels)
  class_emb = model.class_embedding(labels)
  tokens = model.backbone.embed_inputs(class_emb, teacher_forcing_inputs(targets, model.schedule))
  caches, parts = None, []
  offsets = model.schedule.offsets
  for k in range(model.schedule.num_scales):
    z_k, caches = model.backbone.cached_step(k, tokens[:, offsets[k]:offsets[k + 1]], class_emb, caches)
    parts.append(z_k)
  np.testing.assert_allclose(jnp.concatenate(parts, axis=1), z_full, rtol=1e-5, atol=1e-5)


def test_scale_causality_of_backbone(model_and_data):
  """Changing the finest latent changes no z of coarser scales (the mask holds end to end)."""
  model, latents, labels = model_and_data
  z1, _ = model.teacher_forced_z(latents, labels)
  z2, _ = model.teacher_forced_z(latents.at[:, 3, 3].add(5.0), labels)
  o = model.schedule.offsets
  # Scale 2's *input* comes from scale 1, which averages the changed pixel; scale 0's does not depend on it.
  np.testing.assert_allclose(z1[:, :o[1]], z2[:, :o[1]], atol=1e-6)
  assert np.abs(np.asarray(z1[:, o[1]:] - z2[:, o[1]:])).max() > 1e-4


def test_loss_weights_per_scale(model_and_data):
  model, latents, labels = model_and_data
  total, metrics = model.loss(latents, labels, jax.random.key(3))
  expected = sum(metrics[f"loss_scale_{s}"] * s * s / 16 for s in (1, 2, 4))
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  assert np.isfinite(float(total))


DROPOUT_KINDS = {"labels": ("label_drop_prob",), "network": ("attn_dropout", "proj_dropout")}


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("kind", sorted(DROPOUT_KINDS))
def test_loss_dropout_only_in_training(variant, kind):
  """Each kind of dropout on its own: with the same key, train=True drops (the loss moves) and train=False is
  the model with that rate at zero, so dropout left on in evaluation fails whichever kind it is."""
  config = tiny_config(variant)
  for name in ("label_drop_prob", "attn_dropout", "proj_dropout"):
    config.model[name] = 0.5 if name in DROPOUT_KINDS[kind] else 0.0  # 0.5: 8 labels keep all with p 0.004
  model = perturbed(FlowAR(config.model, 4, rngs=nnx.Rngs(0)))
  latents = jax.random.normal(jax.random.key(1), (8, 4, 4, 4))
  labels = jnp.arange(8) % 10
  key = jax.random.key(4)
  trained = model.loss(latents, labels, key, train=True)[0]
  evaluated = model.loss(latents, labels, key, train=False)[0]
  assert float(trained) != float(evaluated)
  for name in DROPOUT_KINDS[kind]:
    config.model[name] = 0.0
  no_dropout = perturbed(FlowAR(config.model, 4, rngs=nnx.Rngs(0)))  # the same parameters
  np.testing.assert_array_equal(no_dropout.loss(latents, labels, key, train=True)[0], evaluated)


def test_head_velocity_shape_and_zero_init(model_and_data):
  model, _, _ = model_and_data
  x = jax.random.normal(jax.random.key(0), (2, 4, 4))
  z = jax.random.normal(jax.random.key(1), (2, 4, 32))
  v = model.flownet(x, jnp.array([0.3, 0.9]), z)
  assert v.shape == (2, 4, 4)
  np.testing.assert_array_equal(v, 0.0)  # the final linear starts at zero, as upstream


def test_head_rejects_non_square_token_count(model_and_data):
  model, _, _ = model_and_data
  with pytest.raises(ValueError, match="s\\*s tokens"):
    model.flownet(jnp.zeros((1, 5, 4)), jnp.zeros((1,)), jnp.zeros((1, 5, 32)))


def test_timestep_embedding_uses_integer_steps():
  # int(1000 t): 0.3004 and 0.3009 both map to step 300
  e = timestep_frequencies(jnp.array([0.3004, 0.3009, 0.301]))
  np.testing.assert_array_equal(e[0], e[1])
  assert not np.allclose(e[0], e[2])
  np.testing.assert_allclose(e[0, 0], np.cos(300.0), rtol=1e-5)
  np.testing.assert_allclose(e[0, 128], np.sin(300.0), rtol=1e-4, atol=1e-5)


def test_timestep_frequencies_are_correctly_rounded():
  # The argument is up to 1000 x a frequency: each frequency must be the float32 nearest exp of the official
  # float32 exponent -ln(10000) * i / 128.
  table = _frequency_table(128, 10000.0)
  exponents = np.float32(-np.log(10000.0)) * np.arange(128, dtype=np.float32) / np.float32(128)
  exact = np.exp(exponents.astype(np.float64))
  assert table.dtype == np.float32
  assert np.all(np.abs(table - exact) <= 0.5 * np.spacing(table) * (1 + 1e-6))
  e = timestep_frequencies(jnp.array([1.0]))
  np.testing.assert_allclose(e[0, :128], np.cos((np.float32(1000.0) * table).astype(np.float64)), atol=1e-6)


def test_gradients_reach_every_parameter(model_and_data):
  """Every parameter gets a non-zero gradient once the zero-initialised output layer is perturbed (at init
  only the final layer would)."""
  model, latents, labels = model_and_data
  graphdef, params = nnx.split(perturbed(model), nnx.Param)

  def loss(p):
    return nnx.merge(graphdef, p).loss(latents, labels, jax.random.key(5), train=False)[0]

  grads = jax.grad(loss)(params)
  norms = {jax.tree_util.keystr(k): float(jnp.abs(g).sum()) for k, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert len(norms) > 20
  assert all(np.isfinite(v) for v in norms.values())
  silent = sorted(k for k, v in norms.items() if v == 0)
  assert not silent, silent