"""The config schema: every key flowar_jax reads, with its default, and the checks run before any compute.

Config files in `configs/` start from `base_config()` and override values; the result is locked, so a
misspelt key (in a file or a `--config.key=value` override) fails loudly instead of being ignored.
"""
from __future__ import annotations

import ml_collections

from flowar_jax.models.time_grid import SOLVERS

IMAGENET_TRAIN_IMAGES = 1_281_167


MODEL_NAMES = ("flowar", "var", "hart")  # the generators of `flowar_jax.models.registry`


def base_config(model: str = "flowar") -> ml_collections.ConfigDict:
  """The schema and defaults of a `model` config: FlowAR-S on ImageNet 256 with MAR's KL-16 VAE, or VAR-d16 over
  its VQVAE (`flowar_jax.config_var`), or HART-d16 over its hybrid tokenizer (`flowar_jax.config_hart`). The
  sections other than model, vae and sampling are shared."""
  if model not in MODEL_NAMES:
    raise ValueError(f"config.model.name {model!r} is not a known model; known models: {', '.join(MODEL_NAMES)}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 2048  # global, across all devices and hosts
  c.num_train_steps = 250_000
  c.checkpoint_every_steps = 5_000
  c.keep_checkpoints = 3
  c.log_every_steps = 100
  # Sample grids while FlowAR trains (TensorBoard images, WORKDIR/images/, metrics.jsonl): the EMA weights and
  # the sampling settings below, from fixed noise, so the grids of successive steps compare.
  c.sample_every_steps = 0  # 0 = off; the last step is always included when on
  c.sample_grid_labels = ()  # classes, one column each (two rows); () = up to 10 spread over the classes
  # A step whose loss, gradients or new params are not finite is skipped (params, optimizer state and EMA
  # unchanged, counted in the state); this many in a row stop training with an error.
  c.max_consecutive_nonfinite_steps = 10
  # Which stages `train` runs: 'vae' (the tokenizer), the generator by its model name ('flowar', 'var', 'hart'), or
  # 'both' (the tokenizer first, then the generator on its tokens).
  c.stage = "flowar"
  # Workdir (or checkpoint directory) of a trained VAE; '' means WORKDIR/vae.
  c.vae_checkpoint = ""

  c.data = ml_collections.ConfigDict()
  c.data.name = "imagenet"  # 'digits' | 'image_folder' | 'imagenet' | 'digits_text' | 'captioned_folder'
  c.data.data_dir = ""  # image folder root (captioned_folder: where metadata.jsonl is), or tfds manual dir for imagenet
  c.data.image_size = 256
  c.data.resize_size = 288  # shorter side before cropping; 0 means image_size
  c.data.random_crop = True
  c.data.random_flip = True
  c.data.eval_fraction = 0.1  # held-out share for datasets without an eval split
  c.data.num_workers = 0
  c.data.cache_latents = False  # encode the train set once and train FlowAR on cached latents

  # The tokenizer. FlowAR's: a KL VAE (MAR's KL-16 layout); VAR's: see flowar_jax/config_var.py.
  c.vae = ml_collections.ConfigDict()
  c.vae.in_channels = 3
  c.vae.base_channels = 128
  c.vae.channel_multipliers = (1, 1, 2, 2, 4)
  c.vae.encoder_blocks = 2
  c.vae.decoder_blocks = 3
  c.vae.latent_channels = 16
  c.vae.norm_groups = 32
  c.vae.dropout = 0.0
  c.vae.latent_scale = 0.2325  # latents = posterior * scale; 0 = measure 1 / std on the train set
  c.vae.sample_posterior = True  # training latents: posterior sample (True) or mean (False)
  c.vae.train = ml_collections.ConfigDict()
  c.vae.train.batch_size = 64
  c.vae.train.num_train_steps = 100_000
  c.vae.train.learning_rate = 1e-4
  c.vae.train.warmup_steps = 1_000
  c.vae.train.kl_weight = 1e-6
  c.vae.train.l1_weight = 1.0
  c.vae.train.l2_weight = 0.0
  c.vae.train.disc_weight = 0.0  # > 0 turns on the patch discriminator
  c.vae.train.disc_start_step = 50_000
  c.vae.train.disc_channels = 64
  c.vae.train.disc_layers = 3

  c.model = ml_collections.ConfigDict()
  c.model.name = "flowar"  # the generator, by its name in models/registry.py
  # 'class' (labels) or 'text' (a frozen encoder's prompt encoding; its settings are the `text` section that
  # flowar_jax.config_text.add_text_section adds).
  c.model.conditioning = "class"
  c.model.scales = (1, 2, 4, 8, 16)  # sides of each scale; the last is the latent side
  c.model.width = 768
  c.model.depth = 6  # blocks per stack (two stacks: encoder and decoder)
  c.model.num_heads = 12
  c.model.mlp_ratio = 4.0
  c.model.num_classes = 1000
  c.model.label_drop_prob = 0.1
  c.model.attn_dropout = 0.1
  c.model.proj_dropout = 0.1
  # Backbone attention: 'xla' (dense masked attention), 'pallas' (the scale-causal flash kernels of
  # flowar_jax.kernels; interpreted on CPU) or 'auto' (the kernels on TPU and GPU, XLA elsewhere).
  c.model.attention_impl = "xla"
  # Matrix products of the FlowAR in training: 'float32', or 'bfloat16' operands accumulated in float32
  # (flowar_jax.precision; parameters, optimizer state, activations and the loss stay float32).
  c.model.compute_dtype = "float32"
  c.model.head = ml_collections.ConfigDict()
  c.model.head.variant = "v1"  # 'v1' (spatial adaLN) | 'v2' (with cross-attention)
  c.model.head.depth = 2
  c.model.head.width = 1024
  c.model.head.head_dim = 64
  c.model.head.mlp_ratio = 4.0
  # Rematerialisation per backbone and flow-head block (flowar_jax.parallel.remat): 'none' | 'full' |
  # 'dots_saveable' | 'dots_with_no_batch_dims_saveable'. Saves activation memory for recomputation.
  c.model.remat = "none"
  # Run each stack of identical blocks as one lax.scan: the block compiles once (deep models compile in a
  # fraction of the time and host memory); the values do not change.
  c.model.scan_blocks = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.base_lr = 5e-5  # lr = base_lr * batch_size / 256
  c.optimizer.min_lr = 1e-5
  c.optimizer.warmup_steps = 62_500
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.02
  c.optimizer.grad_clip = 3.0
  c.optimizer.ema_decay = 0.9999

  c.sampling = ml_collections.ConfigDict()
  c.sampling.cfg = 4.3
  c.sampling.guidance = 0.9  # guidance applies where t <= this
  c.sampling.num_steps = 25
  c.sampling.solver = "euler"  # 'euler' | 'heun'
  c.sampling.compute_dtype = "float32"  # matrix products while sampling, as model.compute_dtype
  c.sampling.scale_steps = ()  # ODE steps per scale, coarsest first, in place of num_steps (docs/performance.md)
  c.sampling.num_samples = 64
  c.sampling.batch_size = 64
  c.sampling.use_ema = True

  # The device mesh (flowar_jax.parallel.mesh): 'data' splits the batch, 'fsdp' the batch and the parameters,
  # EMA and optimizer state, 'tensor' attention heads and MLP units. -1 = the devices left over (at most once
  # per level). dcn_* split the same axes across TPU slices (or GPU nodes); each axis then has ici * dcn devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_tensor = 1

  # Logical axis name -> mesh axes, comma-separated ('' = replicated); the names are listed in
  # flowar_jax.parallel.logical. E.g. --config.sharding.rules.mlp=fsdp,tensor.
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = ml_collections.ConfigDict()
  for name, axes in (("batch", "data,fsdp"), ("length", ""), ("embed", "fsdp"), ("heads", "tensor"), ("kv", ""),
                     ("qkv", ""), ("mlp", "tensor"), ("modulation", "tensor"), ("vocab", ""), ("text", ""),
                     ("latent", ""), ("time", ""), ("norm", ""), ("conv_in", ""), ("conv_out", "fsdp")):
    c.sharding.rules[name] = axes

  # `evaluate` and evaluation during training (docs/evaluation.md).
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0  # evaluate during FlowAR training every N steps and at the end (0 = off)
  c.eval.num_samples = 50_000  # `evaluate`'s default; class labels cycle, equal counts per class
  c.eval.train_num_samples = 10_000  # per evaluation during training
  # and/or 'digits' (the bundled data), or 'alignment' (text runs on the composed digits)
  c.eval.metrics = ("fid", "sfid", "is", "precision", "recall")
  c.eval.reference = "dataset:train"  # ADM-layout .npz (e.g. VIRTUAL_imagenet256_labeled.npz) or dataset:SPLIT
  c.eval.reference_size = 10_000  # dataset:SPLIT: images drawn for precision / recall (ADM's batch size)
  c.eval.reference_stats_size = 50_000  # dataset:SPLIT: images drawn for FID / sFID statistics (all if fewer)
  c.eval.reference_seed = 0  # dataset:SPLIT: seeds the draw (uniform over the split, not its first N)
  c.eval.inception_weights = ""  # '' = look in ~/.cache/flowar_jax (nothing is downloaded)
  c.eval.resize = "adm"  # Inception input: 'adm' (ADM's TF graph) | 'pytorch-fid'
  c.eval.inception_batch_size = 200  # images per Inception step, split over the devices
  if model == "var":
    from flowar_jax.config_var import add_var_sections  # pylint: disable=g-import-not-at-top  (imports this one)
    add_var_sections(c)
  elif model == "hart":
    from flowar_jax.config_hart import add_hart_sections  # pylint: disable=g-import-not-at-top  (imports this one)
    add_hart_sections(c)
  c.lock()  # existing keys can change; new (misspelt) ones raise
  return c


def vae_stride(config: ml_collections.ConfigDict) -> int:
  return 2 ** (len(config.vae.channel_multipliers) - 1)


def latent_side(config: ml_collections.ConfigDict) -> int:
  return config.data.image_size // vae_stride(config)


def trains_tokenizer(config: ml_collections.ConfigDict) -> bool:
  """Whether `config.stage` runs the tokenizer stage ('vae' or 'both')."""
  return config.stage in ("vae", "both")


def trains_generator(config: ml_collections.ConfigDict) -> bool:
  """Whether `config.stage` runs the generator stage (the model's name, or 'both')."""
  return config.stage in (config.model.name, "both")


_CHOICES = {
    "data.name": ("digits", "image_folder", "imagenet", "digits_text", "captioned_folder"),
    "model.attention_impl": ("xla", "pallas", "auto"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "sampling.compute_dtype": ("float32", "bfloat16"),
    "eval.resize": ("adm", "pytorch-fid"),
}
_FLOWAR_CHOICES = {
    "model.head.variant": ("v1", "v2"),
    "sampling.solver": SOLVERS,
}
_EVAL_METRICS = ("fid", "sfid", "is", "precision", "recall", "digits", "alignment")  # alignment: text runs


# The element type of schema tuples whose default is empty.
_EMPTY_TUPLE_ELEMENTS = {"sample_grid_labels": int, "sampling.scale_steps": int}
_TYPE_NAMES = {bool: "a bool", int: "an int", float: "a number", str: "a string"}


def _type_error(key: str, value, expected: type) -> str | None:
  """Why `value` can't stand where the schema has a value of type `expected` (None when it can)."""
  if isinstance(value, bool) or expected is bool:
    ok = isinstance(value, bool) and expected is bool
  elif expected is float:
    ok = isinstance(value, (int, float))
  else:
    ok = isinstance(value, expected)
  if ok:
    return None
  return f"config.{key} must be {_TYPE_NAMES.get(expected, expected.__name__)}, got {value!r} ({type(value).__name__})"


def check_types(config: ml_collections.ConfigDict) -> None:
  """Every key of the schema (`base_config()`) is present with a value of its type, and no other key is.

  Catches what a locked ConfigDict lets through: a config built by hand or from JSON, and tuple overrides
  such as `--config.model.scales=(1,2.5,4)` or `=(1,2,x)`, which parse element by element.
  """
  name = config.model.get("name", "flowar") if "model" in config else "flowar"
  schema_config = base_config(name)
  if "model" in config and config.model.get("conditioning", "class") == "text":
    from flowar_jax.config_text import add_text_section  # pylint: disable=g-import-not-at-top  (imports this one)
    add_text_section(schema_config)
  schema = dict(_flatten(schema_config))
  flat = dict(_flatten(config))
  unknown = sorted(set(flat) - set(schema))
  if unknown:
    raise ValueError(f"unknown config key(s): {', '.join('config.' + k for k in unknown)}")
  missing = sorted(set(schema) - set(flat))
  if missing:
    raise ValueError(f"config key(s) missing: {', '.join('config.' + k for k in missing)}")
  for key, default in schema.items():
    value = flat[key]
    if default is None:
      continue
    if isinstance(default, tuple):
      element_type = type(default[0]) if default else _EMPTY_TUPLE_ELEMENTS[key]
      if not isinstance(value, (tuple, list)) or any(_type_error(key, v, element_type) for v in value):
        raise ValueError(f"config.{key} must be a tuple of {element_type.__name__}s like {default}, got {value!r}")
      continue
    problem = _type_error(key, value, type(default))
    if problem:
      raise ValueError(problem)


def check_batch_divisible(config: ml_collections.ConfigDict, data_parallel_devices: int) -> None:
  """The global batches split evenly over the devices that hold different examples (data x fsdp)."""
  if data_parallel_devices < 1:
    raise ValueError(f"the number of data-parallel devices must be >= 1, got {data_parallel_devices}")
  for key, batch in (("batch_size", config.batch_size), ("vae.train.batch_size", config.vae.train.batch_size)):
    if batch % data_parallel_devices:
      raise ValueError(f"config.{key} {batch} is not divisible by the {data_parallel_devices} devices it is "
                       f"split over (data parallel); use a multiple of {data_parallel_devices}")


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                    num_slices: int | None = None) -> None:
  """Checks types and values before any compute; errors name the offending key.

  `num_devices` (all processes) and `num_slices` (TPU slices or other DCN groups; None = what config.mesh.dcn_*
  says) size the mesh; with `num_devices` None (e.g. sampling, which picks its own mesh) the mesh and the batch
  split are not checked.
  """
  check_types(config)
  flat = {k: v for k, v in _flatten(config)}
  stages = ("vae", config.model.name, "both")
  if config.stage not in stages:
    raise ValueError(f"config.stage must be one of {stages} (the tokenizer, the generator, or both), got "
                     f"{config.stage!r}")
  choices = dict(_CHOICES, **(_FLOWAR_CHOICES if config.model.name == "flowar" else {}))
  for key, allowed in choices.items():
    if flat[key] not in allowed:
      raise ValueError(f"config.{key} must be one of {allowed}, got {flat[key]!r}")
  for key in ("batch_size", "num_train_steps", "checkpoint_every_steps", "log_every_steps", "keep_checkpoints",
              "max_consecutive_nonfinite_steps", "vae.train.batch_size", "vae.train.num_train_steps",
              "model.num_classes", "data.image_size", "sampling.num_samples", "sampling.batch_size"):
    if int(flat[key]) < 1:
      raise ValueError(f"config.{key} must be >= 1, got {flat[key]}")
  from flowar_jax.config_text import validate_text_section  # pylint: disable=g-import-not-at-top
  validate_text_section(config)
  if config.model.name == "flowar":
    _validate_flowar_sections(config, flat)
  elif config.model.name == "hart":
    from flowar_jax.config_hart import validate_hart_sections  # pylint: disable=g-import-not-at-top
    validate_hart_sections(config)
  else:
    from flowar_jax.config_var import validate_var_sections  # pylint: disable=g-import-not-at-top
    validate_var_sections(config)
  for key in ("data.eval_fraction", "optimizer.ema_decay"):
    if not 0.0 <= flat[key] <= 1.0:
      raise ValueError(f"config.{key} must lie in [0, 1], got {flat[key]}")
  if config.sample_every_steps < 0:
    raise ValueError(f"config.sample_every_steps must be >= 0 (0 = off), got {config.sample_every_steps}")
  grid_labels = tuple(config.sample_grid_labels)
  if len(grid_labels) > 64 or any(not 0 <= int(k) < config.model.num_classes for k in grid_labels):
    raise ValueError(f"config.sample_grid_labels must hold at most 64 classes in [0, model.num_classes = "
                     f"{config.model.num_classes}), got {grid_labels}")
  unknown = [m for m in config.eval.metrics if m not in _EVAL_METRICS]
  if unknown:
    raise ValueError(f"config.eval.metrics has unknown metrics {unknown}; choose from {_EVAL_METRICS}")
  if config.eval.every_steps < 0:
    raise ValueError(f"config.eval.every_steps must be >= 0 (0 turns it off), got {config.eval.every_steps}")
  if config.eval.reference_size < 4:
    raise ValueError(f"config.eval.reference_size must be >= 4 (precision / recall use each image's 3 nearest "
                     f"neighbours), got {config.eval.reference_size}")
  for key in ("eval.num_samples", "eval.train_num_samples", "eval.reference_stats_size"):
    if flat[key] < 2:
      raise ValueError(f"config.{key} must be >= 2 (feature covariances need two samples), got {flat[key]}")
  if config.eval.inception_batch_size < 1:
    raise ValueError(f"config.eval.inception_batch_size must be >= 1, got {config.eval.inception_batch_size}")
  from flowar_jax.parallel import blocks, logical, mesh, remat  # pylint: disable=g-import-not-at-top  (imports jax)
  remat.check_remat(config.model.remat)
  logical.parse_rules(config.sharding.rules)
  if num_devices is None:
    return
  ici, dcn = mesh.resolve_mesh_shape(config.mesh, num_devices, num_slices)
  blocks.check_scan_mesh(config.model.get("scan_blocks", False), ici[0] * dcn[0], ici[1] * dcn[1], ici[2] * dcn[2])
  check_batch_divisible(config, ici[0] * dcn[0] * ici[1] * dcn[1])  # data x fsdp hold different examples


def _validate_flowar_sections(config: ml_collections.ConfigDict, flat: dict) -> None:
  """Values of FlowAR's model, vae and sampling sections, and their agreement with `data`."""
  for key in ("model.width", "model.depth", "model.num_heads", "model.head.width", "model.head.depth",
              "model.head.head_dim", "sampling.num_steps", "vae.latent_channels", "vae.base_channels"):
    if int(flat[key]) < 1:
      raise ValueError(f"config.{key} must be >= 1, got {flat[key]}")
  stride = vae_stride(config)
  if config.data.image_size % stride:
    raise ValueError(f"config.data.image_size {config.data.image_size} is not divisible by the VAE stride "
                     f"{stride} (2 ** (len(vae.channel_multipliers) - 1))")
  side = latent_side(config)
  scales = tuple(config.model.scales)
  if not scales or scales[-1] != side:
    raise ValueError(f"config.model.scales must end at the latent side {side} (data.image_size / VAE stride "
                     f"= {config.data.image_size} / {stride}), got {scales}")
  if list(scales) != sorted(set(scales)) or scales[0] < 1:
    raise ValueError(f"config.model.scales must be strictly increasing positive sides, got {scales}")
  if config.model.width % config.model.num_heads:
    raise ValueError(f"config.model.num_heads {config.model.num_heads} does not divide config.model.width "
                     f"{config.model.width}")
  if (config.model.width // config.model.num_heads) % 4:
    raise ValueError("config.model.width / num_heads (the head dim) must be divisible by 4 for 2D RoPE")
  if config.model.head.width % config.model.head.head_dim or config.model.head.head_dim % 4:
    raise ValueError(f"config.model.head.head_dim {config.model.head.head_dim} must divide "
                     f"config.model.head.width {config.model.head.width} and be divisible by 4")
  groups = config.vae.norm_groups
  for mult in config.vae.channel_multipliers:
    if (config.vae.base_channels * mult) % groups:
      raise ValueError(f"config.vae.norm_groups {groups} does not divide the VAE width "
                       f"{config.vae.base_channels * mult}")
  for key in ("model.label_drop_prob", "model.attn_dropout", "model.proj_dropout", "sampling.guidance"):
    if not 0.0 <= flat[key] <= 1.0:
      raise ValueError(f"config.{key} must lie in [0, 1], got {flat[key]}")
  if config.sampling.cfg < 0:
    raise ValueError(f"config.sampling.cfg must be >= 0, got {config.sampling.cfg}")
  scale_steps = tuple(config.sampling.get("scale_steps", ()))
  if scale_steps and (len(scale_steps) != len(scales) or min(scale_steps) < 1):
    raise ValueError(f"config.sampling.scale_steps must be empty or one positive step count per scale "
                     f"({len(scales)} scales, coarsest first), got {scale_steps}")
  if config.vae.latent_scale < 0:
    raise ValueError(f"config.vae.latent_scale must be > 0, or 0 to measure it, got {config.vae.latent_scale}")


def flatten_config(config: ml_collections.ConfigDict) -> dict:
  """{'model.width': 768, 'model.scales': (1, 2, 4, 8, 16), ...}: every leaf under its dotted key."""
  return dict(_flatten(config))


def _flatten(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
  """Rebuilds a locked config from a plain dict (e.g. the JSON stored with a checkpoint), on the schema of its
  `model.name` (FlowAR's when absent).

  Keys the schema doesn't know raise an error naming them; lists become tuples where the schema has tuples.
  """
  config = base_config(values.get("model", {}).get("name", "flowar"))
  if values.get("model", {}).get("conditioning", "class") == "text":
    from flowar_jax.config_text import add_text_section  # pylint: disable=g-import-not-at-top
    add_text_section(config)

  def fill(target: ml_collections.ConfigDict, source: dict, prefix: str):
    for key, value in source.items():
      if key not in target:
        raise KeyError(f"unknown config key {prefix + key!r}")
      if isinstance(target[key], ml_collections.ConfigDict):
        fill(target[key], value, f"{prefix}{key}.")
      elif isinstance(target[key], tuple):
        target[key] = tuple(value)
      else:
        target[key] = type(target[key])(value) if target[key] is not None else value

  fill(config, values, "")
  return config


def imagenet_preset(*, width: int, depth: int, num_heads: int, head_variant: str, head_depth: int,
                    head_width: int, cfg: float, guidance: float, num_steps: int) -> ml_collections.ConfigDict:
  """A FlowAR size on ImageNet 256 with the official recipe (400 epochs at batch 2048, 100 warmup)."""
  c = base_config()
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.batch_size
  c.num_train_steps = 400 * steps_per_epoch
  c.optimizer.warmup_steps = 100 * steps_per_epoch
  c.model.width, c.model.depth, c.model.num_heads = width, depth, num_heads
  c.model.head.variant, c.model.head.depth, c.model.head.width = head_variant, head_depth, head_width
  c.sampling.cfg, c.sampling.guidance, c.sampling.num_steps = cfg, guidance, num_steps
  return c
