"""VAR on the parallel machinery: every VAR and multi-scale VQVAE parameter has logical axis names, a sharded
forward, loss and gradient (8 fake CPU devices, fsdp=4 x tensor=2) equal one device's, and the Pallas
scale-causal kernels (interpreted on a CPU) give XLA's logits, gradients and sampled tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowar_jax.heads import CategoricalSampling
from flowar_jax.models.params import path_name
from flowar_jax.models.var import VAR, sample, sampling_draws
from flowar_jax.tokenizers import MultiScaleVQVAE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALES = (1, 2, 3, 4)
# Head dim 64 (the kernels' smallest tile-friendly size); 30 tokens, so the kernels pad the sequence.
KERNEL_VAR = dict(depth=2, width=128, num_heads=2, num_classes=5, vocab_size=32, cvae=4, patch_nums=SCALES)
TINY_VQ = dict(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=SCALES)


def unnamed_params(make) -> tuple[int, list[str]]:
  """(number of parameters, those whose logical axis names do not cover every dimension)."""
  params = nnx.state(nnx.eval_shape(make), nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return len(leaves), [path_name(path) for path, var in leaves
                       if len(var.get_metadata().get("out_sharding") or ()) != var.get_value().ndim]


@pytest.mark.parametrize("shared_aln,l2", [(False, True), (True, True), (False, False)])
def test_every_var_parameter_has_logical_names(shared_aln, l2):
  count, missing = unnamed_params(lambda: VAR(depth=2, width=32, num_heads=2, num_classes=5, vocab_size=16, cvae=4,
                                              patch_nums=(1, 2, 4), shared_aln=shared_aln, attn_l2_norm=l2,
                                              rngs=nnx.Rngs(0)))
  assert count > 20 and not missing, missing


def test_every_msvq_parameter_has_logical_names():
  count, missing = unnamed_params(lambda: MultiScaleVQVAE(**TINY_VQ, rngs=nnx.Rngs(0)))
  assert count > 20 and not missing, missing


SHARDED_CHECK = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from flowar_jax.config import base_config
    from flowar_jax.models.var import VAR
    from flowar_jax.parallel.plan import ShardingPlan
    from flowar_jax.tokenizers import MultiScaleVQVAE

    SCALES = (1, 2, 3, 4)
    config = base_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
    plan = ShardingPlan.from_config(config)
    rng = np.random.default_rng(0)
    indices = [jnp.asarray(rng.integers(0, 32, (8, pn * pn)), jnp.int32) for pn in SCALES]
    labels = jnp.asarray(rng.integers(0, 5, 8), jnp.int32)
    key = jax.random.key(4)

    def check(shared_aln):
      # Width 64 over fsdp=4, 4 heads and the MLP's 256 units over tensor=2: every named dimension divides.
      var = VAR(depth=2, width=64, num_heads=4, num_classes=5, vocab_size=32, cvae=4, patch_nums=SCALES,
                shared_aln=shared_aln, rngs=nnx.Rngs(0))
      vq = MultiScaleVQVAE(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                           patch_nums=SCALES, rngs=nnx.Rngs(1))
      for model, seed in ((var, 2), (vq, 3)):  # gammas start at ~1e-5: randomise so every path counts
        draw = np.random.default_rng(seed)
        nnx.update(model, jax.tree.map(lambda p: jnp.asarray(0.3 * draw.standard_normal(p.shape), jnp.float32),
                                       nnx.state(model, nnx.Param)))
      graphdef, state = nnx.split((var, vq.quantize), nnx.Param)

      def forward_and_loss(state, labels, indices, key):
        var, quantizer = nnx.merge(graphdef, state)
        logits = var(labels, quantizer.teacher_forcing_input(indices))
        def loss(state):  # cross-entropy of the teacher-forced logits, label and drop-path dropout on
          var, quantizer = nnx.merge(graphdef, state)
          train_logits = var(labels, quantizer.teacher_forcing_input(indices), rng=key)
          logp = jax.nn.log_softmax(train_logits, axis=-1)
          return -jnp.mean(jnp.take_along_axis(logp, jnp.concatenate(indices, 1)[..., None], axis=-1))
        value, grads = jax.value_and_grad(loss)(state)
        return logits, value, grads

      single = jax.jit(forward_and_loss)(state, labels, indices, key)
      placed = plan.place(state)
      batch = plan.batch_sharding()
      sharded = plan.jit(forward_and_loss)(placed, jax.device_put(labels, batch),
                                            [jax.device_put(i, batch) for i in indices], key)
      grad_diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                      for a, b in zip(jax.tree.leaves(sharded[2]), jax.tree.leaves(single[2])))
      return dict(specs={jax.tree_util.keystr(p): str(v.sharding.spec)
                         for p, v in jax.tree_util.tree_leaves_with_path(placed)},
                  logits_diff=float(jnp.max(jnp.abs(sharded[0] - single[0]))),
                  logits_scale=float(jnp.max(jnp.abs(single[0]))), loss=[float(single[1]), float(sharded[1])],
                  grad_diff=grad_diff)

    print("REPORT " + json.dumps(dict(devices=len(jax.devices()), mesh=dict(plan.mesh.shape),
                                      runs={str(shared): check(shared) for shared in (False, True)})))
""")


