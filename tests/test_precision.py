"""bf16 matrix products with float32 accumulation: exact against a float32 product of bf16-rounded operands,
forward and backward; the model, training and sampling in bf16 stay finite and close to float32."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from flowar_jax import precision
from flowar_jax.config import validate_config
from flowar_jax.models.flowar import FlowAR
from flowar_jax.models.layers import dropout, linear, linear_chunks
from flowar_jax.models.rope import rope_tables
from flowar_jax.heads.flow_sampling import integrate
from flowar_jax.sampling.sampler import SamplingSettings, sample_keys, sample_latents

# (lhs shape, rhs shape, dimension numbers): a linear layer, attention scores and values (batch dimensions
# in the middle), a projection to several output axes, and a product contracting the lhs's first axis.
PRODUCTS = [
    ((3, 5, 24), (24, 40), (((2,), (0,)), ((), ()))),
    ((2, 9, 3, 16), (2, 11, 3, 16), (((3,), (3,)), ((0, 2), (0, 2)))),
    ((2, 3, 9, 11), (2, 11, 3, 16), (((3,), (1,)), ((0, 1), (0, 2)))),
    ((4, 5, 24), (24, 2, 3, 8), (((2,), (0,)), ((), ()))),
    ((24, 12), (40, 24), (((0,), (1,)), ((), ()))),
]


def _bf16(x):
  return x.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims", PRODUCTS)
def test_bf16_product_and_gradients_match_float32_on_rounded_operands(lhs_shape, rhs_shape, dims):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  lhs, rhs = jax.random.normal(k1, lhs_shape), jax.random.normal(k2, rhs_shape)

  def product(a, b):
    with precision.compute_dtype("bfloat16"):
      return precision.dot_general(a, b, dims)

  out, vjp = jax.jit(lambda a, b: jax.vjp(product, a, b))(lhs, rhs)
  grad = jax.random.normal(k3, out.shape)
  d_lhs, d_rhs = jax.jit(vjp)(grad)
  exact = lambda a, b: jax.lax.dot_general(a, b, dims, precision="highest")
  want, want_vjp = jax.vjp(exact, _bf16(lhs), _bf16(rhs))
  want_lhs, want_rhs = want_vjp(_bf16(grad))
  assert out.dtype == d_lhs.dtype == d_rhs.dtype == jnp.float32
  assert d_lhs.shape == lhs_shape and d_rhs.shape == rhs_shape
  for got, ref in [(out, want), (d_lhs, want_lhs), (d_rhs, want_rhs)]:
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  # ... and they are bf16 products: float32 ones differ by far more than float32 rounding.
  assert float(jnp.max(jnp.abs(out - exact(lhs, rhs)))) > 1e-3


def test_float32_mode_is_the_plain_product():
  lhs, rhs = jax.random.normal(jax.random.key(1), (6, 8)), jax.random.normal(jax.random.key(2), (8, 5))
  dims = (((1,), (0,)), ((), ()))
  with precision.compute_dtype("float32"):
    got = jax.jit(lambda a, b: precision.dot_general(a, b, dims))(lhs, rhs)
  np.testing.assert_array_equal(got, jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims))(lhs, rhs))
  assert precision.product_dtype() == jnp.float32  # the context is restored


def test_unknown_compute_dtype_is_rejected():
  with pytest.raises(ValueError, match="compute_dtype"):
    with precision.compute_dtype("float16"):
      pass
  with pytest.raises(ValueError, match="compute_dtype"):
    SamplingSettings(compute_dtype="fp8")
  config = tiny_config()
  config.model.compute_dtype = "bf16"
  with pytest.raises(ValueError, match="model.compute_dtype"):
    validate_config(config)


def test_linear_chunks_equal_the_split_output():
  layer = linear(16, 48, rngs=nnx.Rngs(0))
  layer.bias[...] = jax.random.normal(jax.random.key(3), (48,))
  x = jax.random.normal(jax.random.key(4), (2, 5, 16))
  for got, want in zip(linear_chunks(layer, x, 3), jnp.split(layer(x), 3, axis=-1)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_hash_dropout_keeps_the_expected_fraction_and_scales():
  x = jnp.ones((4, 64, 96))
  rate = 0.25
  out = jax.jit(lambda x, r: dropout(x, rate, r))(x, jax.random.key(5))
  kept = np.asarray(out) != 0
  assert abs(kept.mean() - (1 - rate)) < 0.01  # 24,576 draws: the standard error is 0.003
  np.testing.assert_allclose(np.asarray(out)[kept], 1 / (1 - rate), rtol=1e-6)
  again = jax.jit(lambda x, r: dropout(x, rate, r))(x, jax.random.key(5))
  other = jax.jit(lambda x, r: dropout(x, rate, r))(x, jax.random.key(6))
  np.testing.assert_array_equal(out, again)
  assert 0.5 < np.mean(kept == (np.asarray(other) != 0)) < 0.8  # independent masks agree on ~62.5%
  assert dropout(x, rate, None) is x


def _random_model():
  config = tiny_config()
  model = FlowAR(config.model, 4, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))  # a zero-initialised head would hide differences
  leaves = [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def test_bf16_loss_and_gradients_are_finite_and_close_to_float32():
  model = _random_model()
  graphdef, params = nnx.split(model, nnx.Param)
  latents = jax.random.normal(jax.random.key(8), (8, 4, 4, 4))
  labels = jnp.arange(8) % 10

  def loss(params, dtype):
    with precision.compute_dtype(dtype):
      return nnx.merge(graphdef, params).loss(latents, labels, jax.random.key(9))[0]

  l32, g32 = jax.jit(jax.value_and_grad(lambda p: loss(p, "float32")))(params)
  l16, g16 = jax.jit(jax.value_and_grad(lambda p: loss(p, "bfloat16")))(params)
  assert jnp.isfinite(l16) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g16))
  np.testing.assert_allclose(l16, l32, rtol=2e-2)
  flat32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(g32)])
  flat16 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(g16)])
  cosine = jnp.dot(flat32, flat16) / (jnp.linalg.norm(flat32) * jnp.linalg.norm(flat16))
  assert cosine > 0.99, cosine
  assert float(l16) != float(l32)  # the bf16 path was taken


def test_bf16_samples_stay_within_tolerance_of_float32():
  model = _random_model()
  labels = jnp.array([0, 3, 9, 4])
  keys = sample_keys(0, 0, 4)
  run = lambda dtype: jax.jit(lambda: sample_latents(
      model, labels, keys, SamplingSettings(cfg=3.0, guidance=0.9, num_steps=8, compute_dtype=dtype)))()
  a, b = run("float32"), run("bfloat16")
  assert bool(jnp.all(jnp.isfinite(b)))
  relative = float(jnp.sqrt(jnp.mean((a - b) ** 2)) / jnp.std(a))
  assert 0 < relative < 0.05, relative


def _unhoisted_velocity(head, x_t, t, z):
  """The head's velocity with its condition embedded from z on every call, block by block."""
  c = head.cond_embed(z)
  t_emb = head.time_embed(t)[:, None]
  cos, sin = rope_tables(math.isqrt(x_t.shape[1]), head.rope_grid, head.head_dim)
  x = head.input_proj(x_t)
  for block in head.res_blocks:
    x = block(x, t_emb, c, z, cos, sin)
  return head.final_layer(x, c + t_emb)


