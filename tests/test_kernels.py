"""Scale-causal attention kernels: the block mask, the kernels against the reference (outputs, gradients,
dropout) in interpret mode for every backend, dispatch, sharding, the TPU compile, and training parity."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from flowar_jax.config import validate_config
from flowar_jax.kernels import (BlockSizes, ScaleCausalMask, api, decode_attention,
                                resolve_impl, scale_causal_attention)
from flowar_jax.kernels.dropout import keep_mask
from flowar_jax.models.attention import dot_product_attention
from flowar_jax.scales import ScaleSchedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("tpu", "gpu")
# Small tiles so the short test sequences span several blocks of every kind (full, partial, empty).
SMALL_BLOCKS = BlockSizes(q=16, kv=32, q_bwd=32, kv_bwd=16)


def qkv(mask, batch, heads, head_dim, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, mask.q_len, heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (batch, mask.kv_len, heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (batch, mask.kv_len, heads, head_dim), jnp.float32).astype(dtype)
  weights = jax.random.normal(keys[3], q.shape, jnp.float32)  # a loss whose gradient varies per element
  return q, k, v, weights


def dense_tables(mask, bq, bk):
  """Block tables by brute force from the dense mask, with the sequences padded to whole blocks."""
  nq, nk = -(-mask.q_len // bq), -(-mask.kv_len // bk)
  ends = np.concatenate([mask.kv_end_array(), np.full(nq * bq - mask.q_len, mask.kv_len)])
  dense = np.arange(nk * bk)[None, :] < ends[:, None]  # padded keys are never visible
  tiles = dense.reshape(nq, bq, nk, bk)
  any_, all_ = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))
  return any_, all_


@pytest.mark.parametrize("sides", [(1, 2, 4), (1, 2, 3, 4, 6, 8), (1, 2, 4, 8, 16)])
def test_mask_matches_schedule_and_block_tables(sides):
  schedule = ScaleSchedule(sides)
  mask = ScaleCausalMask.from_schedule(schedule)
  np.testing.assert_array_equal(mask.dense(), schedule.visibility())
  for bq, bk in [(8, 8), (16, 32), (32, 16), (128, 128)]:
    active, full = dense_tables(mask, bq, bk)
    nq, nk = active.shape
    for i in range(nq):
      # A q block's visible kv blocks are a prefix, and so are its full ones.
      assert int(mask.kv_blocks_active(i, bq, bk)) == active[i].sum() and active[i, :active[i].sum()].all()
      assert int(mask.kv_blocks_full(i, bq, bk)) == full[i].sum() and full[i, :full[i].sum()].all()
    for j in range(nk):
      # The q blocks that see a kv block are a suffix, and so are those that see all of it.
      assert int(mask.q_block_first_active(j, bq, bk)) == nq - active[:, j].sum()
      assert int(mask.q_block_first_full(j, bq, bk)) == nq - full[:, j].sum()
    census = mask.block_census(bq, bk)
    assert census == {"full": full.sum(), "partial": active.sum() - full.sum(), "empty": (~active).sum()}


def test_mask_rejects_bad_segments():
  with pytest.raises(ValueError, match="q_starts"):
    ScaleCausalMask((0, 5, 3), (1, 5, 9), 9, 9)
  with pytest.raises(ValueError, match="kv_ends"):
    ScaleCausalMask((0, 5), (6, 8), 9, 9)


CASES = [  # sides, batch, heads, head dim, dtype, dropout
    ((1, 2, 4), 2, 2, 64, jnp.float32, 0.0),
    ((1, 2, 3, 4, 6, 8), 1, 2, 96, jnp.bfloat16, 0.2),
    ((1, 2, 4, 8, 16), 1, 2, 64, jnp.float32, 0.1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sides,batch,heads,head_dim,dtype,rate", CASES)
def test_kernel_matches_reference(backend, sides, batch, heads, head_dim, dtype, rate):
  """Outputs and gradients of the interpreted kernels against the reference, with padding (21, 130 and 341
  tokens are not multiples of the blocks) and dropout from the shared hash."""
  mask = ScaleCausalMask.from_schedule(ScaleSchedule(sides))
  q, k, v, weights = qkv(mask, batch, heads, head_dim, dtype)
  rng = jax.random.key(5)

  def loss(q, k, v, impl):
    out = scale_causal_attention(q, k, v, mask, impl=impl, dropout_rate=rate, rng=rng,
                                 backend=None if impl == "xla" else backend, block_sizes=SMALL_BLOCKS)
    return jnp.sum(out.astype(jnp.float32) * weights), out

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  (_, out), grads = grad(q, k, v, "pallas")
  (_, out_ref), grads_ref = grad(q, k, v, "xla")
  assert out.dtype == dtype and out.shape == q.shape
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out_ref, np.float32), atol=tol, rtol=tol)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    g, g_ref = np.asarray(g, np.float32), np.asarray(g_ref, np.float32)
    assert np.abs(g_ref).max() > 1e-2, name
    np.testing.assert_allclose(g, g_ref, atol=tol * np.abs(g_ref).max(), rtol=tol, err_msg=f"d{name}")


def test_dropout_hash_rate_and_independence():
  rows, cols = jnp.arange(512, dtype=jnp.int32)[:, None], jnp.arange(512, dtype=jnp.int32)[None, :]
  seed = jnp.int32(12345)
  keep = np.asarray(keep_mask(rows, cols, seed, jnp.int32(0), 512, 0.1))
  assert abs(keep.mean() - 0.9) < 0.003
  assert abs(keep[:, :256].mean() - keep[:, 256:].mean()) < 0.01  # no drift along the keys
  other_head = np.asarray(keep_mask(rows, cols, seed, jnp.int32(1), 512, 0.1))
  other_seed = np.asarray(keep_mask(rows, cols, jnp.int32(54321), jnp.int32(0), 512, 0.1))
  for other in (other_head, other_seed):
    # Independent masks agree where both keep or both drop: 0.9**2 + 0.1**2 = 0.82 of the time.
    assert abs((keep == other).mean() - 0.82) < 0.005
  assert np.asarray(keep_mask(rows, cols, seed, jnp.int32(0), 512, 0.0)).all()


def test_dropout_only_with_rng_and_rejects_bad_rate():
  mask = ScaleCausalMask.from_schedule(ScaleSchedule((1, 2, 4)))
  q, k, v, _ = qkv(mask, 1, 2, 16, jnp.float32)
  plain = scale_causal_attention(q, k, v, mask, impl="xla", dropout_rate=0.5)
  np.testing.assert_allclose(plain, scale_causal_attention(q, k, v, mask, impl="xla"), atol=1e-6)
  dropped = scale_causal_attention(q, k, v, mask, impl="xla", dropout_rate=0.5, rng=jax.random.key(0))
  assert np.abs(np.asarray(dropped - plain)).max() > 1e-2
  with pytest.raises(ValueError, match="dropout_rate"):
    scale_causal_attention(q, k, v, mask, impl="xla", dropout_rate=1.0, rng=jax.random.key(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_attention_matches_unmasked_attention(backend, monkeypatch):
  monkeypatch.setattr(api, "kernel_backend", lambda platform: (backend, True))
  mask = ScaleCausalMask.full(16, 21)
  q, k, v, _ = qkv(mask, 2, 2, 64, jnp.float32)
  out = jax.jit(lambda q, k, v: decode_attention(q, k, v, impl="pallas"))(q, k, v)
  np.testing.assert_allclose(out, dot_product_attention(q, k, v), atol=1e-5)


def test_impl_resolution_and_config():
  assert resolve_impl("auto", "cpu") == "xla"
  assert resolve_impl("auto", "tpu") == "pallas"
  assert resolve_impl("pallas", "cpu") == "pallas"  # interpreted
  assert resolve_impl("xla", "tpu") == "xla"
  with pytest.raises(ValueError, match="attention impl"):
    resolve_impl("flash", "cpu")
  with pytest.raises(ValueError, match="cannot run on platform"):
    resolve_impl("pallas", "metal")
  config = tiny_config()
  config.model.attention_impl = "triton"
  with pytest.raises(ValueError, match="model.attention_impl"):
    validate_config(config)


def test_shape_errors_name_the_shapes():
  mask = ScaleCausalMask.from_schedule(ScaleSchedule((1, 2, 4)))
  q, k, v, _ = qkv(mask, 1, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match=r"mask is for 21 queries"):
    scale_causal_attention(q[:, :20], k, v, mask, impl="xla")
  with pytest.raises(ValueError, match="disagree"):
    scale_causal_attention(q, k[..., :8], v[..., :8], mask, impl="xla")


def test_gpu_kernels_lower_to_triton():
  """The Triton kernels (forward, dq, dk/dv; bf16 and head dim 96) lower for CUDA without a GPU."""
  from flowar_jax.kernels import gpu
  from flowar_jax.kernels.flash import FlashConfig, flash_attention
  mask = ScaleCausalMask.from_schedule(ScaleSchedule((1, 2, 4, 8, 16)))
  for head_dim, dtype in ((64, jnp.bfloat16), (96, jnp.float32)):
    config = FlashConfig("gpu", mask, head_dim, 0.1, gpu.DEFAULT_BLOCK_SIZES, interpret=False)
    x = jax.ShapeDtypeStruct((2, mask.q_len, 4, head_dim), dtype)
    grad = jax.jit(jax.grad(lambda q, k, v, p: jnp.sum(flash_attention(config, q, k, v, p).astype(jnp.float32)),
                            argnums=(0, 1, 2)))
    text = grad.trace(x, x, x, jax.ShapeDtypeStruct((4,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3


SHARDED_CHECK = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from flowar_jax.kernels import BlockSizes, ScaleCausalMask, scale_causal_attention
    from flowar_jax.scales import ScaleSchedule

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    mask = ScaleCausalMask.from_schedule(ScaleSchedule((1, 2, 4)))
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, w = (jax.random.normal(key, (4, 21, 4, 16)) for key in keys)
    rng = jax.random.key(3)

    def loss(q, k, v, impl, backend):
      out = scale_causal_attention(q, k, v, mask, impl=impl, dropout_rate=0.25, rng=rng, backend=backend,
                                   block_sizes=BlockSizes(16, 16, 16, 16))
      return jnp.sum(out * w)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4))
    expected = grad(q, k, v, "xla", None)
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    for backend in ("tpu", "gpu"):
      with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(grad, static_argnums=(3, 4))(q, k, v, "pallas", backend))
        got = grad(*(jax.device_put(x, spec) for x in (q, k, v)), "pallas", backend)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
    print("sharded ok")
""")


