"""HART on the parallel machinery: every parameter of the transformer, its residual head and the hybrid tokenizer
has logical axis names, and a sharded training loss and gradient (8 fake CPU devices, fsdp=4 x tensor=2) equal
one device's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from flax import nnx

from flowar_jax.heads.residual_flow import FlowResidualHead
from flowar_jax.models.hart import HARTTransformer
from flowar_jax.tokenizers.hybrid import HybridTokenizer
from test_var_parallel import unnamed_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD = dict(width=16, depth=2, num_steps=4, batch_mul=2)


@pytest.mark.parametrize("branches", [
    dict(mlp="llama", adaln=True, timestep_level=False, attn_l2_norm=False),
    dict(mlp="gpt2", adaln=False, timestep_level=True, attn_l2_norm=True),
])
def test_every_hart_parameter_has_logical_names(branches):
  count, missing = unnamed_params(lambda: HARTTransformer(
      depth=2, width=32, num_heads=2, num_classes=5, vocab_size=16, cvae=4, patch_nums=(1, 2, 4), residual_head=HEAD,
      rngs=nnx.Rngs(0), **branches))
  assert count > 40 and not missing, missing


def test_every_context_path_and_flow_head_parameter_has_logical_names():
  count, missing = unnamed_params(lambda: HARTTransformer(
      depth=1, conditioning="context", context_tokens=3, context_dim=8, width=32, num_heads=2, vocab_size=16,
      cvae=4, patch_nums=(1, 2), rngs=nnx.Rngs(0)))
  assert count > 15 and not missing, missing
  count, missing = unnamed_params(lambda: FlowResidualHead(4, 32, width=16, depth=1, norm="layer", rngs=nnx.Rngs(0)))
  assert count > 10 and not missing, missing


def test_every_hybrid_tokenizer_parameter_has_logical_names():
  count, missing = unnamed_params(lambda: HybridTokenizer(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 2),
                                                          num_res_blocks=1, patch_nums=(1, 2, 4), rngs=nnx.Rngs(0)))
  assert count > 20 and not missing, missing


SHARDED_CHECK = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from flowar_jax.config import base_config
    from flowar_jax.models.hart import HARTTransformer
    from flowar_jax.parallel.plan import ShardingPlan
    from flowar_jax.tokenizers.hybrid import HybridTokenizer

    SCALES = (1, 2, 4)
    config = base_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
    plan = ShardingPlan.from_config(config)
    # Width 64 over fsdp=4, 4 heads and the SwiGLU's 256 units over tensor=2; the head's width 32 over fsdp=4.
    model = HARTTransformer(depth=2, width=64, num_heads=4, num_classes=5, vocab_size=32, cvae=4, patch_nums=SCALES,
                            residual_head=dict(width=32, depth=1, num_steps=4, batch_mul=2), rngs=nnx.Rngs(0))
    tokenizer = HybridTokenizer(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                patch_nums=SCALES, rngs=nnx.Rngs(1))
    draw = np.random.default_rng(2)  # adaLN gammas and the head's zero-initialised layers hide paths: randomise
    nnx.update(model, jax.tree.map(lambda p: jnp.asarray(0.3 * draw.standard_normal(p.shape), jnp.float32),
                                   nnx.state(model, nnx.Param)))
    images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (8, 8, 8, 3)), jnp.float32)
    tokens = tokenizer.encode(images)
    labels = jnp.asarray(np.random.default_rng(4).integers(0, 5, 8), jnp.int32)
    graphdef, state = nnx.split((model, tokenizer), nnx.Param)

    def loss_and_grad(state, tokens, labels, key):
      def loss(state):
        model, tokenizer = nnx.merge(graphdef, state)
        return model.loss(tokens, labels, key, tokenizer=tokenizer)
      return jax.value_and_grad(loss, has_aux=True)(state)

    key = jax.random.key(5)
    (single, single_metrics), single_grads = jax.jit(loss_and_grad)(state, tokens, labels, key)
    placed = plan.place(state)
    batch = plan.batch_sharding()
    (sharded, sharded_metrics), sharded_grads = plan.jit(loss_and_grad)(
        placed, jax.device_put(tokens, batch), jax.device_put(labels, batch), key)
    grad_diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-12))
                    for a, b in zip(jax.tree.leaves(sharded_grads), jax.tree.leaves(single_grads)))
    print("REPORT " + json.dumps(dict(
        devices=len(jax.devices()), mesh=dict(plan.mesh.shape),
        specs={jax.tree_util.keystr(p): str(v.sharding.spec) for p, v in jax.tree_util.tree_leaves_with_path(placed)},
        loss=[float(single), float(sharded)],
        residual=[float(single_metrics["residual_loss"]), float(sharded_metrics["residual_loss"])],
        grad_diff=grad_diff)))
""")


@pytest.fixture(scope="module")
def sharded_report():
  """One subprocess with 8 fake CPU devices (so this process keeps one)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  result = subprocess.run([sys.executable, "-c", SHARDED_CHECK], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
  reports = [line[len("REPORT "):] for line in result.stdout.splitlines() if line.startswith("REPORT ")]
  assert result.returncode == 0 and reports, result.stderr[-4000:]
  report = json.loads(reports[-1])
  assert report["devices"] == 8 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  return report


def test_sharded_loss_and_gradient_match_one_device(sharded_report):
  """On data 1 x fsdp 4 x tensor 2 the parameters are split by their logical names (the residual head's too),
  and HART's training loss (CE plus the residual head on self-drawn codes, dropout on) and its gradient equal
  one device's up to float32 reordering."""
  specs = sharded_report["specs"]
  assert specs["[0]['blocks'][0]['attn']['qkv_proj']['kernel'].value"] == "P('fsdp', None)"
  assert specs["[0]['blocks'][0]['ffn']['gate_proj']['kernel'].value"] == "P('fsdp', 'tensor')"
  assert specs["[0]['residual_head']['net']['res_blocks'][0]['fc1']['kernel'].value"] == "P('fsdp', 'tensor')"
  assert specs["[0]['residual_head']['net']['time_embed']['linear_1']['kernel'].value"] == "P(None, 'fsdp')"
  single, sharded = sharded_report["loss"]
  assert single > 0 and abs(sharded - single) <= 1e-5 * single, sharded_report["loss"]
  single, sharded = sharded_report["residual"]
  assert single > 0 and abs(sharded - single) <= 1e-5 * single, sharded_report["residual"]
  assert sharded_report["grad_diff"] < 1e-4, sharded_report["grad_diff"]
