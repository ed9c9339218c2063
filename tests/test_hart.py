"""HART: the hybrid tokenizer (discrete scales plus the last scale's continuous residual), the residual
diffusion head and its schedule, its flow-matching variant, the transformer (class and context paths), and
the state-dict conversion (all on a CPU, no torch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowar_jax.convert.hart import (hybrid_state_dict, load_hybrid, load_residual_head, load_transformer,
                                     residual_head_state_dict, transformer_state_dict)
from flowar_jax.heads.categorical import CategoricalSampling
from flowar_jax.heads.diffusion_schedule import cosine_betas, schedule, space_timesteps
from flowar_jax.heads.flow_sampling import SamplingSettings
from flowar_jax.heads.residual import ResidualHead, ResidualSampling
from flowar_jax.heads.residual_flow import FlowResidualHead
from flowar_jax.models import hart_sampling
from flowar_jax.models.hart_sampling import HARTSampling
from flowar_jax.models.hart import (HARTTransformer, apply_rope, context_positions_from_mask, grid_positions, rope_1d,
                                   rope_2d)
from flowar_jax.tokenizers.hybrid import HybridTokenizer, HybridTokens

SCALES = (1, 2, 4)
# ch_mult (1,): stride 1, so the last scale 4 is a 4 px image (one level keeps compiles short).
TINY_TOK = dict(vocab_size=16, z_channels=4, ch=32, ch_mult=(1,), num_res_blocks=1, patch_nums=SCALES)
TINY_HEAD = dict(channels=4, cond_dim=8, width=16, depth=2, num_steps="2")


def _randomize(module, seed: int, scale: float = 0.3):
  """Every parameter random (the official init zeroes the head's output layers); host-side numpy, no compiles."""
  rng = np.random.default_rng(seed)
  state = nnx.state(module, nnx.Param)
  nnx.update(module, jax.tree.map(lambda leaf: jnp.asarray(leaf + scale * rng.standard_normal(leaf.shape),
                                                           leaf.dtype), state))
  return module


@pytest.fixture(scope="module")
def tok():
  model = HybridTokenizer(**TINY_TOK, rngs=nnx.Rngs(0))
  model.quantize.embedding.embedding[...] = 0.3 * model.quantize.embedding.embedding[...]
  return model


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.key(1), (2, 4, 4, 3), minval=-1, maxval=1)


@pytest.fixture(scope="module")
def tokens(tok, images):
  return nnx.jit(lambda m, x: m.encode(x))(tok, images)


# Sampling at the last of 3 scales, compiled once per settings (eager ops are slow on a shared CPU).
_sample = nnx.jit(lambda h, z, zu, noise, settings: h.sample(z, zu, noise, settings, 2, 3), static_argnums=4)


@pytest.fixture(scope="module")
def head():
  return _randomize(ResidualHead(**TINY_HEAD, rngs=nnx.Rngs(2)), 3)


def test_encode_shapes(tok, tokens):
  assert [i.shape for i in tokens.indices] == [(2, 1), (2, 4), (2, 16)]
  assert all(i.dtype == jnp.int32 for i in tokens.indices)
  assert tokens.rest_before_last.shape == (2, 16, 4)


def test_hybrid_fhat_is_the_features_and_discrete_is_not(tok, images, tokens):
  f = tok.features(images)
  np.testing.assert_allclose(tok.tokens_fhat(tokens, continuous=True), f, atol=1e-5)
  discrete = tok.tokens_fhat(tokens, continuous=False)
  assert float(jnp.abs(discrete - f).max()) > 1e-2  # the codes miss something: the residual
  np.testing.assert_allclose(discrete + tok.residual(tokens).reshape(f.shape), f, atol=1e-5)


def test_last_scale_is_added_without_phi(tok, tokens):
  q = tok.quantize
  coarse = q.indices_to_fhat(tokens.indices[:-1])  # VAR's walk over scales 0 .. K-2
  plain_last = coarse + q.embed(tokens.indices[-1], 4)
  np.testing.assert_allclose(tok.discrete_fhat(tokens.indices), plain_last, atol=1e-6)
  assert float(jnp.abs(tok.discrete_fhat(tokens.indices) - q.indices_to_fhat(tokens.indices)).max()) > 1e-3


def test_encode_is_the_nearest_code_walk(tok, images, tokens):
  f = tok.features(images)
  var_indices, var_fhats = tok.quantize.quantize(f)
  for ours, var in zip(tokens.indices[:-1], var_indices[:-1]):  # scales 0 .. K-2 are VAR's
    np.testing.assert_array_equal(ours, var)
  rest = np.asarray(tokens.rest_before_last).reshape(-1, 4)
  np.testing.assert_allclose(rest, np.asarray(f - var_fhats[-2]).reshape(-1, 4), atol=1e-5)
  codes = np.asarray(tok.quantize.embedding.embedding[...])
  brute = np.argmin(((rest[:, None, :] - codes[None]) ** 2).sum(-1), axis=-1)
  np.testing.assert_array_equal(np.asarray(tokens.indices[-1]).reshape(-1), brute)


