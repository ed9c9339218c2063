"""Class-conditional samples from a run's trained (or converted) FlowAR checkpoint: the library behind the
`sample`, `train` and `evaluate` commands."""
from __future__ import annotations

import dataclasses
import functools

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from flowar_jax.config import validate_config
from flowar_jax.heads.categorical import CategoricalSampling
from flowar_jax.models.hart_sampling import HARTSampling
from flowar_jax.models.registry import build_model
from flowar_jax.parallel.batch import round_up_to_data_parallel
from flowar_jax.parallel.plan import ShardingPlan
from flowar_jax.runs import fs
from flowar_jax.runs.images import write_samples
from flowar_jax.runs.loaders import load_params, load_vae
from flowar_jax.runs.progress import Progress
from flowar_jax.runs.stored_config import stored_latent_scale
from flowar_jax.runs.workdir import checkpoint_dir
from flowar_jax.sampling.sampler import Sampler, SamplingSettings, image_sampler


def class_labels(num_samples: int, num_classes: int, labels: list[int] | None = None) -> np.ndarray:
  """`labels` repeated to `num_samples`, or every class in turn (equal counts per class)."""
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  pool = np.arange(num_classes) if not labels else np.asarray(labels, np.int64)
  return np.resize(pool, num_samples).astype(np.int32)


def sampling_plan(config: ml_collections.ConfigDict) -> ShardingPlan:
  """`config.mesh` over this job's devices; when it does not fit them (e.g. the mesh of a pod run, sampled on a
  laptop), data parallelism over all devices instead."""
  try:
    return ShardingPlan.from_config(config)
  except ValueError as e:
    fallback = ml_collections.ConfigDict(config.to_dict())
    fallback.mesh.data, fallback.mesh.fsdp, fallback.mesh.tensor = -1, 1, 1
    for axis in ("dcn_data", "dcn_fsdp", "dcn_tensor"):
      fallback.mesh[axis] = 1
    logging.warning("sampling: config.mesh does not fit the %d devices here (%s); sampling data-parallel over "
                    "all of them", jax.device_count(), e)
    return ShardingPlan.from_config(fallback)


def load_trained(config: ml_collections.ConfigDict, workdir: str, use_ema: bool = True,
                 plan: ShardingPlan | None = None) -> tuple[nnx.Module, nnx.Module, float]:
  """(model, tokenizer module, latent scale) of the latest checkpoint in WORKDIR, placed by `plan` (default
  `sampling_plan(config)`); the latent scale is the config's, or the one measured in training (FlowAR's KL
  VAE; 1 for VAR's VQVAE)."""
  validate_config(config)
  fs.use_storage_emulator()
  plan = plan or sampling_plan(config)
  model = load_params(functools.partial(build_model, config), checkpoint_dir(workdir), use_ema=use_ema, plan=plan)
  vae = load_vae(config, workdir, plan)
  if config.model.name != "flowar":
    return model, vae, 1.0
  latent_scale = config.vae.latent_scale
  if latent_scale <= 0:  # measured during training and stored with the checkpoint
    latent_scale = stored_latent_scale(workdir)
    if latent_scale is None:
      raise ValueError("vae.latent_scale is 0 (measure it) but the checkpoint in WORKDIR stores no measured value")
  return model, vae, latent_scale


def load_image_sampler(config: ml_collections.ConfigDict, workdir: str, settings: SamplingSettings,
                       use_ema: bool = True, plan: ShardingPlan | None = None) -> Sampler:
  """`image_sampler` for the latest FlowAR checkpoint in WORKDIR and its VAE, sharded by `plan` (default
  `sampling_plan(config)`)."""
  plan = plan or sampling_plan(config)
  model, vae, latent_scale = load_trained(config, workdir, use_ema, plan)
  return image_sampler(model, vae, settings, latent_scale, plan)


def generate(config: ml_collections.ConfigDict, workdir: str, *, labels: np.ndarray, seed: int,
             settings: SamplingSettings, batch_size: int, use_ema: bool = True) -> np.ndarray:
  """-> uint8 images `[N, H, W, 3]` for `labels` `[N]`; sample i uses noise from (seed, i).

  Runs sharded over `config.mesh` (every process gets every image); `batch_size` is rounded up to a multiple
  of the data-parallel devices.
  """
  plan = sampling_plan(config)
  sampler = load_image_sampler(config, workdir, settings, use_ema, plan)
  sampler.check_labels(labels)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  batch_size = round_up_to_data_parallel(plan, min(batch_size, len(labels)))
  out = []
  progress = Progress(len(labels), desc="sample", unit="image")
  for start in range(0, len(labels), batch_size):
    chunk = labels[start:start + batch_size]
    real = len(chunk)
    chunk = np.resize(chunk, batch_size)  # pad the last batch so one program serves every batch
    out.append(sampler(chunk, seed, first_index=start)[:real])
    progress.update(start + real, {})
  progress.close()
  return np.concatenate(out)


