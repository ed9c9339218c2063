"""Starting multi-process JAX under SLURM: the arguments `jax.distributed.initialize` gets for each task of
an `srun` step (simulated environments), and one real two-process step on localhost over CPU devices."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Mapping

import jax
import pytest

from flowar_jax.parallel import distributed
from flowar_jax.parallel.distributed import first_host, setup_from_environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slurm_env(**overrides: str) -> dict[str, str]:
  """Task 5 of a 2-node x 8-task `srun` step (job 4242), as srun sets it; overrides replace or add."""
  env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_NODELIST": "gpu[007-008]",
         "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "5",
         "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NTASKS_PER_NODE": "8"}
  env.update(overrides)
  return {k: v for k, v in env.items() if v is not None}


def initialize_arguments(monkeypatch, env: Mapping[str, str]) -> dict:
  """What initialize_from_environment passes to jax.distributed.initialize in `env` (nothing is started)."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert distributed.initialize_from_environment(env)
  assert len(calls) == 1
  return calls[0]


def test_one_task_per_gpu_drives_the_gpu_srun_bound_to_it(monkeypatch):
  """`srun --gpus-per-task=1`: CUDA_VISIBLE_DEVICES is the task's own GPU (physical 5), which the process sees
  as ordinal 0. JAX's own detection would ask for ordinal SLURM_LOCALID = 5, which does not exist there."""
  kwargs = initialize_arguments(monkeypatch, slurm_env(CUDA_VISIBLE_DEVICES="5"))
  assert kwargs == dict(coordinator_address="gpu007:61146",  # 61000 + 4242 % 4096
                        num_processes=16, process_id=5, local_device_ids=None, cluster_detection_method="deactivate")


def test_one_task_per_node_drives_every_gpu_of_the_node(monkeypatch):
  env = slurm_env(SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0",
                  SLURM_NODEID="1", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_NTASKS_PER_NODE="1")
  # With the node's GPUs listed (srun --gpus-per-task=8) and without (no binding at all): all of them.
  for visible in ("0,1,2,3,4,5,6,7", None):
    kwargs = initialize_arguments(monkeypatch, slurm_env(**env, CUDA_VISIBLE_DEVICES=visible))
    assert kwargs == dict(coordinator_address="gpu007:61146", num_processes=2, process_id=1,
                          local_device_ids=None, cluster_detection_method="deactivate")


def test_unbound_tasks_split_the_gpus_of_their_node(monkeypatch):
  """Several tasks per node that all see every GPU: task LOCALID takes its own block of SLURM_GPUS_PER_TASK."""
  assert initialize_arguments(monkeypatch, slurm_env())["local_device_ids"] == [5]
  env = slurm_env(SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4", SLURM_PROCID="3", SLURM_LOCALID="1",
                  SLURM_NODEID="1", SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURM_NTASKS_PER_NODE="2",
                  SLURM_GPUS_PER_TASK="4")
  assert initialize_arguments(monkeypatch, env)["local_device_ids"] == [4, 5, 6, 7]
  # The per-node counts may differ between nodes: node 1 runs one task, so it takes the node.
  env = slurm_env(SLURM_NTASKS="3", SLURM_STEP_NUM_TASKS="3", SLURM_PROCID="2", SLURM_LOCALID="0",
                  SLURM_NODEID="1", SLURM_STEP_TASKS_PER_NODE="2,1", SLURM_NTASKS_PER_NODE=None)
  assert initialize_arguments(monkeypatch, env)["local_device_ids"] is None


def test_slurm_coordinator_port_and_host():
  assert setup_from_environment(slurm_env(JAX_COORDINATOR_PORT="1234")).kwargs["coordinator_address"] \
      == "gpu007:1234"
  assert first_host("node[001,007-015],host2") == "node001"
  assert first_host("rack1-n[08-09]-ib,x") == "rack1-n08-ib"
  assert first_host("localhost") == "localhost"
  with pytest.raises(ValueError, match="SLURM_STEP_NODELIST"):
    first_host("n[1-2")


def test_slurm_detection_needs_an_srun_step_of_several_tasks():
  assert setup_from_environment(slurm_env(SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1")) is None
  # A batch script running Python itself (no srun step: no SLURM_STEP_NODELIST) stays one process.
  assert setup_from_environment(slurm_env(SLURM_STEP_NODELIST=None)) is None
  assert setup_from_environment(slurm_env(FLOWAR_DISTRIBUTED="0")) is None
  # FLOWAR_DISTRIBUTED=1 under srun still reads SLURM here, not JAX's per-LOCALID detection.
  assert setup_from_environment(slurm_env(FLOWAR_DISTRIBUTED="1")).source == "slurm"
  assert setup_from_environment({"FLOWAR_DISTRIBUTED": "1"}).kwargs == {}
  with pytest.raises(ValueError, match="SLURM_PROCID 16 is outside 0 .. 15"):
    setup_from_environment(slurm_env(SLURM_PROCID="16"))
  with pytest.raises(ValueError, match="SLURM_NTASKS_PER_NODE must be an integer"):
    setup_from_environment(slurm_env(SLURM_STEP_TASKS_PER_NODE=None, SLURM_NTASKS_PER_NODE="x"))


_REPORT = """
import json, jax
from flowar_jax.parallel.distributed import initialize_from_environment, setup_from_environment
setup = setup_from_environment()
assert initialize_from_environment()
print("REPORT " + json.dumps(dict(source=setup.source, kwargs=setup.kwargs, process=jax.process_index(),
                                  processes=jax.process_count(), local=jax.local_device_count(),
                                  devices=jax.device_count())), flush=True)
"""


@pytest.mark.multiprocess
def test_two_slurm_tasks_on_localhost_join_one_job():
  """Two tasks of a simulated one-node step (each bound to its own GPU, 2 CPU devices each) start
  jax.distributed through the SLURM path and see one job of 4 devices."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROC",
                                                                     "JAX_PROCESS_ID", "FLOWAR_DISTRIBUTED"))}
  base.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
              XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_COORDINATOR_PORT=str(port),
              SLURM_JOB_ID="77", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
              SLURM_STEP_TASKS_PER_NODE="2", SLURM_NODEID="0")
  procs = [subprocess.Popen([sys.executable, "-c", _REPORT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(base, SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                                                CUDA_VISIBLE_DEVICES=str(i)))
           for i in range(2)]
  try:
    outputs = [proc.communicate(timeout=180) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  reports = []
  for proc, (out, err) in zip(procs, outputs):
    lines = [line[len("REPORT "):] for line in out.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, err[-4000:]
    reports.append(json.loads(lines[0]))
  assert [r["process"] for r in reports] == [0, 1]
  for r in reports:
    assert r["source"] == "slurm" and r["kwargs"]["coordinator_address"] == f"localhost:{port}"
    assert (r["processes"], r["local"], r["devices"]) == (2, 2, 4)