def test_seam_sampling_reproduces_the_tokens(tok, tokens):
  targets, inputs = tok.teacher_forcing(tokens)
  assert [t.shape for t in targets] == [t.shape for t in tokens.indices]
  assert inputs.shape == (2, 4 + 16, 4)
  state, offset = tok.empty_state(2), 0
  for si in range(len(SCALES) - 1):
    state, nxt = tok.next_input(si, state, tokens.indices[si])
    n = SCALES[si + 1] ** 2
    np.testing.assert_allclose(nxt.reshape(2, n, 4), inputs[:, offset:offset + n], atol=1e-6)
    offset += n
  final, _ = tok.next_input(2, state, (tokens.indices[-1], tok.residual(tokens)))
  np.testing.assert_allclose(final, tok.tokens_fhat(tokens, continuous=True), atol=1e-5)
  discrete, _ = tok.next_input(2, state, tokens.indices[-1])
  np.testing.assert_allclose(discrete, tok.tokens_fhat(tokens, continuous=False), atol=1e-6)
  images = tok.decode(final)
  assert images.shape == (2, 4, 4, 3) and float(jnp.abs(images).max()) <= 1.0
  np.testing.assert_allclose(images, tok.decode_tokens(tokens), atol=1e-5)


def test_training_paths(tok, images):
  f = tok.features(images)
  forward = nnx.jit(lambda m, f, c: m.training_forward(f, c))
  hybrid, loss, usage = forward(tok, f, True)
  np.testing.assert_allclose(hybrid, f, atol=1e-5)
  discrete, loss_d, usage_d = forward(tok, f, False)
  indices, f_hats = tok.quantize.quantize(f)
  np.testing.assert_allclose(discrete, f_hats[-1], atol=1e-5)
  want = 1.25 * np.mean([np.mean((np.asarray(fh) - np.asarray(f)) ** 2) for fh in f_hats])
  np.testing.assert_allclose([loss, loss_d], [want, want], rtol=1e-5)
  used = np.unique(np.concatenate([np.asarray(i).reshape(-1) for i in indices]))
  np.testing.assert_allclose([usage, usage_d], [100 * len(used) / 16] * 2, rtol=1e-6)
  # Straight through: the output's gradient reaches f unchanged; the loss's reaches the codebook.
  grad_f = nnx.jit(lambda m, f: jax.grad(lambda f: jnp.sum(m.training_forward(f, False)[0]))(f))(tok, f)
  np.testing.assert_allclose(grad_f, 1.0)
  grads = nnx.jit(nnx.grad(lambda m: m.training_forward(f, False)[1]))(tok)
  assert float(jnp.abs(grads.quantize.embedding.embedding[...]).max()) > 0


def test_bad_inputs_are_named(tok, tokens):
  with pytest.raises(ValueError, match="using_znorm"):
    HybridTokenizer(**TINY_TOK, using_znorm=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="last scale takes indices"):
    tok.next_input(2, tok.empty_state(2), jnp.zeros((2, 16, 16)))
  with pytest.raises(ValueError, match="all 3 scales"):
    tok.discrete_fhat(tokens.indices[:2])
  with pytest.raises(ValueError, match="expected images"):
    tok.encode(jnp.zeros((1, 8, 8, 3)))


def test_tokens_are_a_pytree(tokens):
  leaves = jax.tree.leaves(tokens)
  assert len(leaves) == 4
  again = jax.tree.unflatten(jax.tree.structure(tokens), leaves)
  assert isinstance(again, HybridTokens)


def test_tokenizer_state_dict_round_trip(tok, tokens):
  sd = hybrid_state_dict(tok)
  assert "quantize.embedding.weight" in sd and "quantize.quant_resi.qresi_ls.0.weight" in sd
  assert sd["encoder.conv_in.weight"].shape == (32, 3, 3, 3)
  wrapped = {**{f"vae.{k}": v for k, v in sd.items()}, "disc.main.0.weight": np.zeros((2, 3, 4, 4)),
             "vae.quantize.ema_vocab_hit_SV": np.zeros((3, 16))}
  for source in (sd, wrapped):
    again = load_hybrid(source, TINY_TOK)
    np.testing.assert_array_equal(again.decode_tokens(tokens), tok.decode_tokens(tokens))


def test_tokenizer_state_dict_errors(tok):
  sd = hybrid_state_dict(tok)
  bad = dict(sd, **{"quantize.embedding.weight": np.zeros((32, 4), np.float32)})
  with pytest.raises(ValueError, match=r"quantize.embedding.weight' has shape \(32, 4\).*builds \(16, 4\)"):
    load_hybrid(bad, TINY_TOK)
  missing = {k: v for k, v in sd.items() if k != "post_quant_conv.bias"}
  with pytest.raises(ValueError, match="missing from the checkpoint: post_quant_conv.bias"):
    load_hybrid(missing, TINY_TOK)
  extra = dict(sd, **{"decoder2.conv_in.bias": np.zeros(64, np.float32)})
  with pytest.raises(ValueError, match="not in the model: decoder2.conv_in.bias"):
    load_hybrid(extra, TINY_TOK)


