"""The KL autoencoder, its posterior, the PatchGAN discriminator and the VAE training losses."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flowar_jax.config import base_config
from flowar_jax.models.discriminator import PatchDiscriminator
from flowar_jax.models.vae import AutoencoderKL, DiagonalGaussian, decode_from_latents, encode_to_latents
from flowar_jax.training import vae_loss as losses

KL16_PARAMS = 66_456_019


def rngs(seed: int) -> nnx.Rngs:
  # 'rbg' keys compile far faster than threefry on CPU, which dominates building modules eagerly in tests.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def tiny_vae_config(**overrides):
  c = base_config().vae
  c.base_channels = 16
  c.channel_multipliers = (1, 2)
  c.encoder_blocks = 1
  c.decoder_blocks = 2
  c.latent_channels = 4
  c.norm_groups = 8
  for key, value in overrides.items():
    c[key] = value
  return c


@pytest.fixture(scope="module")
def tiny_vae():
  return AutoencoderKL(tiny_vae_config(), rngs=rngs(0))


def smooth_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
  """Random low-frequency images in [-1, 1]: sums of a few sinusoids per channel, `[n, size, size, 3]`."""
  yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
  out = np.zeros((n, size, size, 3), np.float32)
  for i in range(n):
    for ch in range(3):
      fy, fx, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
      out[i, :, :, ch] = 0.8 * np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
  return out


def kl16_param_count_by_layer() -> int:
  """Counts the official KL-16 state dict layer by layer (PyTorch shapes), independently of the modules."""
  conv = lambda i, o, k: i * o * k * k + o
  norm = lambda c: 2 * c
  res = lambda i, o: norm(i) + conv(i, o, 3) + norm(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)
  attn = lambda c: norm(c) + 4 * conv(c, c, 1)
  widths = [128 * m for m in (1, 1, 2, 2, 4)]
  enc, c_in = conv(3, 128, 3), 128
  for i, w in enumerate(widths):
    for _ in range(2):
      enc, c_in = enc + res(c_in, w) + (attn(w) if i == 4 else 0), w
    enc += conv(w, w, 3) if i < 4 else 0
  enc += 2 * res(512, 512) + attn(512) + norm(512) + conv(512, 32, 3)
  dec, c_in = conv(16, 512, 3) + 2 * res(512, 512) + attn(512), 512
  for i in reversed(range(5)):
    for _ in range(3):
      dec, c_in = dec + res(c_in, widths[i]), widths[i]
    dec += conv(widths[i], widths[i], 3) if i > 0 else 0
  dec += norm(128) + conv(128, 3, 3)
  return enc + dec + conv(32, 32, 1) + conv(16, 16, 1)


# ---------------------------------------------------------------- architecture and shapes


def test_tiny_encode_decode_shapes(tiny_vae):
  images = jnp.asarray(smooth_images(np.random.default_rng(0), 2, 16))
  assert tiny_vae.stride == 2
  posterior = tiny_vae.encode(images)
  assert posterior.mean.shape == posterior.logvar.shape == (2, 8, 8, 4)
  decoded = tiny_vae.decode(posterior.mean)
  assert decoded.shape == (2, 16, 16, 3)
  recon, post2 = tiny_vae(images, None)
  np.testing.assert_allclose(recon, decoded, atol=1e-5)
  np.testing.assert_allclose(post2.mean, posterior.mean, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(recon)))


def test_non_square_shapes(tiny_vae):
  graphdef, state = nnx.split(tiny_vae)
  encode = lambda x: nnx.merge(graphdef, state).encode(x).mean
  decode = lambda z: nnx.merge(graphdef, state).decode(z)
  assert jax.eval_shape(encode, jax.ShapeDtypeStruct((3, 8, 12, 3), jnp.float32)).shape == (3, 4, 6, 4)
  assert jax.eval_shape(decode, jax.ShapeDtypeStruct((3, 4, 6, 4), jnp.float32)).shape == (3, 8, 12, 3)


def test_kl16_preset_shapes_and_param_count():
  config = base_config().vae
  abstract = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=rngs(0)))
  assert abstract.stride == 16
  graphdef, state = nnx.split(abstract)
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  moments = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x).mean, state, images)
  assert moments.shape == (2, 16, 16, 16)
  decoded = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z), state,
                           jax.ShapeDtypeStruct((2, 16, 16, 16), jnp.float32))
  assert decoded.shape == (2, 256, 256, 3)

  params = nnx.state(abstract, nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  total = sum(int(np.prod(leaf.shape)) for _, leaf in leaves)
  assert total == kl16_param_count_by_layer() == KL16_PARAMS

  # Names and shapes mirror the official state dict (conv kernels are [kh, kw, in, out]).
  shapes = {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path[:-1]): leaf.shape
            for path, leaf in leaves}
  assert shapes[("encoder", "conv_in", "kernel")] == (3, 3, 3, 128)
  assert shapes[("encoder", "down", "2", "block", "0", "nin_shortcut", "kernel")] == (1, 1, 128, 256)
  assert ("encoder", "down", "2", "block", "1", "nin_shortcut", "kernel") not in shapes
  assert shapes[("encoder", "down", "3", "downsample", "conv", "kernel")] == (3, 3, 256, 256)
  assert shapes[("encoder", "down", "4", "attn", "1", "q", "kernel")] == (1, 1, 512, 512)
  assert ("encoder", "down", "4", "downsample", "conv", "kernel") not in shapes
  assert ("encoder", "down", "3", "attn", "0", "q", "kernel") not in shapes
  assert shapes[("encoder", "conv_out", "kernel")] == (3, 3, 512, 32)
  assert shapes[("quant_conv", "kernel")] == (1, 1, 32, 32)
  assert shapes[("post_quant_conv", "kernel")] == (1, 1, 16, 16)
  assert shapes[("decoder", "conv_in", "kernel")] == (3, 3, 16, 512)
  assert shapes[("decoder", "mid", "attn_1", "proj_out", "kernel")] == (1, 1, 512, 512)
  # up[i] is indexed by level: up[3] reads the 512 wide level 4 and writes 256.
  assert shapes[("decoder", "up", "3", "block", "0", "nin_shortcut", "kernel")] == (1, 1, 512, 256)
  assert shapes[("decoder", "up", "4", "block", "2", "conv2", "kernel")] == (3, 3, 512, 512)
  assert shapes[("decoder", "up", "1", "upsample", "conv", "kernel")] == (3, 3, 128, 128)
  assert ("decoder", "up", "0", "upsample", "conv", "kernel") not in shapes
  assert not any(name[0] == "decoder" and "attn" in name for name in shapes if name[1] == "up")
  assert shapes[("decoder", "norm_out", "scale")] == (128,)


def test_image_size_not_divisible_by_stride_raises(tiny_vae):
  with pytest.raises(ValueError, match="17x16.*stride 2"):
    tiny_vae.encode(jnp.zeros((1, 17, 16, 3)))
  with pytest.raises(ValueError, match="16x15"):
    tiny_vae(jnp.zeros((1, 16, 15, 3)), None)
  with pytest.raises(ValueError, match="latents"):
    tiny_vae.decode(jnp.zeros((1, 4, 4, 5)))


def test_dropout_only_with_a_key():
  vae = AutoencoderKL(tiny_vae_config(dropout=0.5), rngs=rngs(0))
  images = jnp.asarray(smooth_images(np.random.default_rng(1), 2, 16))
  a, _ = vae(images, None)
  b, _ = vae(images, None)
  c, _ = vae(images, None, dropout_rng=jax.random.key(0, impl="rbg"))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-4


def _randomize(module: nnx.Module, seed: int) -> None:
  """Random values for every parameter (biases and norm affines included), so nothing hides behind zeros."""
  state = nnx.state(module, nnx.Param)
  rng = np.random.default_rng(seed)
  nnx.update(module, jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.3, p.shape), jnp.float32), state))


def _torch_conv(x: np.ndarray, conv: nnx.Conv, stride: int, pad: tuple[int, int, int, int]) -> np.ndarray:
  """Conv in PyTorch's layout: x `[B, C, H, W]`, weight `[O, C, kh, kw]`, pad (left, right, top, bottom)."""
  weight = np.transpose(np.asarray(conv.kernel[...]), (3, 2, 0, 1))
  left, right, top, bottom = pad
  x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
  _, _, kh, kw = weight.shape
  out_h, out_w = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], weight.shape[0], out_h, out_w))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
      out += np.einsum("bchw,oc->bohw", patch, weight[:, :, i, j])
  return out + np.asarray(conv.bias[...])[None, :, None, None]