@pytest.fixture(scope="module")
def sharded_report():
  """One subprocess with 8 fake CPU devices (so this process keeps one), both adaLN layouts."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  result = subprocess.run([sys.executable, "-c", SHARDED_CHECK], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
  reports = [line[len("REPORT "):] for line in result.stdout.splitlines() if line.startswith("REPORT ")]
  assert result.returncode == 0 and reports, result.stderr[-4000:]
  report = json.loads(reports[-1])
  assert report["devices"] == 8 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  return report["runs"]


@pytest.mark.parametrize("shared_aln", [False, True])
def test_sharded_forward_loss_and_gradient_match_one_device(sharded_report, shared_aln):
  """On data 1 x fsdp 4 x tensor 2 the parameters are split by their logical names, and the VQ's
  teacher-forcing inputs, VAR's logits, a cross-entropy loss with dropout and its gradient equal one device's
  up to float32 reordering."""
  report = sharded_report[str(shared_aln)]
  specs = report["specs"]
  # The parameters that once had no names are split too, not only the linear layers.
  assert specs["[0]['pos_1LC'].value"] == "P(None, None, 'fsdp')"
  assert specs["[0]['class_emb']['embedding'].value"] == "P(None, 'fsdp')"
  assert specs["[0]['blocks'][0]['attn']['mat_qkv']['kernel'].value"] == "P('fsdp', None)"
  assert specs["[0]['blocks'][0]['ffn']['fc1']['kernel'].value"] == "P('fsdp', 'tensor')"
  assert specs["[0]['blocks'][0]['attn']['scale_mul_1H11'].value"] == "P(None, 'tensor', None, None)"
  if shared_aln:
    assert specs["[0]['blocks'][0]['ada_gss'].value"] == "P(None, None, None, 'fsdp')"
  assert specs["[1]['quant_resi'][0]['conv']['kernel'].value"] == "P(None, None, None, 'fsdp')"
  assert report["logits_diff"] <= 1e-5 * report["logits_scale"], report["logits_diff"]
  single, sharded = report["loss"]
  assert single > 0 and abs(sharded - single) <= 1e-5 * single, report["loss"]
  assert report["grad_diff"] < 1e-4, report["grad_diff"]


def _randomized(model: nnx.Module, seed: int) -> nnx.Module:
  """Every parameter drawn at random (the default init's ~1e-5 gammas and 0.02-scaled head hide paths)."""
  draw = np.random.default_rng(seed)  # host draws: no small program compiled per parameter shape
  nnx.update(model, jax.tree.map(lambda p: jnp.asarray(0.3 * draw.standard_normal(p.shape), jnp.float32),
                                 nnx.state(model, nnx.Param)))
  return model


@pytest.fixture(scope="module")
def kernel_models():
  """The same tiny VAR (head dim 64) through the Pallas kernels and through XLA, and a VQ to sample with."""
  def build(impl):
    return _randomized(VAR(**KERNEL_VAR, attention_impl=impl, rngs=nnx.Rngs(0)), 1)
  vq = _randomized(MultiScaleVQVAE(**TINY_VQ, rngs=nnx.Rngs(2)), 3)
  return build("pallas"), build("xla"), vq


def test_pallas_forward_and_gradient_equal_xla(kernel_models):
  pallas, xla, vq = kernel_models
  rng = np.random.default_rng(0)
  labels = jnp.asarray(rng.integers(0, 5, 2), jnp.int32)
  indices = [jnp.asarray(rng.integers(0, 32, (2, pn * pn)), jnp.int32) for pn in SCALES]
  next_inputs, targets = vq.quantize.teacher_forcing_input(indices), jnp.concatenate(indices, 1)

  def run(model):
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def loss(params):
      logits = nnx.merge(graphdef, params)(labels, next_inputs)
      logp = jax.nn.log_softmax(logits, axis=-1)
      return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits

    return jax.value_and_grad(loss, has_aux=True)(params)

  (loss_p, logits_p), grads_p = run(pallas)
  (loss_x, logits_x), grads_x = run(xla)
  assert logits_p.shape == (2, 30, 32)
  np.testing.assert_allclose(logits_p, logits_x, rtol=1e-5, atol=1e-5 * float(jnp.abs(logits_x).max()))
  np.testing.assert_allclose(loss_p, loss_x, rtol=1e-6)
  paths = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads_x)]
  for name, g, g_ref in zip(paths, jax.tree.leaves(grads_p), jax.tree.leaves(grads_x)):
    scale = float(jnp.abs(g_ref).max())
    assert scale > 0, name  # every parameter is on the path, so a wrong kernel gradient would show
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_pallas_kv_cached_sampler_gives_xla_tokens(kernel_models):
  """The sampler's decode path through the kernels draws the same tokens from the same uniform draws, with
  guidance and both filters on."""
  pallas, xla, vq = kernel_models
  labels = jnp.asarray([0, 3], jnp.int32)
  settings = CategoricalSampling(cfg=2.0, top_k=16, top_p=0.9)
  draws = sampling_draws(jax.random.key(7), 2, SCALES, 32, False)
  run = lambda model: nnx.jit(lambda m, q, d: sample(m, q, labels, settings, d))(model, vq, draws)
  got, want = run(pallas), run(xla)
  for a, b in zip(got.tokens, want.tokens):
    np.testing.assert_array_equal(a, b)
  assert len({int(t) for t in np.concatenate([np.asarray(t).ravel() for t in want.tokens])}) > 4  # not degenerate
  np.testing.assert_allclose(jnp.concatenate(got.logits, 1), jnp.concatenate(want.logits, 1), rtol=1e-5, atol=1e-4)