def test_kernel_under_mesh_is_shard_mapped_and_matches_reference():
  """On 8 fake CPU devices: data x fsdp x tensor = 2 x 2 x 2, dropout keyed by global batch and head."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SHARDED_CHECK], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0 and "sharded ok" in result.stdout, result.stderr[-4000:]


def train_losses(impl: str, steps: int = 3) -> list[float]:
  """Losses of `steps` FlowAR train steps (tiny config, attention dropout 0.1) through `impl`."""
  from flowar_jax.models.params import split_params
  from flowar_jax.models.registry import build_model
  from flowar_jax.training.optimizer import flowar_optimizer
  from flowar_jax.training.state import init_train_state, make_train_step
  config = tiny_config()
  config.model.attention_impl = impl
  assert config.model.attn_dropout > 0
  latents = jax.random.normal(jax.random.key(1), (steps, config.batch_size, 4, 4, 4))
  labels = jax.random.randint(jax.random.key(2), (steps, config.batch_size), 0, 10)
  model = build_model(config, config.seed)
  tx, schedule = flowar_optimizer(config.optimizer, config.batch_size, 10)
  graphdef, _ = split_params(model)
  step = make_train_step(graphdef, lambda m, batch, rng, ctx, s: m.loss(batch["latents"], batch["label"], rng),
                         tx, ema_decay=0.9, schedule=schedule)
  state, losses = init_train_state(model, tx, seed=0), []
  for i in range(steps):
    state, metrics = step(state, {"latents": latents[i], "label": labels[i]}, None)
    losses.append(float(metrics["loss"]))
  return losses


def test_training_loss_curve_pallas_equals_xla():
  """A few FlowAR steps give the same losses through the kernels (on a CPU: the TPU kernels, interpreted)
  as through XLA, with attention dropout on: both paths draw the same dropout mask. The GPU kernels match
  the same reference in outputs and gradients above."""
  xla_losses = train_losses("xla")
  assert len(set(xla_losses)) == 3  # the model trains
  np.testing.assert_allclose(train_losses("pallas"), xla_losses, rtol=1e-5, atol=1e-5)


def test_backbone_kv_cached_pass_through_kernels():
  """The sampler's decode path (pallas, interpreted) equals the teacher-forced pass (pallas)."""
  from flowar_jax.models.flowar import FlowAR
  from flowar_jax.scales import teacher_forcing_inputs
  config = tiny_config()
  config.model.attention_impl = "pallas"
  graphdef, state = nnx.split(FlowAR(config.model, 4, rngs=nnx.Rngs(0)))

  @jax.jit
  def both_passes(state, latents, labels):
    model = nnx.merge(graphdef, state)
    z_full, targets = model.teacher_forced_z(latents, labels)
    class_emb = model.class_embedding(labels)
    tokens = model.backbone.embed_inputs(class_emb, teacher_forcing_inputs(targets, model.schedule))
    caches, parts, offsets = None, [], model.schedule.offsets
    for k in range(model.schedule.num_scales):
      z_k, caches = model.backbone.cached_step(k, tokens[:, offsets[k]:offsets[k + 1]], class_emb, caches)
      parts.append(z_k)
    return jnp.concatenate(parts, axis=1), z_full

  z_cached, z_full = both_passes(state, jax.random.normal(jax.random.key(1), (2, 4, 4, 4)), jnp.array([1, 10]))
  np.testing.assert_allclose(z_cached, z_full, rtol=1e-5, atol=1e-5)


