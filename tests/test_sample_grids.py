"""Sample grids during training: the label layout, config checks, and one compiled sampler reused across grids."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from flowar_jax.config import validate_config
from flowar_jax.models.registry import build_model
from flowar_jax.sampling.sampler import Sampler, SamplingSettings
from flowar_jax.training.sample_grids import grid_labels


def test_grid_labels_spread_over_the_classes_in_two_rows():
  config = tiny_config()
  np.testing.assert_array_equal(grid_labels(config), np.tile(np.arange(10), 2))
  config.model.num_classes = 1000
  default = grid_labels(config)
  assert len(default) == 20 and default[0] == 0 and default[9] == 999
  np.testing.assert_array_equal(default[:10], default[10:])
  config.sample_grid_labels = (7, 3)
  np.testing.assert_array_equal(grid_labels(config), [7, 3, 7, 3])


@pytest.mark.parametrize("key,value,match", [
    ("sample_every_steps", -1, "sample_every_steps must be >= 0"),
    ("sample_grid_labels", (3, 10), r"sample_grid_labels must hold .* in \[0, model.num_classes = 10\)"),
])
def test_sample_grid_settings_are_validated(key, value, match):
  config = tiny_config()
  config[key] = value
  with pytest.raises(ValueError, match=match):
    validate_config(config)


def _perturbed(model: nnx.Module, amount: float) -> nnx.Module:
  """The same architecture with every parameter shifted (a fresh model's flow head outputs zeros)."""
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p: p + amount, params))
  return model


def test_loaded_weights_reuse_the_compiled_sampler_and_match_a_new_one():
  config = tiny_config()
  settings = SamplingSettings(cfg=2.0, num_steps=2)
  labels = np.arange(4)
  sampler = Sampler(_perturbed(build_model(config, 0), 0.01), settings)
  first = sampler(labels, seed=0)
  other = _perturbed(build_model(config, 1), 0.02)
  sampler.set_weights(other)
  second = sampler(labels, seed=0)
  assert sampler._fn._jitted._cache_size() == 1  # pylint: disable=protected-access
  assert np.abs(first - second).max() > 1e-3
  np.testing.assert_array_equal(second, Sampler(other, settings)(labels, seed=0))
  wider = tiny_config()
  wider.model.width = 64
  with pytest.raises(ValueError, match="structure"):
    sampler.set_weights(build_model(wider, 0))
