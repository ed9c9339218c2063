"""The scale schedule, the scale-causal mask, the PyTorch-matching resizes and the pyramid."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowar_jax.scales import ScaleSchedule, area_resize, bicubic_resize, next_scale_input, scale_targets
from flowar_jax.scales import teacher_forcing_inputs
from flowar_jax.scales.resize import bicubic_matrix

# torch.nn.functional.interpolate(x, size=(4, 4), mode='bicubic', align_corners=False) for
# x = arange(4).reshape(1, 1, 2, 2), computed with PyTorch 2.14.
TORCH_BICUBIC_2_TO_4 = np.array(
    [[-0.3164062, 0.0156250, 0.5625000, 0.8945312],
     [0.3476562, 0.6796875, 1.2265625, 1.5585938],
     [1.4414062, 1.7734375, 2.3203125, 2.6523438],
     [2.1054688, 2.4375000, 2.9843750, 3.3164062]])
# Same call in float64 for x = arange(9).reshape(1, 1, 3, 3) ** 1.5 resized to 7x7: the first three rows.
TORCH_BICUBIC_3_TO_7_ROWS = np.array(
    [[-0.6558606, -0.4930113, -0.2787279, 0.2346939, 1.0245191, 1.7225086, 2.0990587],
     [0.3723148, 0.6238479, 0.9952849, 1.7089179, 2.6665624, 3.4650196, 3.9052097],
     [1.8054605, 2.2191762, 2.8787695, 3.9570573, 5.2166939, 6.1936477, 6.7475729]])
# F.interpolate(arange(25).reshape(1, 1, 5, 5), size=(3, 3), mode='area')
TORCH_AREA_5_TO_3 = np.array([[3.0, 4.5, 6.0], [10.5, 12.0, 13.5], [18.0, 19.5, 21.0]])


def test_schedule_offsets_and_lengths():
  s = ScaleSchedule((1, 2, 4, 8, 16))
  assert s.num_tokens == 341
  assert s.offsets == (0, 1, 5, 21, 85, 341)
  assert s.lengths == (1, 4, 16, 64, 256)


@pytest.mark.parametrize("sides", [(), (2, 1), (1, 1, 2), (0, 4)])
def test_schedule_rejects_bad_sides(sides):
  with pytest.raises(ValueError):
    ScaleSchedule(sides)


def test_schedule_must_end_at_latent_side():
  with pytest.raises(ValueError, match="latent side 16"):
    ScaleSchedule.for_latent((1, 2, 4, 8), 16)


def test_scale_causal_mask():
  s = ScaleSchedule((1, 2, 3))
  mask = np.asarray(s.visibility())
  ids = np.repeat([0, 1, 2], [1, 4, 9])
  expected = ids[None, :] <= ids[:, None]
  np.testing.assert_array_equal(mask, expected)
  # Within a scale every token sees every other; no token sees a later scale.
  assert mask[1:5, 1:5].all() and not mask[1:5, 5:].any() and mask[5:, :].all()
  assert mask.sum() == 1 * 1 + 4 * 5 + 9 * 14


def test_area_resize_averages_blocks():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  out = area_resize(x, 2)
  expected = x.reshape(2, 2, 4, 2, 4, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_area_resize_non_integer_ratio_matches_adaptive_pool():
  x = np.arange(5.0)
  out = area_resize(jnp.asarray(x).reshape(1, 5, 1, 1) * jnp.ones((1, 1, 5, 1)), 3)[0, :, 0, 0]
  # adaptive_avg_pool windows for 5 -> 3: [0, 2), [1, 4), [3, 5)
  np.testing.assert_allclose(out, [0.5, 2.0, 3.5], rtol=1e-6)


def test_bicubic_matches_torch_known_values():
  x = jnp.arange(4.0).reshape(1, 2, 2, 1)
  np.testing.assert_allclose(bicubic_resize(x, 4)[0, :, :, 0], TORCH_BICUBIC_2_TO_4, atol=1e-6)
  x = (jnp.arange(9.0) ** 1.5).reshape(1, 3, 3, 1)
  np.testing.assert_allclose(bicubic_resize(x, 7)[0, :3, :, 0], TORCH_BICUBIC_3_TO_7_ROWS, atol=1e-5)


def test_area_matches_torch_known_values():
  x = jnp.arange(25.0).reshape(1, 5, 5, 1)
  np.testing.assert_allclose(area_resize(x, 3)[0, :, :, 0], TORCH_AREA_5_TO_3, atol=1e-5)


def test_bicubic_uses_a_minus_075_not_jax_default():
  x = jnp.arange(4.0).reshape(1, 2, 2, 1)
  jax_default = jax.image.resize(x, (1, 4, 4, 1), "bicubic")
  assert np.abs(np.asarray(jax_default[0, :, :, 0]) - TORCH_BICUBIC_2_TO_4).max() > 1e-2


def test_bicubic_rows_sum_to_one_and_constant_is_preserved():
  for n_in, n_out in [(1, 16), (2, 16), (4, 16), (8, 16), (3, 7)]:
    np.testing.assert_allclose(bicubic_matrix(n_in, n_out).sum(axis=1), 1.0, atol=1e-12)
  x = jnp.full((1, 1, 1, 2), 3.0)
  np.testing.assert_allclose(bicubic_resize(x, 16), 3.0, atol=1e-6)


def test_pyramid_targets_and_inputs():
  s = ScaleSchedule((1, 2, 4, 8))
  lat = jax.random.normal(jax.random.key(1), (2, 8, 8, 5))
  targets = scale_targets(lat, s)
  assert [t.shape for t in targets] == [(2, 1, 1, 5), (2, 2, 2, 5), (2, 4, 4, 5), (2, 8, 8, 5)]
  np.testing.assert_allclose(targets[0][:, 0, 0], lat.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(targets[-1], lat)
  # input for scale k + 1 = area(bicubic(target_k -> 8) -> side_{k+1})
  up = bicubic_resize(targets[1], 8)
  np.testing.assert_allclose(next_scale_input(targets[1], s, 1), area_resize(up, 4), rtol=1e-5, atol=1e-5)
  inputs = teacher_forcing_inputs(targets, s)
  assert inputs.shape == (2, 4 + 16 + 64, 5)
  # The 1x1 scale upsamples to a constant, so the 2x2 input equals the mean of the latent.
  np.testing.assert_allclose(inputs[:, :4], jnp.repeat(targets[0].reshape(2, 1, 5), 4, axis=1), atol=1e-5)


def test_pyramid_rejects_wrong_latent_size():
  with pytest.raises(ValueError, match="latent side 8"):
    scale_targets(jnp.zeros((1, 4, 4, 2)), ScaleSchedule((1, 2, 8)))