# ---------------------------------------------------------------------------------------------- residual head


def test_schedule_respacing():
  assert space_timesteps(1000, "8") == [0, 143, 285, 428, 571, 714, 856, 999]
  assert space_timesteps(1000, "2,1") == [0, 499, 500]  # two from the first half, one from the second
  full = np.cumprod(1 - cosine_betas())
  sched = schedule("8")
  np.testing.assert_allclose(sched.alphas_cumprod, full[sched.timestep_map], rtol=1e-8)
  assert sched.num_steps == 8 and schedule(None).num_steps == 1000
  assert np.all(sched.posterior_log_variance_clipped[:1] == sched.posterior_log_variance_clipped[1:2])
  with pytest.raises(ValueError, match="cannot divide a section of 1000 diffusion steps into 1001"):
    space_timesteps(1000, "1001")


def test_head_network_shape_and_official_init():
  fresh = ResidualHead(**TINY_HEAD, rngs=nnx.Rngs(0))
  x, z = jnp.ones((5, 4)), jnp.ones((5, 8))
  out = fresh.network(x, jnp.arange(5), z)
  assert out.shape == (5, 8)
  np.testing.assert_array_equal(out, 0.0)  # final layer zero-initialised, as the official init


def test_head_loss(head):
  z = jax.random.normal(jax.random.key(0), (2, 3, 8))
  target = 0.3 * jax.random.normal(jax.random.key(1), (2, 3, 4))
  loss_and_grads = nnx.jit(nnx.value_and_grad(lambda h, key: h.loss(z, target, key)))
  loss, grads = loss_and_grads(head, jax.random.key(2))
  assert loss.shape == () and np.isfinite(float(loss))
  assert float(loss_and_grads(head, jax.random.key(3))[0]) != float(loss)  # fresh steps and noise per key
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(nnx.state(grads, nnx.Param)) if g.ndim == 2)
  terms = nnx.jit(lambda h, t, noise: h.loss_terms(z.reshape(6, 8), target.reshape(6, 4), t, noise))(
      head, jnp.array([0, 1, 5, 500, 998, 999]), jax.random.normal(jax.random.key(4), (6, 4)))
  assert terms.shape == (6,) and bool(jnp.all(jnp.isfinite(terms)))


def test_head_sampling_is_a_function_of_the_draws(head):
  keys = jax.random.split(jax.random.key(0), 2)
  noise = head.draw(keys, 2, 3)
  assert noise.shape == (2, 3, 3, 4)  # x_T, then one draw per step
  assert float(jnp.abs(head.draw(keys, 1, 3) - noise).max()) > 0  # each scale its own draws
  z = jax.random.normal(jax.random.key(1), (2, 3, 8))
  zu = jax.random.normal(jax.random.key(2), (2, 3, 8))
  settings = ResidualSampling(cfg=1.5)
  out = _sample(head, z, zu, noise, settings)
  # The last step adds no noise and returns the clipped x0 prediction, times 0.6.
  assert out.shape == (2, 3, 4) and float(jnp.abs(out).max()) <= 0.6 + 1e-6
  # A row depends on its own condition and draws only, not on its batch.
  np.testing.assert_allclose(_sample(head, z[:1], zu[:1], head.draw(keys[:1], 2, 3), settings), out[:1], atol=1e-6)
  assert float(jnp.abs(_sample(head, z, None, noise, settings) - out).max()) > 1e-4  # guidance acts
  unit = ResidualSampling(cfg=1.0)  # g == 1 means no guidance, as the official sampler
  np.testing.assert_array_equal(_sample(head, z, zu, noise, unit), _sample(head, z, None, noise, unit))
  cold = ResidualSampling(cfg=1.5, temperature=0.0)
  other = noise.at[:, 1:].set(0.0)
  np.testing.assert_array_equal(_sample(head, z, zu, noise, cold), _sample(head, z, zu, other, cold))


