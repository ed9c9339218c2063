"""The parallel package on one device: mesh sizes, logical rules, validation, annotations, remat, start-up."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from flowar_jax.config import base_config, validate_config
from flowar_jax.models import flops
from flowar_jax.models.params import path_name
from flowar_jax.models.registry import build_model
from flowar_jax.models.vae_trainable import VAETrainable
from flowar_jax.parallel import logical
from flowar_jax.parallel.distributed import setup_from_environment
from flowar_jax.parallel.mesh import resolve_mesh_shape
from flowar_jax.parallel.plan import ShardingPlan

RULES = logical.parse_rules(base_config().sharding.rules)


def mesh_config(**sizes):
  config = base_config().mesh
  for key, value in sizes.items():
    config[key] = value
  return config


def test_mesh_sizes_fill_and_multiply():
  assert resolve_mesh_shape(mesh_config(), 8) == ((8, 1, 1), (1, 1, 1))
  assert resolve_mesh_shape(mesh_config(data=2, fsdp=-1, tensor=2), 16) == ((2, 4, 2), (1, 1, 1))
  # Two slices of 4: dcn_data fills to the slices, the ICI sizes split each slice.
  assert resolve_mesh_shape(mesh_config(data=1, fsdp=-1, dcn_data=-1), 8, num_slices=2) == ((1, 4, 1), (2, 1, 1))


@pytest.mark.parametrize("sizes,devices,match", [
    (dict(data=-1, fsdp=-1), 8, "only one of config.mesh.data, config.mesh.fsdp, config.mesh.tensor may be -1"),
    (dict(data=2, fsdp=2, tensor=1), 8, "multiply to 4, but there are 8 devices"),
    (dict(data=-1, fsdp=3), 8, "3 does not divide 8"),
    (dict(tensor=0), 8, "config.mesh.tensor must be a positive size or -1"),
])
def test_mesh_errors_name_the_fields(sizes, devices, match):
  with pytest.raises(ValueError, match=match):
    resolve_mesh_shape(mesh_config(**sizes), devices)


def test_validation_checks_mesh_batch_rules_and_remat():
  config = tiny_config()
  config.mesh.fsdp = 2
  with pytest.raises(ValueError, match=r"the 1 devices cannot be split as config.mesh.data=-1 x config.mesh.fsdp=2 "
                     r"x config.mesh.tensor=1: 2 does not divide 1"):
    validate_config(config, num_devices=1)
  config.mesh.data, config.mesh.fsdp = 1, -1
  with pytest.raises(ValueError, match=r"config.batch_size 8 is not divisible by the 16 devices it is split over"):
    validate_config(config, num_devices=16)
  validate_config(config, num_devices=8)  # tensor takes none of the batch: 8 % (1 * 8) == 0
  config.model.remat = "everything"
  with pytest.raises(ValueError, match="config.model.remat must be one of"):
    validate_config(config, num_devices=8)
  config.model.remat = "full"
  config.sharding.rules.mlp = "tensor,model"
  with pytest.raises(ValueError, match="config.sharding.rules.mlp = 'tensor,model': unknown mesh axis 'model'"):
    validate_config(config, num_devices=8)


def test_unknown_logical_names_fail():
  with pytest.raises(ValueError, match="config.sharding.rules.embd: unknown logical axis"):
    logical.parse_rules({"embd": "fsdp"})
  with pytest.raises(ValueError, match=r"unknown logical axis name\(s\) \['hidden'\]"):
    logical.param_axes("embed", "hidden")


def test_partition_specs_dedupe_and_fall_back():
  sizes = {"data": 2, "fsdp": 4, "tensor": 2}
  spec, falls = logical.partition_spec(("embed", "embed"), (64, 64), sizes, RULES)
  assert spec == P("fsdp", None) and not falls  # one mesh axis per array
  spec, _ = logical.partition_spec(("batch", "length", "embed"), (16, 5, 64), sizes, RULES)
  assert spec == P(("data", "fsdp"), None, None)  # the batch took fsdp: activations keep embed whole
  spec, _ = logical.partition_spec(("batch", "length", "heads", "kv"), (16, 5, 4, 8), sizes, RULES)
  assert spec == P(("data", "fsdp"), None, "tensor", None)  # what the attention kernels expect
  spec, falls = logical.partition_spec(("embed", "mlp"), (64, 85), sizes, RULES)
  assert spec == P("fsdp", None)
  assert falls == [logical.Fallback(dim=1, name="mlp", size=85, wanted=("tensor",), kept=())]
  spec, falls = logical.partition_spec(("batch",), (10,), sizes, RULES)
  assert spec == P("data") and falls[0].kept == ("data",)  # 10 splits over data=2, not over data x fsdp
  with pytest.raises(ValueError, match=r"logical axes \('embed',\) do not match the array's shape \(3, 4\)"):
    logical.partition_spec(("embed",), (3, 4), sizes, RULES)


@pytest.mark.parametrize("factory", ["flowar_v1", "flowar_v2", "vae_with_discriminator"])
def test_every_parameter_has_logical_names(factory):
  config = tiny_config("v2" if factory == "flowar_v2" else "v1")
  config.vae.train.disc_weight = 0.1
  make = (functools.partial(VAETrainable, config) if factory.startswith("vae")
          else functools.partial(build_model, config))
  params = nnx.state(nnx.eval_shape(make), nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  missing = [path_name(path) for path, var in leaves
             if len(var.get_metadata().get("out_sharding") or ()) != var.get_value().ndim]
  assert leaves and not missing


def test_plan_shards_variables_by_name_and_replicates_the_rest():
  plan = ShardingPlan.single_device(RULES)
  config = tiny_config()
  model = nnx.eval_shape(functools.partial(build_model, config))
  tree = {"params": nnx.state(model, nnx.Param), "rng": jax.random.key(0), "step": jnp.zeros((), jnp.int32)}
  abstract = plan.abstract(tree)
  kernel = abstract["params"]["backbone"]["encoder_blocks"][0]["mlp"]["fc2"]["kernel"].get_value()
  assert kernel.sharding.spec == P("tensor", "fsdp") and kernel.shape == (85, 32)  # axes of size 1 divide all
  assert abstract["rng"].sharding.spec == P() and abstract["step"].sharding.spec == P()
  placed = plan.place({"w": np.ones((4, 2), np.float32)})
  assert isinstance(placed["w"], jax.Array) and placed["w"].sharding.mesh == plan.mesh


def test_constrain_is_identity_outside_a_plan():
  x = jnp.ones((2, 3, 4))
  assert logical.constrain(x, ("batch", "length", "embed")) is x


@pytest.mark.parametrize("policy,expected", [("none", 0), ("full", 5), ("dots_saveable", 5)])
def test_remat_wraps_every_block(policy, expected):
  """Backbone blocks (1 + 1) and the flow head's block at each of the 3 scales run under jax.checkpoint."""
  config = tiny_config()
  config.model.remat = policy
  graphdef, params = nnx.split(build_model(config), nnx.Param)
  loss = lambda p: nnx.merge(graphdef, p).loss(jnp.zeros((2, 4, 4, 4)), jnp.arange(2), jax.random.key(2))[0]
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
  checkpoints = [e for e in jaxpr.eqns if e.primitive.name in ("checkpoint", "remat", "remat2")]
  assert len(checkpoints) == expected, [e.primitive.name for e in jaxpr.eqns]