def tpu_topology():
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"no TPU compiler here (install the `tpu` extra for libtpu): {e}")


@pytest.mark.tpu_aot
@pytest.mark.parametrize("head_dim,dtype", [(64, jnp.bfloat16), (96, jnp.bfloat16), (64, jnp.float32)])
def test_tpu_kernels_compile_for_v5e_inside_shard_map(head_dim, dtype):
  """Forward and backward (with dropout) compile for a v5e 2x2 through Mosaic, per shard, and the compiled
  program holds no L x L buffer."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  topology = tpu_topology()
  mesh = jax.sharding.Mesh(np.array(topology.devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
  mask = ScaleCausalMask.from_schedule(ScaleSchedule((1, 2, 4, 8, 16, 32)))
  batch, heads = 4, 4
  x = jax.ShapeDtypeStruct((batch, mask.q_len, heads, head_dim), dtype,
                           sharding=NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None)))
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P()))

  def loss(q, k, v, rng):
    out = scale_causal_attention(q, k, v, mask, impl="pallas", dropout_rate=0.1, rng=rng)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  with jax.set_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x, rng).lower()
    assert lowered.as_text().count("tpu_custom_call") == 3  # forward, dq, dk/dv
    memory = lowered.compile().memory_analysis()
  scores_per_device = (batch // 2) * (heads // 2) * mask.q_len * mask.kv_len * 4
  assert memory.temp_size_in_bytes < scores_per_device / 4, memory


@pytest.mark.tpu_aot
def test_tpu_decode_kernel_compiles_for_v5e():
  """The sampler's decode step: each scale's queries against every key so far, short sequences in one block."""
  topology = tpu_topology()
  mesh = jax.sharding.Mesh(np.array(topology.devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  schedule = ScaleSchedule((1, 2, 4, 8, 16))
  with jax.set_mesh(mesh):
    for k in range(schedule.num_scales):
      q = jax.ShapeDtypeStruct((2, schedule.lengths[k], 4, 64), jnp.bfloat16)
      kv = jax.ShapeDtypeStruct((2, schedule.offsets[k + 1], 4, 64), jnp.bfloat16)
      lowered = jax.jit(lambda q, k, v: decode_attention(q, k, v, impl="pallas")).trace(q, kv, kv).lower()
      assert lowered.as_text().count("tpu_custom_call") == 1
      lowered.compile()


@pytest.mark.gpu
@pytest.mark.parametrize("sides", [(1, 2, 4, 8, 16), (1, 2, 4, 8, 16, 32)])
def test_gpu_kernels_on_device(sides):
  """Compiled Triton kernels on a real GPU against the reference: bf16, head dim 64 and 96, dropout."""
  if jax.devices()[0].platform != "gpu":
    pytest.skip("needs a GPU")
  mask = ScaleCausalMask.from_schedule(ScaleSchedule(sides))
  for head_dim in (64, 96):
    q, k, v, weights = qkv(mask, 2, 4, head_dim, jnp.bfloat16)
    rng = jax.random.key(5)

    def loss(q, k, v, impl):
      out = scale_causal_attention(q, k, v, mask, impl=impl, dropout_rate=0.1, rng=rng)
      return jnp.sum(out.astype(jnp.float32) * weights)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    (value, grads), (value_ref, grads_ref) = grad(q, k, v, "pallas"), grad(q, k, v, "xla")
    np.testing.assert_allclose(value, value_ref, rtol=2e-2)
    for g, g_ref in zip(grads, grads_ref):
      g, g_ref = np.asarray(g, np.float32), np.asarray(g_ref, np.float32)
      np.testing.assert_allclose(g, g_ref, atol=3e-2 * np.abs(g_ref).max(), rtol=3e-2)