def test_head_condition(head):
  h = jax.random.normal(jax.random.key(0), (2, 3, 8))
  c = head.condition(h, jnp.zeros_like(h))
  assert c.shape == (2, 3, 8)
  rms = ResidualHead(**TINY_HEAD, norm="rms", rngs=nnx.Rngs(0))
  np.testing.assert_allclose(rms.condition(h, h), 2 * h / jnp.sqrt(jnp.mean(4 * h * h, -1, keepdims=True) + 1e-6),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="norm must be 'layer' or 'rms'"):
    ResidualHead(**TINY_HEAD, norm="batch", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_head_state_dict_round_trip(norm):
  head = _randomize(ResidualHead(**TINY_HEAD, norm=norm, rngs=nnx.Rngs(5)), 6)
  sd = residual_head_state_dict(head)
  assert "diffloss.net.time_embed.mlp.2.weight" in sd and "diffloss.net.res_blocks.1.mlp.0.weight" in sd
  assert "diffloss.net.final_layer.adaLN_modulation.1.weight" in sd and "decoder_norm.weight" in sd
  assert ("decoder_norm.bias" in sd) == (norm == "layer")
  assert sd["diffloss.net.input_proj.weight"].shape == (16, 4)  # [out, in]
  transformer = {**sd, "head.weight": np.zeros((16, 8)), "blocks.0.attn.mat_qkv.weight": np.zeros((24, 8))}
  again = load_residual_head(transformer, dict(TINY_HEAD, norm=norm))
  x, t, z = jnp.ones((3, 4)), jnp.array([0, 10, 999]), jnp.ones((3, 8))
  np.testing.assert_array_equal(again.network(x, t, z), head.network(x, t, z))


def test_head_state_dict_errors(head):
  sd = residual_head_state_dict(head)
  with pytest.raises(ValueError, match=r"cond_embed.bias' has shape \(16,\) in the checkpoint but the config builds \(32,\)"):
    load_residual_head(sd, dict(TINY_HEAD, width=32))
  with pytest.raises(ValueError, match="missing from the checkpoint: diffloss.net.res_blocks.2"):
    load_residual_head(sd, dict(TINY_HEAD, depth=3))
  with pytest.raises(ValueError, match="not in the model: diffloss.net.res_blocks.1"):
    load_residual_head(sd, dict(TINY_HEAD, depth=1))


# ------------------------------------------------------------------------------------ flow-matching variant

TINY_FLOW = dict(channels=4, cond_dim=8, width=16, depth=2)


def test_flow_head_with_zero_velocity_keeps_the_noise_and_matches_eps_minus_y():
  fresh = FlowResidualHead(**TINY_FLOW, rngs=nnx.Rngs(0))  # zero-initialised output layer: v = 0
  noise = fresh.draw(jax.random.split(jax.random.key(0), 2), 2, 3)
  assert noise.shape == (2, 3, 4)
  assert float(jnp.abs(fresh.draw(jax.random.split(jax.random.key(0), 2), 1, 3) - noise).max()) > 0
  z = jnp.ones((2, 3, 8))
  out = fresh.sample(z, None, noise, SamplingSettings(num_steps=2), 2, 3)
  np.testing.assert_allclose(out, 0.6 * noise, rtol=1e-6)
  target, eps = jnp.full((2, 3, 4), 0.3), jnp.ones((2, 3, 4))
  np.testing.assert_allclose(fresh.matching_loss(z, target, jnp.array([0.2, 0.7]), eps), (1.0 - 0.5) ** 2, rtol=1e-6)


def test_flow_head_loss_and_sampling():
  head = _randomize(FlowResidualHead(**TINY_FLOW, rngs=nnx.Rngs(1)), 7)
  z = jax.random.normal(jax.random.key(0), (2, 3, 8))
  zu = jax.random.normal(jax.random.key(1), (2, 3, 8))
  target = 0.3 * jax.random.normal(jax.random.key(2), (2, 3, 4))
  loss, grads = nnx.jit(nnx.value_and_grad(lambda h: h.loss(z, target, jax.random.key(3))))(head)
  assert loss.shape == () and np.isfinite(float(loss))
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(nnx.state(grads, nnx.Param)) if g.ndim == 2)
  keys = jax.random.split(jax.random.key(4), 2)
  sample = nnx.jit(lambda h, z, zu, n, s: h.sample(z, zu, n, s, 2, 3), static_argnums=4)
  settings = SamplingSettings(cfg=2.5, num_steps=2)
  out = sample(head, z, zu, head.draw(keys, 2, 3), settings)
  assert out.shape == (2, 3, 4)
  assert float(jnp.abs(sample(head, z, None, head.draw(keys, 2, 3), settings) - out).max()) > 1e-4  # guided


# ------------------------------------------------------------------------------------------------ transformer

TINY_T = dict(depth=2, width=32, num_heads=2, vocab_size=16, cvae=4, patch_nums=(1, 2, 3))
TINY_CLASS = dict(TINY_T, conditioning="class", num_classes=5)
TINY_CONTEXT = dict(TINY_T, conditioning="context", context_tokens=3, context_dim=6)
T_INPUTS = 2 * 2 + 3 * 3  # next-scale inputs: L - pn_0^2


@pytest.fixture(scope="module")
def class_model():
  return _randomize(HARTTransformer(**TINY_CLASS, rngs=nnx.Rngs(1)), 1, 0.2)


@pytest.fixture(scope="module")
def context_model():
  return _randomize(HARTTransformer(**TINY_CONTEXT, rngs=nnx.Rngs(2)), 2, 0.2)


