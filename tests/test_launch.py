"""The launch scripts' command lines (no cloud or cluster needed: tpu_pod.sh --dry-run prints its commands)."""
from __future__ import annotations

import os
import subprocess

from flowar_jax.sweeps.runner import pod_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], capture_output=True, text=True,
                        check=False)


def test_tpu_pod_creates_ships_and_bootstraps_every_worker():
  result = launch("tpu_pod.sh", "--name", "flowar-l", "--zone", "us-east5-a", "--accelerator-type", "v5p-16",
                  "--dry-run", "configs/flowar_l.py", "gs://bucket/run", "--", "--config.batch_size=1024",
                  "--config.model.scales=(1,2,4,8,16)")
  assert result.returncode == 0, result.stderr
  create, scp, unpack, bootstrap = result.stdout.strip().splitlines()
  assert create.startswith("gcloud compute tpus tpu-vm create flowar-l --zone us-east5-a --accelerator-type v5p-16 "
                           "--version v2-alpha-tpuv5")
  assert "tpu-vm scp" in scp and "--worker=all" in scp and "--worker=all" in unpack
  # The overrides reach the bootstrap on every worker (printed with the remote shell's quoting).
  assert "--worker=all" in bootstrap
  assert (r"tpu_bootstrap.sh\ configs/flowar_l.py\ gs://bucket/run\ --config.batch_size=1024\ "
          r"--config.model.scales=") in bootstrap


def test_tpu_pod_needs_name_and_zone():
  result = launch("tpu_pod.sh", "configs/flowar_l.py", "gs://bucket/run")
  assert result.returncode == 2 and "--name NAME --zone ZONE" in result.stderr


def test_tpu_pod_accepts_the_sweep_runners_command():
  """A sweep point's pod command (an existing slice: no --accelerator-type) ships the code and bootstraps it."""
  command = pod_command("sweep-v5p", ["--zone=us-east5-a"], "configs/flowar_s.py", "gs://bucket/sweep/00_lr",
                        {"optimizer.base_lr": 1e-4})
  assert command[0] == "launch/tpu_pod.sh"
  result = launch("tpu_pod.sh", *command[1:3], "--dry-run", *command[3:])
  assert result.returncode == 0, result.stderr
  scp, unpack, bootstrap = result.stdout.strip().splitlines()
  assert "--zone us-east5-a" in scp and "--worker=all" in unpack
  assert r"tpu_bootstrap.sh\ configs/flowar_s.py\ gs://bucket/sweep/00_lr\ --config.optimizer.base_lr=0.0001" \
      in bootstrap


def test_local_multiprocess_usage():
  result = launch("local_multiprocess.sh", "--processes", "2", "configs/digits.py")
  assert result.returncode == 2 and "usage:" in result.stderr
