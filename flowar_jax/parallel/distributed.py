"""Starting multi-process JAX (`jax.distributed.initialize`) from the launch environment.

Which way is chosen, first match wins:

  JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES (+ JAX_PROCESS_ID)  explicit, e.g. launch/local_multiprocess.sh
  FLOWAR_DISTRIBUTED=0                                            never (one process per job)
  an `srun` step of more than one task (SLURM_* below)            SLURM, read here (launch/slurm.sbatch)
  FLOWAR_DISTRIBUTED=1                                            no arguments: JAX detects TPU pods (GCE,
                                                                  GKE), Open MPI; launch/tpu_bootstrap.sh
  anything else                                                   a single process

Under SLURM every argument is passed explicitly and JAX's own cluster detection is switched off, because
that detection restricts each process to GPU ordinal `SLURM_LOCALID`: wrong when `srun --gpus-per-task`
already narrowed CUDA_VISIBLE_DEVICES to the task's own GPU (ordinal 3 of a process that sees one GPU), and
only one GPU per node when one task drives a whole node. Here:

  CUDA_VISIBLE_DEVICES set             the task drives every GPU it sees (local_device_ids=None)
  one task on this node                the task drives every GPU of the node (None)
  k tasks on this node, no binding     task SLURM_LOCALID drives GPUs [LOCALID * g, (LOCALID + 1) * g), with
                                       g = SLURM_GPUS_PER_TASK or 1

The coordinator is the first host of SLURM_STEP_NODELIST (only `srun` steps set it, so a batch script
that runs Python directly stays a single process), on port JAX_COORDINATOR_PORT or one derived from the job id.

It must run before anything touches a JAX device; the CLI calls it first for `train`, `sample`, `evaluate`.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

import jax
from absl import logging

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
# Above Linux's default ephemeral range (32768-60999), so no outgoing connection holds the port.
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 61000, 4096


@dataclasses.dataclass(frozen=True)
class DistributedSetup:
  """How to call `jax.distributed.initialize`; `kwargs` empty means auto-detection by JAX."""
  source: str  # 'explicit' | 'auto' | 'slurm'
  kwargs: dict


def _int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except ValueError as e:
    raise ValueError(f"{name} must be an integer, got {env[name]!r}") from e


def first_host(nodelist: str) -> str:
  """The first host of a SLURM host list: 'gpu[003-008,10],cpu1' -> 'gpu003', 'a1-[2-3]-ib' -> 'a1-2-ib'."""
  nodelist = nodelist.strip()
  first = re.match(r"[^,\[\]]*(\[[^\]\[]*\][^,\[\]]*)*", nodelist).group(0)
  # Each bracket group stands for its first member, zero padding kept.
  host = re.sub(r"\[([^\]\-,]*)[^\]]*\]", r"\1", first)
  if not host or nodelist[len(first):len(first) + 1] not in ("", ","):
    raise ValueError(f"cannot read the first host of SLURM_STEP_NODELIST {nodelist!r}")
  return host


def _tasks_per_node(spec: str) -> list[int]:
  """SLURM's compressed per-node task counts: '2(x3),1' -> [2, 2, 2, 1]."""
  counts = []
  for part in spec.split(","):
    m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
    if not m:
      raise ValueError(f"cannot read the tasks per node {spec!r} (expected e.g. '8(x2),4')")
    counts += [int(m.group(1))] * int(m.group(2) or 1)
  return counts


def _tasks_on_this_node(env: Mapping[str, str]) -> int | None:
  for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    if env.get(name):
      counts = _tasks_per_node(env[name])
      node = int(env.get("SLURM_NODEID", "0"))
      return counts[node] if node < len(counts) else None
  if env.get("SLURM_NTASKS_PER_NODE"):
    return _int(env, "SLURM_NTASKS_PER_NODE")
  return None


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
  """The GPU ordinals (as this process numbers them) that this SLURM task drives; None: all it sees."""
  visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
  if visible:  # srun bound the task's GPUs: they are all its own, renumbered from 0
    return None
  local_tasks = _tasks_on_this_node(env)
  if local_tasks == 1:
    return None
  per_task = _int(env, "SLURM_GPUS_PER_TASK") if env.get("SLURM_GPUS_PER_TASK") else 1
  local_id = _int(env, "SLURM_LOCALID")
  return list(range(local_id * per_task, (local_id + 1) * per_task))


def slurm_setup(env: Mapping[str, str]) -> DistributedSetup:
  """Explicit `jax.distributed.initialize` arguments for the task of an `srun` step (see the module doc)."""
  num_processes = _int(env, "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS")
  process_id = _int(env, "SLURM_PROCID")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"SLURM_PROCID {process_id} is outside 0 .. {num_processes - 1} (the step's tasks)")
  if env.get("JAX_COORDINATOR_PORT"):
    port = _int(env, "JAX_COORDINATOR_PORT")
  else:
    port = _SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % _SLURM_PORT_SPAN
  return DistributedSetup("slurm", dict(
      coordinator_address=f"{first_host(env['SLURM_STEP_NODELIST'])}:{port}", num_processes=num_processes,
      process_id=process_id, local_device_ids=slurm_local_device_ids(env),
      cluster_detection_method="deactivate"))  # every argument is given: JAX must not override any


def _is_slurm_step(env: Mapping[str, str]) -> bool:
  if not all(env.get(v) for v in _SLURM_VARS):
    return False
  tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
  return tasks is not None and int(tasks) > 1


def setup_from_environment(environ: Mapping[str, str] | None = None) -> DistributedSetup | None:
  """The multi-process setup the environment asks for, or None for a single process.

  Raises ValueError naming the variable when the explicit variables are incomplete or not integers.
  """
  env = os.environ if environ is None else environ
  if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    num_processes = _int(env, "JAX_NUM_PROCESSES")
    if "JAX_PROCESS_ID" not in env:
      raise ValueError("JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but JAX_PROCESS_ID is not")
    process_id = _int(env, "JAX_PROCESS_ID")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"JAX_PROCESS_ID {process_id} is outside 0 .. JAX_NUM_PROCESSES - 1 = {num_processes - 1}")
    return DistributedSetup("explicit", dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                             num_processes=num_processes, process_id=process_id))
  flag = env.get("FLOWAR_DISTRIBUTED", "").strip().lower()
  if flag in ("0", "false", "no", "off"):
    return None
  if flag and flag not in ("1", "true", "yes", "on", "auto"):
    raise ValueError(f"FLOWAR_DISTRIBUTED must be 1 (initialize, auto-detected) or 0 (never), got {flag!r}")
  if _is_slurm_step(env):
    return slurm_setup(env)
  if flag:
    return DistributedSetup("auto", {})
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
  logging.info("jax.distributed.initialize(%s) from %s", setup.kwargs, setup.source)
  jax.distributed.initialize(**setup.kwargs)
  logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", setup.source,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