def _context_batch(seed: int = 0):
  rng = np.random.default_rng(seed)
  context = jnp.asarray(rng.standard_normal((2, 3, 6)), jnp.float32)
  positions = jnp.asarray([[0, 1, 2], [4, 5, 6]], jnp.int32)
  return context, positions


def _inputs(seed: int = 0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((2, T_INPUTS, 4)), jnp.float32)


def test_rope_tables_match_hart_layout():
  """Channel c of a head of size 8: quarter c // 2 -> axis (x, x, y, y), frequency 10000^(-4 (c % 2) / 8);
  rotate_half pairs c with c + 4."""
  pos = jnp.asarray([[[3.0, 5.0], [0.5, 2.0]]])
  cos, sin = rope_2d(pos, 8)
  for l in range(2):
    for c in range(8):
      angle = float(pos[0, l, (c // 2) // 2]) * 10000.0 ** (-4 * (c % 2) / 8)
      np.testing.assert_allclose(cos[0, l, c], np.cos(angle), rtol=1e-6)
      np.testing.assert_allclose(sin[0, l, c], np.sin(angle), rtol=1e-6)
  cos1, _ = rope_1d(jnp.asarray([[2]]), 8)
  np.testing.assert_allclose(cos1[0, 0], np.cos(2 * 10000.0 ** (-(np.arange(8) % 4) * 2 / 8)), rtol=1e-6)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 1, 8)), jnp.float32)
  out = apply_rope(x, cos, sin)
  want = np.asarray(x) * np.asarray(cos)[:, :, None] + np.concatenate(
      [-np.asarray(x)[..., 4:], np.asarray(x)[..., :4]], -1) * np.asarray(sin)[:, :, None]
  np.testing.assert_allclose(out, want, rtol=1e-6)


def test_grid_positions_are_on_the_last_grid():
  pos = grid_positions((1, 2, 4), 4)
  assert pos.shape == (1 + 4 + 16, 2)
  np.testing.assert_array_equal(pos[1:5], [[0, 0], [0, 2], [2, 0], [2, 2]])
  np.testing.assert_array_equal(pos[5 + 4 * 1 + 3], [1, 3])  # scale 4, row 1, column 3


@pytest.mark.parametrize("path", ["class", "context"])
def test_transformer_is_scale_causal(path, class_model, context_model):
  """Changing scale s's inputs leaves the logits of earlier scales and changes scale s's."""
  model = class_model if path == "class" else context_model
  if path == "class":
    run = lambda inputs: model(jnp.asarray([1, 3]), inputs)
  else:
    context, positions = _context_batch()
    run = lambda inputs: model(context, inputs, context_positions=positions)
  inputs = _inputs()
  base = run(inputs)
  assert base.shape == (2, 1 + 4 + 9, 16)
  changed = run(inputs.at[:, 4:].add(1.0))  # the last scale's inputs
  np.testing.assert_allclose(changed[:, :5], base[:, :5], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(changed[:, 5:] - base[:, 5:]).max()) > 1e-3


def test_context_conditioning_reads_context_and_positions(context_model):
  context, positions = _context_batch()
  base = context_model(context, _inputs(), context_positions=positions)
  other = context_model(context.at[:, 0].add(1.0), _inputs(), context_positions=positions)
  assert float(jnp.abs(other[:, 0] - base[:, 0]).max()) > 1e-3  # first-scale logits: from the last context token
  shifted = context_model(context, _inputs(), context_positions=positions + 1)
  assert float(jnp.abs(shifted - base).max()) > 1e-4  # HART's rotary layout is not shift invariant


def test_condition_dropout(class_model, context_model):
  drop = lambda m: nnx.clone(m)
  model = drop(class_model)
  model.cond_drop_rate = 1.0
  dropped = model(jnp.asarray([1, 3]), _inputs(), rng=jax.random.key(0))
  null = class_model(jnp.asarray([5, 5]), _inputs())
  np.testing.assert_allclose(dropped, null, rtol=1e-5, atol=1e-6)
  model = drop(context_model)
  model.cond_drop_rate = 1.0
  context, positions = _context_batch()
  dropped = model(context, _inputs(), context_positions=positions, rng=jax.random.key(0))
  zero = context_model(jnp.zeros_like(context), _inputs(), context_positions=positions)
  np.testing.assert_allclose(dropped, zero, rtol=1e-5, atol=1e-6)


def test_context_positions_repeat_the_last_token_over_padding():
  np.testing.assert_array_equal(context_positions_from_mask(jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]])),
                                [[0, 1, 2, 3], [0, 1, 1, 1]])


def test_avg_pooling_reads_only_unmasked_context(context_model):
  cond = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1], [1, 1, 0]])
  pooled = context_model.pool_condition(cond, mask, "avg")
  np.testing.assert_allclose(pooled, np.stack([cond[0].mean(0), cond[1, :2].mean(0)]), rtol=1e-6)
  np.testing.assert_allclose(context_model.pool_condition(cond, mask, "max"), cond.max(1))


