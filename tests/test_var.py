"""VAR: parameter counts of the published sizes, the scale-causal transformer, its KV-cached sampler, the
multi-scale VQVAE, the categorical sampling rules and the state-dict conversion (all on a CPU, no torch)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowar_jax.config import validate_config
from flowar_jax.config_files import load_config
from flowar_jax.convert.var import load_var, load_vqvae, var_state_dict, vqvae_state_dict
from flowar_jax.heads import CategoricalSampling, filter_top_k_top_p, guided_logits, gumbel_softmax, sample_from_uniform
from flowar_jax.models.params import flat_params
from flowar_jax.models.var import VAR, KnownTokens, sample, sampling_draws
from flowar_jax.models.registry import build_model, build_vae, tokenizer_seam
from flowar_jax.sampling.generate import settings_from
from flowar_jax.scales.resize import area_resize, bicubic_resize
from flowar_jax.tokenizers import MultiScaleVQVAE, phi_index

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SCALES = (1, 2, 4)
TINY_VAR = dict(depth=2, width=32, num_heads=2, num_classes=5, vocab_size=16, cvae=4, patch_nums=TINY_SCALES)
# ch_mult (1, 2): stride 2, so the last scale 4 is an 8 px image.
TINY_VQ = dict(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=TINY_SCALES)


def _count(build) -> float:
  return sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(build), nnx.Param))) / 1e6


@pytest.mark.parametrize("depth,millions", [(16, 310.28), (20, 600.92), (24, 1033.40), (30, 2010.02)])
def test_published_var_sizes(depth, millions):
  """The preset files build the published sizes (as the official code counts them)."""
  config = load_config(os.path.join(_REPO, "configs", f"var_d{depth}.py"))
  validate_config(config)
  assert round(_count(lambda: build_model(config)), 2) == millions
  assert round(_count(lambda: build_vae(config)), 2) == 108.95


def test_published_vqvae_size():
  assert round(_count(lambda: MultiScaleVQVAE(rngs=nnx.Rngs(0))), 2) == 108.95


@pytest.fixture(scope="module")
def tiny():
  var = VAR(**TINY_VAR, rngs=nnx.Rngs(0))
  vq = MultiScaleVQVAE(**TINY_VQ, rngs=nnx.Rngs(1))
  # The default init's gammas are ~1e-5 and the head scaled by 0.02: randomise so every path matters.
  return _randomized(var, 2), _randomized(vq, 3)


def _randomized(model, seed):
  keys = iter(jax.random.split(jax.random.key(seed), 200))
  nnx.update(model, jax.tree.map(lambda p: 0.3 * jax.random.normal(next(keys), p.shape), nnx.state(model, nnx.Param)))
  return model


def _inputs(var, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  labels = jnp.asarray(rng.integers(0, var.num_classes, batch), jnp.int32)
  x = jnp.asarray(rng.standard_normal((batch, var.schedule.num_tokens - 1, var.cvae)), jnp.float32)
  return labels, x


def test_forward_shape_and_bad_input(tiny):
  var, _ = tiny
  labels, x = _inputs(var)
  assert var(labels, x).shape == (2, 21, 16)
  with pytest.raises(ValueError, match="next-scale inputs"):
    var(labels, x[:, :-1])


def test_width_and_heads_follow_depth():
  model = nnx.eval_shape(lambda: VAR(depth=3, vocab_size=8, num_classes=2, cvae=4, patch_nums=(1, 2),
                                     rngs=nnx.Rngs(0)))
  assert (model.width, model.num_heads) == (192, 3)
  assert model.blocks[0].attn.scale_mul_1H11.shape == (1, 3, 1, 1)


@pytest.mark.parametrize("scale", [1, 2])
def test_scale_causal(tiny, scale):
  """Changing scale `scale`'s input leaves every earlier scale's logits unchanged and changes its own."""
  var, _ = tiny
  labels, x = _inputs(var)
  offsets = var.schedule.offsets
  changed = x.at[:, offsets[scale] - 1:offsets[scale + 1] - 1].add(1.0)
  before, after = var(labels, x), var(labels, changed)
  np.testing.assert_array_equal(before[:, :offsets[scale]], after[:, :offsets[scale]])
  assert not np.allclose(before[:, offsets[scale]:offsets[scale + 1]], after[:, offsets[scale]:offsets[scale + 1]])


def test_condition_dropout_only_with_rng():
  var = _randomized(VAR(**TINY_VAR, drop_path_rate=0.0, rngs=nnx.Rngs(0)), 8)
  labels, x = _inputs(var, batch=64)
  null = var(jnp.full_like(labels, var.num_classes), x)
  dropped = np.asarray(jnp.all(jnp.isclose(var(labels, x, rng=jax.random.key(0)), null, atol=1e-5), axis=(1, 2)))
  assert 0 < dropped.sum() < 20  # cond_drop_rate 0.1 of 64 rows
  np.testing.assert_array_equal(var(labels, x), var(labels, x))


@pytest.mark.parametrize("shared_aln,l2", [(False, True), (True, True), (False, False)])
def test_cached_sampling_equals_full_forward(shared_aln, l2):
  """The KV-cached sampler's per-scale logits equal the teacher-forced forward fed the sampled tokens."""
  var = _randomized(VAR(**TINY_VAR, shared_aln=shared_aln, attn_l2_norm=l2, rngs=nnx.Rngs(3)), 5)
  vq = MultiScaleVQVAE(**TINY_VQ, rngs=nnx.Rngs(4))
  labels = jnp.asarray([1, 3], jnp.int32)
  settings = CategoricalSampling(cfg=0.0, top_k=0, top_p=0.0)  # cfg 0: guided logits are the conditional ones
  result = sample(var, vq, labels, settings, sampling_draws(jax.random.key(6), 2, TINY_SCALES, 16, False))
  cached = jnp.concatenate([l[:2] for l in result.logits], axis=1)
  full = var(labels, vq.quantize.teacher_forcing_input(result.tokens))
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)
  # and the unconditional half is the null class's forward
  uncond = jnp.concatenate([l[2:] for l in result.logits], axis=1)
  np.testing.assert_allclose(uncond, var(jnp.full_like(labels, 5), vq.quantize.teacher_forcing_input(result.tokens)),
                             atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(result.f_hat, vq.quantize.indices_to_fhat(result.tokens), atol=1e-5)


def test_sampling_is_a_function_of_the_draws(tiny):
  var, vq = tiny
  labels = jnp.asarray([0, 4], jnp.int32)
  settings = CategoricalSampling(cfg=2.0, top_k=8, top_p=0.9)
  run = lambda key: np.concatenate([np.asarray(t) for t in sample(
      var, vq, labels, settings, sampling_draws(jax.random.key(key), 2, TINY_SCALES, 16, False)).tokens], 1)
  np.testing.assert_array_equal(run(0), run(0))
  assert (run(0) != run(1)).any()
  smooth = CategoricalSampling(cfg=2.0, top_k=8, top_p=0.9, more_smooth=True)
  draws = sampling_draws(jax.random.key(0), 2, TINY_SCALES, 16, True)
  eager = sample(var, vq, labels, smooth, draws)
  jitted = nnx.jit(lambda v, q, d: sample(v, q, labels, smooth, d))(var, vq, draws)
  for a, b in zip(eager.tokens, jitted.tokens):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(eager.f_hat, jitted.f_hat, atol=1e-5)
  with pytest.raises(ValueError, match="gumbel"):
    sample(var, vq, labels, smooth, (draws[0], None))


def test_phi_index_rule():
  # 4 shared phis over 10 scales: ticks 1/12, 13/36, 23/36, 11/12 against k / 9.
  assert [phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
  assert [phi_index(k, 10, 10) for k in range(10)] == list(range(10))
  assert {phi_index(k, 10, 1) for k in range(10)} == {0}


def test_vq_nearest_is_brute_force(tiny):
  _, vq = tiny
  z = jax.random.normal(jax.random.key(0), (50, 4))
  codes = np.asarray(vq.quantize.embedding.embedding[...])
  want = np.argmin(((np.asarray(z)[:, None] - codes[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(vq.quantize.nearest(z), want)


def test_vq_round_trip(tiny):
  _, vq = tiny
  images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
  indices = vq.encode(images)
  assert [i.shape for i in indices] == [(2, 1), (2, 4), (2, 16)]
  assert all(i.dtype == jnp.int32 and int(i.min()) >= 0 and int(i.max()) < 16 for i in indices)
  f = vq.features(images)
  idx2, f_hats = vq.quantize.quantize(f)
  # decoding the indices rebuilds the quantiser's own final f_hat, and the images
  np.testing.assert_allclose(vq.quantize.indices_to_fhat(indices), f_hats[-1], atol=1e-5)
  np.testing.assert_allclose(vq.decode_indices(indices), vq.reconstruct(images), atol=1e-5)
  assert float(jnp.abs(vq.decode_indices(indices)).max()) <= 1.0
  # scale 0's code is the nearest code to the features' mean
  np.testing.assert_array_equal(indices[0][:, 0], vq.quantize.nearest(area_resize(f, 1).reshape(2, 4)))
  with pytest.raises(ValueError, match="images"):
    vq.encode(images[:, :4])
  with pytest.raises(ValueError, match="lengths"):
    vq.decode_indices(indices[::-1])


def test_teacher_forcing_input_is_the_next_scale_input(tiny):
  _, vq = tiny
  q = vq.quantize
  indices = [jnp.asarray([[3]]), jnp.asarray([[0, 5, 7, 1]]), jnp.asarray([list(range(16))])]
  tf = q.teacher_forcing_input(indices)
  assert tf.shape == (1, 4 + 16, 4)
  h0 = q.quant_resi[phi_index(0, 3, 4)](bicubic_resize(q.embed(indices[0], 1), 4))
  np.testing.assert_allclose(tf[:, :4], area_resize(h0, 2).reshape(1, 4, 4), atol=1e-6)
  f_hat = jnp.zeros((1, 4, 4, 4))
  chain = []
  for k in range(2):
    f_hat, nxt = q.next_input(k, f_hat, q.embed(indices[k], TINY_SCALES[k]))
    chain.append(nxt.reshape(1, -1, 4))
  np.testing.assert_allclose(tf, jnp.concatenate(chain, 1), atol=1e-6)


def test_guided_logits_ramp():
  cond, uncond = jnp.full((1, 2, 3), 2.0), jnp.full((1, 2, 3), 1.0)
  both = jnp.concatenate([cond, uncond])
  np.testing.assert_allclose(guided_logits(both, 4.0, 0.0), cond)
  np.testing.assert_allclose(guided_logits(both, 4.0, 0.5), 3 * cond - 2 * uncond)


def test_top_k():
  logits = jnp.asarray([[1.0, 5.0, 3.0, 3.0, -2.0]])
  out = np.asarray(filter_top_k_top_p(logits, 2, 0.0))
  np.testing.assert_array_equal(np.isfinite(out), [[False, True, True, True, False]])  # ties at the k-th kept
  out = np.asarray(filter_top_k_top_p(logits, 1, 0.0))
  np.testing.assert_array_equal(np.isfinite(out), [[False, True, False, False, False]])
  with pytest.raises(ValueError, match="vocabulary"):
    filter_top_k_top_p(logits, 6, 0.0)


def test_top_p():
  probs = np.asarray([0.1, 0.5, 0.1, 0.3])
  logits = jnp.log(jnp.asarray(probs))[None]
  # ascending cumulative 0.1, 0.2, 0.5, 1.0: entries at <= 1 - top_p go
  keep = lambda p: np.isfinite(np.asarray(filter_top_k_top_p(logits, 0, p)))[0].tolist()
  assert keep(0.7) == [False, True, False, True]
  assert keep(0.6) == [False, True, False, True]
  assert keep(0.45) == [False, True, False, False]  # cumulative 0.5 <= 0.55: the 0.3 goes too
  assert keep(0.3) == [False, True, False, False]
  assert keep(0.01) == [False, True, False, False]  # the largest always stays
  assert keep(0.95) == [True, True, True, True]
  # top-k first, then top-p over the renormalised survivors
  both = np.isfinite(np.asarray(filter_top_k_top_p(logits, 2, 0.5)))[0].tolist()
  assert both == [False, True, False, False]


def test_sample_from_uniform_inverts_the_cdf():
  probs = np.asarray([0.0, 0.25, 0.0, 0.5, 0.25])
  logits = jnp.log(jnp.asarray(probs))
  n = 1000
  u = (jnp.arange(n) + 0.5) / n  # stratified draws: counts must match the probabilities
  tokens = np.asarray(sample_from_uniform(jnp.broadcast_to(logits, (n, 5)), u))
  np.testing.assert_allclose(np.bincount(tokens, minlength=5) / n, probs, atol=2 / n)
  assert int(sample_from_uniform(logits[None], jnp.asarray([0.0]))[0]) == 1
  assert int(sample_from_uniform(logits[None], jnp.asarray([0.9999]))[0]) == 4


def test_gumbel_softmax_from_draws():
  logits = jnp.asarray([[0.0, 1.0, 2.0]])
  u = jnp.asarray([[0.5, 0.2, 0.999]])
  g = -jnp.log(-jnp.log(u))
  soft = gumbel_softmax(logits, u, 1.0)
  np.testing.assert_allclose(soft, jax.nn.softmax(logits + g), rtol=1e-6)
  assert int(jnp.argmax(gumbel_softmax(logits, u, 1e-3))) == int(jnp.argmax(logits + g))


def test_sampling_settings_validate():
  with pytest.raises(ValueError, match="top_p"):
    CategoricalSampling(top_p=1.0)
  with pytest.raises(ValueError, match="top_k"):
    CategoricalSampling(top_k=-1)


@pytest.mark.parametrize("shared_aln", [False, True])
def test_var_state_dict_round_trip(tiny, shared_aln):
  var = tiny[0] if not shared_aln else VAR(**TINY_VAR, shared_aln=True, rngs=nnx.Rngs(7))
  sd = var_state_dict(var)
  assert "blocks.1.attn.scale_mul_1H11" in sd and "head_nm.ada_lin.1.weight" in sd
  assert sd["blocks.0.attn.mat_qkv.weight"].shape == (96, 32)  # torch layout [out, in]
  assert ("blocks.0.ada_gss" in sd) == shared_aln and ("shared_ada_lin.1.weight" in sd) == shared_aln
  sd["attn_bias_for_masking"] = np.zeros((1, 1, 21, 21))  # buffers are skipped
  sd["blocks.0.attn.zero_k_bias"] = np.zeros(32)
  loaded = load_var(sd, dict(TINY_VAR, shared_aln=shared_aln))
  ours, theirs = flat_params(nnx.state(var, nnx.Param)), flat_params(nnx.state(loaded, nnx.Param))
  assert ours.keys() == theirs.keys()
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k])
  del sd["head.bias"]
  with pytest.raises(ValueError, match="missing from the checkpoint: head.bias"):
    load_var(sd, dict(TINY_VAR, shared_aln=shared_aln))


def test_vqvae_state_dict_round_trip(tiny):
  _, vq = tiny
  sd = vqvae_state_dict(vq)
  assert sd["quantize.quant_resi.qresi_ls.3.weight"].shape == (4, 4, 3, 3)
  assert sd["encoder.down.1.attn.0.qkv.weight"].shape == (192, 64, 1, 1)
  assert sd["decoder.up.1.attn.1.norm.weight"].shape == (64,) and "decoder.up.0.block.1.conv2.bias" in sd
  sd["quantize.ema_vocab_hit_SV"] = np.zeros((3, 16))
  loaded = load_vqvae(sd, TINY_VQ)
  images = jax.random.uniform(jax.random.key(0), (1, 8, 8, 3), minval=-1, maxval=1)
  np.testing.assert_array_equal(loaded.reconstruct(images), vq.reconstruct(images))
  sd["quantize.embedding.weight"] = np.zeros((8, 4))
  with pytest.raises(ValueError, match="quantize.embedding.weight"):
    load_vqvae(sd, TINY_VQ)


@pytest.mark.parametrize("name,depth,width", [("var_d16", 16, 1024), ("var_digits", 2, 128)])
def test_configs_build(name, depth, width):
  config = load_config(os.path.join(_REPO, "configs", f"{name}.py"))
  validate_config(config)
  var = nnx.eval_shape(lambda: build_model(config))
  vq = nnx.eval_shape(lambda: build_vae(config))
  assert (var.depth, var.width) == (depth, width) and tokenizer_seam(config, vq) is vq
  assert vq.patch_nums == var.schedule.sides and settings_from(config).top_k <= var.vocab_size
  assert vq.patch_nums[-1] * vq.downsample == config.data.image_size


@pytest.mark.parametrize("overrides,message", [
    ({"sampling.top_k": 100}, r"top_k must lie in \[0, vae.vocab_size = 64\]"),
    ({"data.image_size": 32}, r"data.image_size 32 must equal the last scale x the VQVAE's stride = 4 x 4"),
    ({"model.width": 100, "model.num_heads": 3}, "width 100 .* not divisible by the number of heads 3"),
    ({"data.cache_latents": True}, "cache_latents caches a KL VAE's posterior"),
    ({"stage": "flowar"}, r"config.stage must be one of \('vae', 'var', 'both'\)"),
])
def test_config_errors_are_named(overrides, message):
  config = load_config(os.path.join(_REPO, "configs", "var_digits.py"), overrides)
  with pytest.raises(ValueError, match=message):
    validate_config(config)


def test_flowar_keys_are_unknown_to_var():
  with pytest.raises(Exception, match="head"):
    load_config(os.path.join(_REPO, "configs", "var_digits.py"), {"model.head.depth": 2})


def test_known_tokens_are_kept_and_condition_the_rest(tiny):
  """Zero-shot editing: tokens outside the mask are the image's own at every scale; the masked ones are
  generated, and differ from a plain sample's only through what they are conditioned on."""
  var, vq = tiny
  labels = jnp.asarray([1, 3], jnp.int32)
  settings = CategoricalSampling(cfg=1.5, top_k=8, top_p=0.0)
  images = jax.random.uniform(jax.random.key(5), (2, 8, 8, 3), minval=-1, maxval=1)
  own = vq.encode(images)
  # generate the right half of every scale's token map
  masks = [jnp.broadcast_to((jnp.arange(pn * pn) % pn) >= pn // 2, (2, pn * pn)) for pn in TINY_SCALES]
  draws = sampling_draws(jax.random.key(9), 2, TINY_SCALES, 16, False)
  edited = sample(var, vq, labels, settings, draws, KnownTokens(own, masks))
  for got, keep_from, mask in zip(edited.tokens, own, masks):
    np.testing.assert_array_equal(np.where(mask, -1, got), np.where(mask, -1, keep_from))
  plain = sample(var, vq, labels, settings, draws)
  generated = np.concatenate([np.asarray(t)[np.asarray(m)] for t, m in zip(edited.tokens, masks)])
  plain_generated = np.concatenate([np.asarray(t)[np.asarray(m)] for t, m in zip(plain.tokens, masks)])
  assert (generated != plain_generated).any()  # the kept tokens changed what was generated
  np.testing.assert_allclose(edited.f_hat, vq.quantize.indices_to_fhat(edited.tokens), atol=1e-5)