def _torch_group_norm(x: np.ndarray, norm: nnx.GroupNorm, groups: int) -> np.ndarray:
  b, c, h, w = x.shape
  g = x.reshape(b, groups, c // groups, h, w)
  g = (g - g.mean(axis=(2, 3, 4), keepdims=True)) / np.sqrt(g.var(axis=(2, 3, 4), keepdims=True) + 1e-6)
  return g.reshape(b, c, h, w) * np.asarray(norm.scale[...])[None, :, None, None] + \
      np.asarray(norm.bias[...])[None, :, None, None]


def test_blocks_match_the_official_computation_in_nchw():
  from flowar_jax.models import vae_blocks
  x = np.random.default_rng(0).normal(size=(2, 8, 5, 6)).astype(np.float32)  # [B, C, H, W]
  to_nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)))
  to_nchw = lambda a: np.transpose(np.asarray(a), (0, 3, 1, 2))

  attn = vae_blocks.AttnBlock(8, 4, rngs=rngs(0))
  _randomize(attn, 1)
  h = _torch_group_norm(x, attn.norm, 4)
  q, k, v = (_torch_conv(h, conv, 1, (0, 0, 0, 0)).reshape(2, 8, 30) for conv in (attn.q, attn.k, attn.v))
  w = np.einsum("bci,bcj->bij", q, k) * 8**-0.5
  w = np.exp(w - w.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  expected = x + _torch_conv(np.einsum("bcj,bij->bci", v, w).reshape(2, 8, 5, 6), attn.proj_out, 1, (0, 0, 0, 0))
  np.testing.assert_allclose(to_nchw(attn(to_nhwc(x))), expected, rtol=1e-4, atol=1e-4)

  res = vae_blocks.ResnetBlock(8, 16, 4, 0.0, rngs=rngs(0))
  _randomize(res, 2)
  swish = lambda a: a / (1 + np.exp(-a))
  h = _torch_conv(swish(_torch_group_norm(x, res.norm1, 4)), res.conv1, 1, (1, 1, 1, 1))
  h = _torch_conv(swish(_torch_group_norm(h, res.norm2, 4)), res.conv2, 1, (1, 1, 1, 1))
  expected = _torch_conv(x, res.nin_shortcut, 1, (0, 0, 0, 0)) + h
  np.testing.assert_allclose(to_nchw(res(to_nhwc(x))), expected, rtol=1e-4, atol=1e-4)

  down = vae_blocks.Downsample(8, rngs=rngs(0))
  _randomize(down, 3)
  expected = _torch_conv(x, down.conv, 2, (0, 1, 0, 1))  # pad right and bottom only
  assert expected.shape[2:] == (2, 3)  # floor((5 + 1 - 3) / 2) + 1, floor((6 + 1 - 3) / 2) + 1
  np.testing.assert_allclose(to_nchw(down(to_nhwc(x))), expected, rtol=1e-4, atol=1e-4)

  up = vae_blocks.Upsample(8, rngs=rngs(0))
  _randomize(up, 4)
  nearest = x.repeat(2, axis=2).repeat(2, axis=3)
  np.testing.assert_allclose(to_nchw(up(to_nhwc(x))), _torch_conv(nearest, up.conv, 1, (1, 1, 1, 1)),
                             rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- posterior


def test_kl_of_standard_normal_is_zero():
  posterior = DiagonalGaussian.from_moments(jnp.zeros((3, 4, 4, 8)))
  np.testing.assert_allclose(posterior.kl(), np.zeros(3), atol=1e-7)
  assert posterior.kl().shape == (3,)


def test_kl_matches_numpy_formula():
  moments = np.random.default_rng(0).normal(size=(2, 3, 5, 6)).astype(np.float32)
  mean, logvar = moments[..., :3], moments[..., 3:]
  # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2) / 2 - 1/2, summed per sample.
  sigma = np.exp(0.5 * logvar)
  expected = np.sum(-np.log(sigma) + (sigma**2 + mean**2) / 2 - 0.5, axis=(1, 2, 3))
  np.testing.assert_allclose(DiagonalGaussian.from_moments(jnp.asarray(moments)).kl(), expected, rtol=1e-5)


def test_logvar_is_clamped():
  moments = jnp.concatenate([jnp.zeros((1, 1, 1, 3)), jnp.array([[[[100.0, -100.0, 1.5]]]])], axis=-1)
  posterior = DiagonalGaussian.from_moments(moments)
  np.testing.assert_array_equal(posterior.logvar[0, 0, 0], [20.0, -30.0, 1.5])
  np.testing.assert_array_equal(posterior.mean, np.zeros((1, 1, 1, 3)))


def test_mode_and_sample():
  mean = jnp.full((4000, 2, 2, 2), 2.0)
  posterior = DiagonalGaussian(mean=mean, logvar=jnp.full_like(mean, np.log(0.25)))
  np.testing.assert_array_equal(posterior.mode(), mean)
  draws = posterior.sample(jax.random.key(0))
  assert draws.shape == mean.shape
  assert abs(float(jnp.mean(draws)) - 2.0) < 0.02
  assert abs(float(jnp.std(draws)) - 0.5) < 0.02
  np.testing.assert_array_equal(draws, posterior.sample(jax.random.key(0)))
  assert not np.allclose(draws, posterior.sample(jax.random.key(1)))
  tight = DiagonalGaussian(mean=mean[:2], logvar=jnp.full_like(mean[:2], -30.0))
  np.testing.assert_allclose(tight.sample(jax.random.key(2)), mean[:2], atol=1e-5)


def test_latent_helpers_scale_and_clip(tiny_vae):
  images = jnp.asarray(smooth_images(np.random.default_rng(2), 2, 16))
  posterior = tiny_vae.encode(images)
  latents = encode_to_latents(tiny_vae, images, 0.5, None)
  np.testing.assert_allclose(latents, 0.5 * posterior.mean, rtol=1e-6)
  sampled = encode_to_latents(tiny_vae, images, 0.5, jax.random.key(0))
  np.testing.assert_allclose(sampled, 0.5 * posterior.sample(jax.random.key(0)), rtol=1e-5, atol=1e-6)
  decoded = decode_from_latents(tiny_vae, latents, 0.5)
  np.testing.assert_allclose(decoded, jnp.clip(tiny_vae.decode(posterior.mean), -1, 1), atol=1e-5)
  loud = decode_from_latents(tiny_vae, 100.0 * latents, 0.5)
  assert float(jnp.max(jnp.abs(loud))) <= 1.0


# ---------------------------------------------------------------- losses and training


def test_vae_loss_terms(tiny_vae):
  vae = tiny_vae
  images = jnp.asarray(smooth_images(np.random.default_rng(3), 2, 16))
  rng = jax.random.key(5)
  train = base_config().vae.train
  train.l1_weight, train.l2_weight, train.kl_weight = 1.0, 2.0, 0.5
  loss, metrics = losses.vae_loss(vae, images, rng, train)
  recon, posterior = losses.reconstruct(vae, images, rng)
  error = np.asarray(recon - images)
  kl = float(np.mean(posterior.kl()))
  np.testing.assert_allclose(metrics["l1"], np.mean(np.abs(error)), rtol=1e-5)
  np.testing.assert_allclose(metrics["l2"], np.mean(error**2), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
  expected = np.mean(np.abs(error)) + 2.0 * np.mean(error**2) + 0.5 * kl / (16 * 16 * 3)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert "adv" not in metrics


def test_vae_loss_overfits_a_tiny_batch():
  vae = AutoencoderKL(tiny_vae_config(), rngs=rngs(0))
  optimizer = nnx.Optimizer(vae, optax.adam(2e-3), wrt=nnx.Param)
  images = jnp.asarray(smooth_images(np.random.default_rng(4), 4, 16))
  train = base_config().vae.train

  @nnx.jit
  def train_step(vae, optimizer, rng):
    (loss, _), grads = nnx.value_and_grad(lambda m: losses.vae_loss(m, images, rng, train), has_aux=True)(vae)
    optimizer.update(vae, grads)
    return loss

  history = [float(train_step(vae, optimizer, jax.random.key(i))) for i in range(30)]
  assert np.all(np.isfinite(history))
  assert np.mean(history[-3:]) < 0.6 * np.mean(history[:3]), history  # about 0.42 in practice


def test_vae_loss_adversarial_term_switches_on_at_start_step(tiny_vae):
  disc = PatchDiscriminator(3, 8, 2, rngs=rngs(2))
  images = jnp.asarray(smooth_images(np.random.default_rng(5), 2, 16))
  train = base_config().vae.train
  train.disc_weight, train.disc_start_step = 0.7, 10
  rng = jax.random.key(0)
  with pytest.raises(ValueError, match="disc"):
    losses.vae_loss(tiny_vae, images, rng, train)

  @nnx.jit
  def loss_and_adv(vae, disc, step):
    loss, metrics = losses.vae_loss(vae, images, rng, train, disc=disc, step=step)
    recon, _ = losses.reconstruct(vae, images, rng)
    return loss, metrics, losses.generator_adversarial_loss(disc, recon)

  before, m_before, adv = loss_and_adv(tiny_vae, disc, jnp.asarray(9))
  after, m_after, _ = loss_and_adv(tiny_vae, disc, jnp.asarray(10))
  assert float(m_before["adv_factor"]) == 0.0 and float(m_after["adv_factor"]) == 1.0
  np.testing.assert_allclose(m_after["adv"], adv, rtol=1e-5)
  np.testing.assert_allclose(after - before, 0.7 * adv, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m_before["l1"], m_after["l1"], rtol=1e-6)


def test_discriminator_shape_and_batch_independence():
  disc = PatchDiscriminator(3, 8, 2, rngs=rngs(0))
  images = jnp.asarray(smooth_images(np.random.default_rng(6), 3, 32))
  apply = nnx.jit(lambda d, x: d(x))
  logits = apply(disc, images)
  assert logits.shape == (3, 32 // 4 - 2, 32 // 4 - 2, 1)
  np.testing.assert_allclose(apply(disc, images[:1]), logits[:1], atol=1e-5)
  assert PatchDiscriminator(3, 8, 3, rngs=rngs(0))(jnp.zeros((1, 64, 64, 3))).shape == (1, 6, 6, 1)
  with pytest.raises(ValueError, match="num_layers"):
    PatchDiscriminator(3, 8, 0, rngs=rngs(0))


def test_hinge_losses_on_constructed_logits():
  identity = lambda x: x  # the "images" are the logits themselves
  real = jnp.array([2.0, 0.5, -1.0, 1.0])
  fake = jnp.array([-2.0, 0.0, 1.0, -0.5])
  loss, metrics = losses.discriminator_loss(identity, real, fake)
  # real: relu(1 - r) = [0, 0.5, 2, 0] -> 0.625; fake: relu(1 + f) = [0, 1, 2, 0.5] -> 0.875.
  np.testing.assert_allclose(loss, 0.5 * (0.625 + 0.875), rtol=1e-6)
  np.testing.assert_allclose(metrics["logits_real"], 0.625, rtol=1e-6)
  np.testing.assert_allclose(metrics["logits_fake"], -0.375, rtol=1e-6)
  np.testing.assert_allclose(losses.generator_adversarial_loss(identity, fake), 0.375, rtol=1e-6)
  # A perfect discriminator (margins beyond 1) has zero loss, and gradients never reach the images.
  assert float(losses.discriminator_loss(identity, jnp.full(4, 3.0), jnp.full(4, -3.0))[0]) == 0.0
  grad_fake = jax.grad(lambda f: losses.discriminator_loss(identity, real, f)[0])(fake)
  np.testing.assert_array_equal(grad_fake, np.zeros(4))


def test_adversarial_factor():
  assert float(losses.adversarial_factor(jnp.asarray(4), 5)) == 0.0
  assert float(losses.adversarial_factor(jnp.asarray(5), 5)) == 1.0
  assert float(jax.jit(losses.adversarial_factor, static_argnums=1)(jnp.asarray(7), 5)) == 1.0