def test_head_inputs_feed_the_residual_head(class_model):
  hidden, _ = class_model.hidden(jnp.asarray([1, 3]), _inputs())
  codes = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 4)), jnp.float32)
  last, discrete = class_model.head_inputs(hidden, codes)
  np.testing.assert_array_equal(last, hidden[:, -9:])
  np.testing.assert_allclose(discrete, class_model.word_embed(codes), rtol=1e-6)
  head = ResidualHead(channels=4, cond_dim=32, width=16, depth=1, norm="rms", rngs=nnx.Rngs(0))
  assert head.condition(last, discrete).shape == (2, 9, 32)


@pytest.mark.parametrize("kwargs", [TINY_CLASS, dict(TINY_CONTEXT, mlp="gpt2", adaln=False, timestep_level=True,
                                                      pooling="avg", attn_l2_norm=True, context_norm=False)])
def test_transformer_state_dict_round_trip(kwargs):
  model = _randomize(HARTTransformer(**kwargs, rngs=nnx.Rngs(3)), 3, 0.2)
  state = transformer_state_dict(model)
  head_entries = residual_head_state_dict(ResidualHead(channels=4, cond_dim=32, width=16, depth=1, norm="rms",
                                                       rngs=nnx.Rngs(0)))
  state_with_buffers = {**state, **head_entries, "lvl_1L": np.zeros((1, 14)),
                        "blocks.0.attn.zero_k_bias": np.zeros(32)}
  loaded = load_transformer(state_with_buffers, kwargs)
  if kwargs["conditioning"] == "class":
    args, extra = (jnp.asarray([1, 3]),), {}
  else:
    context, positions = _context_batch()
    args, extra = (context,), dict(context_positions=positions, context_mask=jnp.ones((2, 3), jnp.int32))
  np.testing.assert_array_equal(loaded(*args, _inputs(), **extra), model(*args, _inputs(), **extra))
  assert "blocks.1.attn.qkv_proj.weight" in state and state["word_embed.weight"].shape == (32, 4)


def test_transformer_state_dict_errors(class_model):
  state = transformer_state_dict(class_model)
  with pytest.raises(ValueError, match="missing from the checkpoint: .*pos_start"):
    load_transformer({k: v for k, v in state.items() if k != "pos_start"}, TINY_CLASS)
  with pytest.raises(ValueError, match="not in the model: pos_1LC"):
    load_transformer({**state, "pos_1LC": np.zeros((1, 14, 32))}, TINY_CLASS)
  with pytest.raises(ValueError, match=r"head\.(weight|bias)"):
    load_transformer(state, dict(TINY_CLASS, vocab_size=17))