def test_ode_with_hoisted_head_conditioning_equals_the_unhoisted_euler_loop():
  """The sampler embeds each scale's condition once (`FlowHead.conditioning`) and integrates `velocity`; an
  Euler loop that re-embeds the condition at every evaluation, with guidance, gives the same state."""
  head = _random_model().flownet
  noise = jax.random.normal(jax.random.key(10), (2, 16, 4))
  z_cond, z_uncond = jax.random.normal(jax.random.key(11), (2, 2, 16, 32))
  grid, cfg, guidance = np.linspace(1.0, 0.0, 7), 2.5, 0.6
  hoisted = integrate(head.velocity, noise, head.conditioning(z_cond), head.conditioning(z_uncond), cfg, grid,
                      guidance)
  x = noise
  for t_cur, t_next in zip(grid[:-1], grid[1:]):
    t = jnp.full((2,), t_cur, jnp.float32)
    v = _unhoisted_velocity(head, x, t, z_cond)
    if t_cur <= guidance:
      v_u = _unhoisted_velocity(head, x, t, z_uncond)
      v = v_u + cfg * (v - v_u)
    x = x + np.float32(t_next - t_cur) * v
  assert float(jnp.abs(hoisted - noise).max()) > 0.1  # the head moved the state
  np.testing.assert_allclose(hoisted, x, rtol=1e-5, atol=1e-5)
