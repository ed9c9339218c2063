"""Starting multi-process JAX (`jax.distributed.initialize`) from the launch environment.

Which way is chosen, first match wins:

  JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES (+ JAX_PROCESS_ID)  explicit, e.g. launch/local_multiprocess.sh
  FLOWAR_DISTRIBUTED=0                                            never (one process per job)
  FLOWAR_DISTRIBUTED=1                                            no arguments: JAX detects TPU pods (GCE,
                                                                  GKE), SLURM, Open MPI; launch/tpu_bootstrap.sh
  SLURM_* of a step with SLURM_NTASKS > 1                         SLURM, as `srun` sets it (launch/slurm.sbatch)
  anything else                                                   a single process

It must run before anything touches a JAX device; the CLI calls it first for `train` and `sample`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
from absl import logging

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class DistributedSetup:
  """How to call `jax.distributed.initialize`; `kwargs` empty means auto-detection by JAX."""
  source: str  # 'explicit' | 'auto' | 'slurm'
  kwargs: dict


def setup_from_environment(environ: Mapping[str, str] | None = None) -> DistributedSetup | None:
  """The multi-process setup the environment asks for, or None for a single process.

  Raises ValueError naming the variable when the explicit variables are incomplete or not integers.
  """
  env = os.environ if environ is None else environ
  if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    try:
      num_processes = int(env["JAX_NUM_PROCESSES"])
    except ValueError as e:
      raise ValueError(f"JAX_NUM_PROCESSES must be an integer, got {env['JAX_NUM_PROCESSES']!r}") from e
    if "JAX_PROCESS_ID" not in env:
      raise ValueError("JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but JAX_PROCESS_ID is not")
    try:
      process_id = int(env["JAX_PROCESS_ID"])
    except ValueError as e:
      raise ValueError(f"JAX_PROCESS_ID must be an integer, got {env['JAX_PROCESS_ID']!r}") from e
    if not 0 <= process_id < num_processes:
      raise ValueError(f"JAX_PROCESS_ID {process_id} is outside 0 .. JAX_NUM_PROCESSES - 1 = {num_processes - 1}")
    return DistributedSetup("explicit", dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                             num_processes=num_processes, process_id=process_id))
  flag = env.get("FLOWAR_DISTRIBUTED", "").strip().lower()
  if flag in ("0", "false", "no", "off"):
    return None
  if flag in ("1", "true", "yes", "on", "auto"):
    return DistributedSetup("auto", {})
  if flag:
    raise ValueError(f"FLOWAR_DISTRIBUTED must be 1 (initialize, auto-detected) or 0 (never), got {flag!r}")
  if all(v in env for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
    return DistributedSetup("slurm", {})
  return None


def initialize_from_environment(environ: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize` as the environment asks (see the module doc); True if it did.

  Safe to call twice. On CPU it selects gloo collectives so processes can exchange arrays.
  """
  setup = setup_from_environment(environ)
  if setup is None or jax.distributed.is_initialized():
    return False
  if "cpu" in (jax.config.jax_platforms or "").split(","):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**setup.kwargs)
  logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", setup.source,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
