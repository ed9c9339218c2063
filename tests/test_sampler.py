"""The sampler: time grid, guidance rules, determinism, and argument checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from flowar_jax.models.flowar import FlowAR
from flowar_jax.models.time_grid import time_grid
from flowar_jax.heads.flow_sampling import guided_velocity, integrate
from flowar_jax.sampling.sampler import Sampler, SamplingSettings, sample_keys, sample_latents


def test_official_time_grids():
  g25 = time_grid(25)
  assert len(g25) == 25  # 24 steps, as upstream
  np.testing.assert_allclose(g25[:12], np.linspace(1, 0.3, 12))
  np.testing.assert_allclose(g25[12:], np.linspace(0.25, 0, 13))
  np.testing.assert_allclose(time_grid(50), np.linspace(1, 0, 51))
  np.testing.assert_allclose(time_grid(1), [1.0, 0.0])
  assert np.all(np.diff(time_grid(7)) < 0) and time_grid(7)[-1] == 0.0


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_time_grid_rejects_bad_steps(bad):
  with pytest.raises(ValueError, match="num_steps"):
    time_grid(bad)


def constant_head(x, t, z):
  return jnp.ones_like(x) * z[..., :1]


def test_euler_integrates_constant_velocity_exactly():
  x0 = jax.random.normal(jax.random.key(0), (2, 4, 3))
  z = jnp.full((2, 4, 5), 0.5)
  out = integrate(constant_head, x0, z, None, 1.0, time_grid(25), guidance=1.0)
  np.testing.assert_allclose(out, x0 - 0.5, atol=1e-5)  # x(0) = x(1) - v


def test_guided_velocity_formula():
  x = jnp.zeros((2, 4, 3))
  v = guided_velocity(constant_head, x, 0.5, jnp.full((2, 4, 1), 2.0), jnp.full((2, 4, 1), 1.0), cfg=3.0)
  np.testing.assert_allclose(v, 1.0 + 3.0 * (2.0 - 1.0))


def test_guidance_interval_only_guides_late_steps():
  x0 = jnp.zeros((1, 1, 1))
  calls = []

  def head(x, t, z):
    calls.append(x.shape[0])
    return jnp.ones_like(x)

  grid = time_grid(10)  # 1, .825, .65, .475, .3, .25, ...
  integrate(head, x0, jnp.ones((1, 1, 1)), jnp.ones((1, 1, 1)), 2.0, grid, guidance=0.5)
  # Traced once per run of steps: an unguided run (batch 1) then a guided run (batch 2).
  assert calls == [1, 2]


@pytest.fixture(scope="module")
def model():
  return FlowAR(tiny_config().model, 4, rngs=nnx.Rngs(0))


def test_cfg_one_equals_guidance_never_applied(model):
  labels = jnp.array([0, 3])
  keys = sample_keys(0, 0, 2)
  a = sample_latents(model, labels, keys, SamplingSettings(cfg=1.0, num_steps=4))
  b = sample_latents(model, labels, keys, SamplingSettings(cfg=4.0, guidance=0.0, num_steps=4))
  np.testing.assert_allclose(a, b, atol=1e-6)


def _randomize(model):
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def test_sampling_with_and_without_cfg_differ_and_are_deterministic(model):
  model = _randomize(model)  # the zero-initialised head would make every branch equal
  labels = np.array([0, 3, 9])
  guided = Sampler(model, SamplingSettings(cfg=3.0, guidance=0.9, num_steps=4))
  plain = Sampler(model, SamplingSettings(cfg=1.0, num_steps=4))
  a, b = guided(labels, seed=1), guided(labels, seed=1)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (3, 4, 4, 4) and np.all(np.isfinite(a))
  assert not np.allclose(a, plain(labels, seed=1))
  assert not np.allclose(a, guided(labels, seed=2))
  # A sample depends on (seed, index), not on the batch it was drawn in.
  np.testing.assert_allclose(guided(labels[1:], seed=1, first_index=1), a[1:], atol=1e-6)


def test_heun_differs_from_euler(model):
  model = _randomize(model)
  labels = np.array([1])
  euler = Sampler(model, SamplingSettings(num_steps=4))(labels, 0)
  heun = Sampler(model, SamplingSettings(num_steps=4, solver="heun"))(labels, 0)
  assert np.all(np.isfinite(heun)) and not np.allclose(euler, heun)


@pytest.mark.parametrize("kwargs,match", [(dict(cfg=-1.0), "cfg"), (dict(num_steps=0), "num_steps"),
                                          (dict(guidance=1.5), "guidance"), (dict(solver="rk4"), "solver")])
def test_impossible_settings_are_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingSettings(**kwargs)


def test_out_of_range_label_is_rejected(model):
  sampler = Sampler(model, SamplingSettings(num_steps=2))
  with pytest.raises(ValueError, match="class label 10 is out of range"):
    sampler(np.array([1, 10]), 0)
  with pytest.raises(ValueError, match="class label -1"):
    sampler(np.array([-1]), 0)


def test_scale_steps_schedule(model):
  """A per-scale schedule of equal counts is num_steps exactly; fewer steps at the coarse scales changes the
  sample; a schedule of the wrong length is refused."""
  model = _randomize(model)
  labels, keys = jnp.array([0, 3]), sample_keys(0, 0, 2)
  num_scales = model.schedule.num_scales
  plain = sample_latents(model, labels, keys, SamplingSettings(cfg=2.0, num_steps=4))
  same = sample_latents(model, labels, keys, SamplingSettings(cfg=2.0, num_steps=9, scale_steps=(4,) * num_scales))
  np.testing.assert_array_equal(plain, same)
  fewer = sample_latents(model, labels, keys,
                         SamplingSettings(cfg=2.0, num_steps=4, scale_steps=(1,) * (num_scales - 1) + (4,)))
  assert not np.allclose(plain, fewer)
  with pytest.raises(ValueError, match="one per scale"):
    sample_latents(model, labels, keys, SamplingSettings(num_steps=4, scale_steps=(4,) * (num_scales + 1)))
  with pytest.raises(ValueError, match="positive whole"):
    SamplingSettings(scale_steps=(0, 4))