def sample_to_workdir(config: ml_collections.ConfigDict, workdir: str, *, num_samples: int, seed: int,
                      settings: SamplingSettings, labels: list[int] | None = None, batch_size: int = 64,
                      use_ema: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Samples and writes WORKDIR/samples/{samples.npz, grid*.png}; returns (images, labels)."""
  label_array = class_labels(num_samples, config.model.num_classes, labels)
  images = generate(config, workdir, labels=label_array, seed=seed, settings=settings,
                    batch_size=batch_size, use_ema=use_ema)
  if jax.process_index() == 0:
    paths = write_samples(fs.join(workdir, "samples"), images, label_array)
    logging.info("wrote %s", ", ".join(paths))
    print("wrote " + ", ".join(paths), flush=True)
  return images, label_array


# The sampling overrides (command-line flags) each family's head understands.
_VAR_SETTINGS = ("cfg", "top_k", "top_p", "more_smooth", "compute_dtype")
# HART: the categorical part's, then the residual head's; `num_steps` (the CLI's --num_steps) is the head's
# sampling steps (diffusion steps, or the flow head's Euler steps), the same value as `residual_steps`.
_HART_SETTINGS = _VAR_SETTINGS + ("residual_steps", "residual_cfg", "residual_temperature", "num_steps")
_HEADS = {"flowar": "the flow head", "var": "a categorical head",
          "hart": "a categorical head and the residual head"}


def settings_from(config: ml_collections.ConfigDict, **overrides):
  """The sampling settings of `config.sampling` with `overrides` that are not None: FlowAR's ODE settings
  (`SamplingSettings`), VAR's categorical ones (`CategoricalSampling`) or HART's (`HARTSampling`: categorical
  plus the residual head's steps, cfg and temperature). An override the model's head has no use for is an
  error naming it."""
  given = {k: v for k, v in overrides.items() if v is not None}
  name = config.model.name
  known = {"flowar": [f.name for f in dataclasses.fields(SamplingSettings)], "var": _VAR_SETTINGS,
           "hart": _HART_SETTINGS}[name]
  unused = sorted(set(given) - set(known))
  if unused:
    raise ValueError(f"{', '.join('--' + k for k in unused)} does not apply to {name} ({_HEADS[name]}); its "
                     f"sampling settings are {', '.join(known)}")
  if name == "flowar":
    return SamplingSettings.from_config(config.sampling, **given)
  values = dict({k: config.sampling[k] for k in _VAR_SETTINGS}, **{k: given[k] for k in _VAR_SETTINGS if k in given})
  categorical = CategoricalSampling(**values)
  if name == "var":
    return categorical
  return hart_settings(config, categorical, **{k: v for k, v in given.items() if k not in _VAR_SETTINGS})


def hart_settings(config: ml_collections.ConfigDict, categorical: CategoricalSampling, *,
                  residual_steps: int | None = None, num_steps: int | None = None, residual_cfg: float | None = None,
                  residual_temperature: float | None = None) -> HARTSampling:
  """`HARTSampling` from `config.sampling`'s residual keys (0 steps: the model's own; cfg < 0: the categorical
  cfg) with the given overrides; `num_steps` is another name for `residual_steps`."""
  if residual_steps is not None and num_steps is not None and residual_steps != num_steps:
    raise ValueError(f"--num_steps {num_steps} and --residual_steps {residual_steps} both set the residual "
                     "head's sampling steps; give one")
  s = config.sampling
  steps = next((v for v in (residual_steps, num_steps) if v is not None), s.residual_steps or None)
  cfg = s.residual_cfg if residual_cfg is None else residual_cfg
  temperature = s.residual_temperature if residual_temperature is None else residual_temperature
  if config.model.residual.get("kind", "diffusion") == "flow" and temperature != 1.0:
    raise ValueError(f"--residual_temperature {temperature}: the flow residual head (config.model.residual.kind "
                     "'flow') has no per-step noise; leave it at 1.0")
  return HARTSampling(categorical=categorical, residual_steps=steps, residual_cfg=None if cfg < 0 else float(cfg),
                      residual_temperature=float(temperature))


def with_cfg(settings, cfg: float):
  """`settings` with guidance scale `cfg`: FlowAR's and VAR's own; HART's categorical one (its residual head
  follows it unless it has its own `residual_cfg`)."""
  if isinstance(settings, HARTSampling):
    return dataclasses.replace(settings, categorical=dataclasses.replace(settings.categorical, cfg=cfg))
  return dataclasses.replace(settings, cfg=cfg)