def test_distributed_setup_from_environment():
  explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  setup = setup_from_environment(explicit)
  assert setup.source == "explicit"
  assert setup.kwargs == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0"}
  assert setup_from_environment(slurm).source == "slurm"
  assert setup_from_environment(dict(slurm, SLURM_NTASKS="1")) is None  # a single task: one process
  assert setup_from_environment({"FLOWAR_DISTRIBUTED": "1"}).kwargs == {}
  assert setup_from_environment(dict(slurm, FLOWAR_DISTRIBUTED="0")) is None
  assert setup_from_environment({}) is None
  with pytest.raises(ValueError, match="JAX_PROCESS_ID is not"):
    setup_from_environment({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="JAX_PROCESS_ID 2 is outside 0 .. JAX_NUM_PROCESSES - 1 = 1"):
    setup_from_environment({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})


def test_model_flops_match_xla_count_of_the_forward_pass():
  """The analytic count against XLA's cost analysis of the lowered forward pass (matmul-dominated sizes)."""
  for variant in ("v1", "v2"):
    config = tiny_config(variant)
    config.model.width, config.model.num_heads, config.model.head.width, config.model.head.head_dim = 256, 4, 256, 64
    config.model.scales, config.data.image_size = (1, 2, 4, 8), 32
    model = nnx.eval_shape(functools.partial(build_model, config))
    graphdef, params = nnx.split(model, nnx.Param)
    latents = jax.ShapeDtypeStruct((2, 8, 8, config.vae.latent_channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    forward = lambda p, x, y: nnx.merge(graphdef, p).loss(x, y, jax.random.key(0), train=False)[0]
    xla = jax.jit(forward).lower(params, latents, labels).cost_analysis()["flops"]
    analytic = 2 * flops.forward_flops_per_example(config)
    assert analytic <= xla <= 1.25 * analytic, (variant, analytic, xla)


def test_sampling_falls_back_to_data_parallel_when_the_trained_mesh_does_not_fit():
  from flowar_jax.sampling.generate import sampling_plan  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.dcn_data = 1, 8, 4  # a 4-slice pod run, sampled here
  plan = sampling_plan(config)
  assert dict(plan.mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("scan", [False, True])
def test_scan_blocks_runs_each_stack_as_one_scan(scan):
  """Both backbone stacks and the head at each of the 3 scales (tests/sharded_run.py checks the values)."""
  config = tiny_config("v2")
  config.model.depth, config.model.head.depth = 2, 2
  config.model.scan_blocks = scan
  graphdef, params = nnx.split(build_model(config), nnx.Param)
  loss = lambda p: nnx.merge(graphdef, p).loss(jnp.zeros((2, 4, 4, 4)), jnp.arange(2), jax.random.key(2))[0]
  jaxpr = jax.make_jaxpr(loss)(params)
  assert sum(e.primitive.name == "scan" for e in jaxpr.eqns) == (5 if scan else 0)


def test_scan_blocks_refused_on_meshes_that_split_every_axis():
  config = tiny_config("v2")
  config.model.scan_blocks = True
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  with pytest.raises(ValueError, match="scan_blocks is not supported on a mesh that splits data"):
    validate_config(config, 8)
  config.mesh.data, config.mesh.fsdp = 1, 4
  validate_config(config, 8)


def test_sampling_flops_count_every_ode_evaluation():
  """One unguided Euler step per scale is one teacher-forced forward pass; guided steps double the head and
  the backbone, Heun steps double the head except on the last step of a scale."""
  from flowar_jax.sampling.sampler import SamplingSettings  # pylint: disable=g-import-not-at-top
  config = tiny_config("v1")
  forward = flops.forward_flops_per_example(config)
  assert flops.sampling_flops_per_image(config, SamplingSettings(cfg=1.0, num_steps=1)) == forward
  plain = flops.sampling_flops_per_image(config, SamplingSettings(cfg=1.0, num_steps=4))
  heun = flops.sampling_flops_per_image(config, SamplingSettings(cfg=1.0, num_steps=4, solver="heun"))
  guided = flops.sampling_flops_per_image(config, SamplingSettings(cfg=3.0, guidance=1.0, num_steps=4))
  head_steps = plain - forward  # three more velocity evaluations per scale than one step
  assert heun - plain == head_steps  # Heun: 3 of the 4 steps evaluate twice
  assert forward < plain < guided < 2 * plain