def test_transformer_bad_inputs_are_named(class_model, context_model):
  with pytest.raises(ValueError, match="conditioning must be"):
    HARTTransformer(**dict(TINY_T, conditioning="text"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divisible by 4"):
    HARTTransformer(**dict(TINY_CLASS, width=40, num_heads=4), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="next-scale inputs"):
    class_model(jnp.asarray([1, 3]), _inputs()[:, :-1])
  with pytest.raises(ValueError, match="labels"):
    class_model(jnp.zeros((2, 3, 6)), _inputs())
  context, _ = _context_batch()
  with pytest.raises(ValueError, match="context_positions"):
    context_model(context, _inputs())


# ------------------------------------------------------------------------------------------ training, sampling

HART_CLASS = dict(depth=2, width=32, num_heads=2, vocab_size=16, cvae=4, patch_nums=SCALES, conditioning="class",
                  num_classes=5, residual_head=dict(width=16, depth=1, num_steps="3", batch_mul=2))


@pytest.fixture(scope="module")
def hart_model():
  return _randomize(HARTTransformer(**HART_CLASS, rngs=nnx.Rngs(7)), 7, 0.2)


def test_sampler_matches_the_teacher_forced_forward_and_adds_the_residual(hart_model, tok):
  """The KV-cached per-scale logits equal the teacher-forced forward fed the sampled codes (both row halves),
  the residual is the head's guided sample on the teacher-forced condition at the official last-scale ratio
  (K - 2) / (K - 1), and f_hat is the hybrid walk with that residual added at the last scale."""
  labels, keys = jnp.asarray([1, 3], jnp.int32), jax.random.split(jax.random.key(0), 2)
  settings = HARTSampling(CategoricalSampling(cfg=2.0, top_k=0, top_p=0.0), residual_cfg=3.0)

  @nnx.jit
  def run(model, tok):
    token_draws, noise = hart_sampling.draws(model, keys, settings)
    out = hart_sampling.sample(model, tok, labels, settings, token_draws, noise)
    inputs = tok.quantize.teacher_forcing_input(out.tokens)
    cond_h, cond_c = model.hidden(labels, inputs)
    null_h, null_c = model.hidden(jnp.full_like(labels, 5), inputs)
    head, codes = model.residual_head, tok.quantize.embedding(out.tokens[-1])
    z, zu = (head.condition(*model.head_inputs(h, codes)) for h in (cond_h, null_h))
    return dict(out=out, cond=model.logits(cond_h, cond_c), null=model.logits(null_h, null_c),
                want=head.sample(z, zu, noise, ResidualSampling(cfg=3.0), 1, 3),
                at_last=head.sample(z, zu, noise, ResidualSampling(cfg=3.0), 2, 3),
                hybrid=tok.tokens_fhat(HybridTokens(out.tokens, codes + out.residual)),
                discrete=tok.discrete_fhat(out.tokens))

  r = run(hart_model, tok)
  out = r["out"]
  np.testing.assert_allclose(jnp.concatenate([l[:2] for l in out.logits], 1), r["cond"], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(jnp.concatenate([l[2:] for l in out.logits], 1), r["null"], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(out.residual, r["want"], atol=2e-5, rtol=1e-4)
  assert float(jnp.abs(r["want"] - r["at_last"]).max()) > 1e-4  # the ratio matters
  assert float(jnp.abs(out.residual).max()) > 1e-3
  np.testing.assert_allclose(out.f_hat, r["hybrid"], atol=1e-5)
  np.testing.assert_allclose(out.f_hat - r["discrete"], out.residual.reshape(2, 4, 4, 4), atol=1e-5)


_hart_sample = nnx.jit(lambda m, t, labels, keys, settings: m.sample(t, labels, keys, settings), static_argnums=4)


def test_samples_do_not_depend_on_the_batch(hart_model, tok):
  settings = HARTSampling(CategoricalSampling(cfg=1.5, top_k=8, top_p=0.9), residual_steps=2)
  k = jax.random.split(jax.random.key(3), 3)
  first = _hart_sample(hart_model, tok, jnp.asarray([0, 2], jnp.int32), k[:2], settings)
  second = _hart_sample(hart_model, tok, jnp.asarray([4, 2], jnp.int32), jnp.stack([k[2], k[1]]), settings)
  np.testing.assert_allclose(first[1], second[1], atol=1e-5)  # same key and label, other neighbour
  assert float(jnp.abs(first[0] - second[0]).max()) > 1e-3
  assert float(jnp.abs(first[0] - first[1]).max()) > 1e-3
  # residual_steps resamples with 2 steps from the same parameters; the head keeps its own 3
  assert hart_sampling.residual_head_for(hart_model.residual_head, 2).sample_schedule.num_steps == 2
  assert hart_model.residual_head.sample_schedule.num_steps == 3
  assert hart_sampling.draws(hart_model, k[:2], settings)[1].shape == (2, 3, 16, 4)


def test_sampling_settings_errors_name_the_value(hart_model, tok):
  with pytest.raises(ValueError, match="residual_cfg.*-1"):
    HARTSampling(residual_cfg=-1.0)
  with pytest.raises(ValueError, match="residual_temperature.*nan"):
    HARTSampling(residual_temperature=float("nan"))
  with pytest.raises(ValueError, match="residual_steps.*0"):
    HARTSampling(residual_steps=0)
  with pytest.raises(ValueError, match="categorical"):
    HARTSampling(categorical=ResidualSampling())
  with pytest.raises(ValueError, match="HARTSampling"):
    hart_model.sample(tok, jnp.asarray([0]), jax.random.split(jax.random.key(0), 1), CategoricalSampling())


def test_loss_is_ce_plus_the_residual_head_loss(hart_model, tok, tokens):
  labels, rng = jnp.asarray([1, 4], jnp.int32), jax.random.key(5)

  @nnx.jit
  def run(model, tok, tokens):
    loss, metrics = model.loss(tokens, labels, rng, tokenizer=tok, train=False)
    inputs = tok.quantize.teacher_forcing_input(tokens.indices)
    hidden, cond = model.hidden(labels, inputs)
    logits = model.logits(hidden, cond)
    logp = jax.nn.log_softmax(logits, -1)
    ce = -jnp.mean(jnp.take_along_axis(logp, jnp.concatenate(tokens.indices, 1)[..., None], -1))
    # the head's target: the continuous token minus the codes drawn from the model's own last-scale logits
    _, code_rng, head_rng = jax.random.split(rng, 3)
    codes = tok.quantize.embedding(model.head_codes(logits[:, -16:], code_rng))
    z = model.residual_head.condition(*model.head_inputs(hidden, codes))
    want = model.residual_head.loss(z, tokens.rest_before_last - codes, head_rng)
    argmax_ok = jnp.all(model.head_codes(logits, code_rng, top_k=1) == jnp.argmax(logits, -1))
    grads = nnx.grad(lambda m: m.loss(tokens, labels, rng, tokenizer=tok)[1]["residual_loss"])(model)
    return loss, metrics, ce, want, argmax_ok, grads

  loss, metrics, ce, want, argmax_ok, grads = run(hart_model, tok, tokens)
  np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)  # every token of every scale weighs the same
  np.testing.assert_allclose(loss, metrics["ce"] + metrics["residual_loss"], rtol=1e-6)
  assert set(metrics) >= {"loss_scale_1", "loss_scale_2", "loss_scale_4", "token_accuracy", "residual_loss"}
  np.testing.assert_allclose(metrics["residual_loss"], want, rtol=1e-5)
  assert bool(argmax_ok)
  # gradients reach the residual head and, through its condition, the transformer
  assert float(jnp.abs(grads.residual_head.net.input_proj.kernel[...]).max()) > 0
  assert float(jnp.abs(grads.blocks[0].attn.qkv_proj.kernel[...]).max()) > 0
  assert float(jnp.abs(grads.word_embed.kernel[...]).max()) > 0


def test_transformer_with_residual_head_state_dict_round_trip(hart_model):
  sd = transformer_state_dict(hart_model)
  assert "diffloss.net.input_proj.weight" in sd and "decoder_norm.weight" in sd
  assert not any(k.startswith("residual_head") for k in sd)
  back = load_transformer(sd, HART_CLASS)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(hart_model, nnx.Param)),
                               jax.tree_util.tree_leaves_with_path(nnx.state(back, nnx.Param))):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
  assert len(jax.tree.leaves(nnx.state(back, nnx.Param))) == len(jax.tree.leaves(nnx.state(hart_model, nnx.Param)))


FLOW_CLASS = dict(HART_CLASS, residual_head=dict(kind="flow", width=16, depth=1, num_steps=3, batch_mul=2))


def test_flow_residual_head_trains_and_samples_through_the_model(tok, tokens):
  """kind='flow' builds the flow head; the sampler runs its num_steps Euler steps with the diffusion head's
  guidance weight (flow cfg 1 + residual_cfg), residual_steps overrides them, and the loss trains it."""
  model = _randomize(HARTTransformer(**FLOW_CLASS, rngs=nnx.Rngs(7)), 7, 0.2)
  assert isinstance(model.residual_head, FlowResidualHead) and model.residual_head.num_steps == 3
  labels, keys = jnp.asarray([1, 3], jnp.int32), jax.random.split(jax.random.key(0), 2)
  settings = HARTSampling(CategoricalSampling(cfg=2.0, top_k=0, top_p=0.0), residual_cfg=3.0)

  @nnx.jit
  def run(model, tok):
    token_draws, noise = hart_sampling.draws(model, keys, settings)
    out = hart_sampling.sample(model, tok, labels, settings, token_draws, noise)
    inputs = tok.quantize.teacher_forcing_input(out.tokens)
    head, codes = model.residual_head, tok.quantize.embedding(out.tokens[-1])
    z, zu = (head.condition(*model.head_inputs(model.hidden(l, inputs)[0], codes))
             for l in (labels, jnp.full_like(labels, 5)))
    want = head.sample(z, zu, noise, SamplingSettings(cfg=4.0, num_steps=3), 1, 3)
    two = hart_sampling.residual_head_for(head, 2).sample(z, zu, noise, SamplingSettings(cfg=4.0, num_steps=2), 1, 3)
    grads = nnx.grad(lambda m: m.loss(tokens, labels, jax.random.key(5), tokenizer=tok)[1]["residual_loss"])(model)
    return out.residual, want, two, grads

  residual, want, two, grads = run(model, tok)
  np.testing.assert_allclose(residual, want, atol=2e-5, rtol=1e-4)
  assert float(jnp.abs(want - two).max()) > 1e-4  # the step count matters
  assert float(jnp.abs(grads.residual_head.net.input_proj.kernel[...]).max()) > 0
  with pytest.raises(ValueError, match="per-step noise"):
    hart_sampling.head_settings(model.residual_head, HARTSampling(residual_temperature=0.5))
  with pytest.raises(ValueError, match="kind.*'ode'"):
    HARTTransformer(**dict(HART_CLASS, residual_head=dict(kind="ode", width=16, depth=1)), rngs=nnx.Rngs(0))


def test_residual_kind_config_is_validated():
  from flowar_jax.config import validate_config  # pylint: disable=g-import-not-at-top
  from flowar_jax.config_hart import hart_preset, residual_head_kwargs  # pylint: disable=g-import-not-at-top
  c = hart_preset(2)
  assert residual_head_kwargs(c.model)["kind"] == "diffusion"
  c.model.residual.kind = "flow"
  validate_config(c)
  c.sampling.residual_temperature = 0.5
  with pytest.raises(ValueError, match="residual_temperature"):
    validate_config(c)
  c.sampling.residual_temperature = 1.0
  c.model.residual.kind = "ddim"
  with pytest.raises(ValueError, match="config.model.residual.kind.*'ddim'"):
    validate_config(c)
