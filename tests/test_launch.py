"""The launch scripts, without a cloud or a cluster.

tpu_pod.sh --dry-run prints the gcloud commands of each subcommand (pinned here line by line); `watch` runs
against a fake `gcloud` that plays a slice being preempted and recreated. tpu_bootstrap.sh runs here for
real with a fake `uv` and a fake training command: it detaches, logs, and reports and stops the job.
slurm.sbatch runs with a fake `srun`. The walk-through in docs/tpu_pods.md is run command by command.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from flowar_jax.sweeps.runner import pod_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def launch(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], capture_output=True, text=True,
                        check=False, env=env, timeout=120)


def printed(result: subprocess.CompletedProcess) -> list[str]:
  """The output lines, with the temporary archive path and watch's timestamps made fixed."""
  text = re.sub(r"\S*/flowar_jax\.tar\.gz ", "ARCHIVE ", result.stdout)
  text = re.sub(r"^\[watch [0-9TZ:-]+\]", "[watch]", text, flags=re.M)
  return text.strip().splitlines()


SLICE = ["--name", "flowar-l", "--zone", "us-east5-a"]
SSH = "gcloud compute tpus tpu-vm ssh flowar-l --zone us-east5-a"
BOOT = r"bash\ ~/flowar_jax/launch/tpu_bootstrap.sh"
SHIP = [r"gcloud compute tpus tpu-vm scp ARCHIVE flowar-l:flowar_jax.tar.gz --zone us-east5-a --worker=all",
        rf"{SSH} --worker=all --command mkdir\ -p\ ~/flowar_jax\ \&\&\ tar\ -xzf\ ~/flowar_jax.tar.gz\ -C\ ~/flowar_jax"]


def test_tpu_pod_start_creates_ships_and_starts_every_worker():
  result = launch("tpu_pod.sh", "start", *SLICE, "--accelerator-type", "v5p-16", "--dry-run",
                  "configs/flowar_l.py", "gs://bucket/run", "--", "--config.batch_size=1024",
                  "--config.model.scales=(1,2,4,8,16)")
  assert result.returncode == 0, result.stderr
  # The overrides reach the bootstrap on every worker (printed with the remote shell's quoting).
  assert printed(result) == [
      "gcloud compute tpus tpu-vm create flowar-l --zone us-east5-a --accelerator-type v5p-16 "
      "--version v2-alpha-tpuv5",
      *SHIP,
      rf"{SSH} --worker=all --command {BOOT}\ start\ configs/flowar_l.py\ gs://bucket/run\ "
      r"--config.batch_size=1024\ --config.model.scales=\\\(1\\\,2\\\,4\\\,8\\\,16\\\)"]
  # Without a subcommand it is `start`, as the sweep runner calls it.
  no_subcommand = launch("tpu_pod.sh", *SLICE, "--accelerator-type", "v5p-16", "--dry-run", "configs/flowar_l.py",
                         "gs://bucket/run", "--", "--config.batch_size=1024", "--config.model.scales=(1,2,4,8,16)")
  assert printed(no_subcommand) == printed(result)


def test_tpu_pod_queued_spot_slice_from_a_repository():
  result = launch("tpu_pod.sh", "start", "--name=q1", "--zone=europe-west4-b", "--accelerator-type=v5litepod-16",
                  "--project", "proj", "--queued", "--spot", "--repo", "https://example.com/flowar_jax.git",
                  "--ref", "v1", "--dry-run", "configs/flowar_s.py", "gs://b/r")
  assert result.returncode == 0, result.stderr
  ssh = "gcloud compute tpus tpu-vm ssh q1 --zone europe-west4-b --project proj --worker=all --command"
  assert printed(result) == [
      "gcloud compute tpus queued-resources create q1 --zone europe-west4-b --project proj --node-id q1 "
      "--accelerator-type v5litepod-16 --runtime-version v2-alpha-tpuv5-lite --spot",
      rf"{ssh} rm\ -rf\ ~/flowar_jax\ \&\&\ git\ clone\ --depth\ 1\ --branch\ v1\ "
      r"https://example.com/flowar_jax.git\ ~/flowar_jax",
      rf"{ssh} {BOOT}\ start\ configs/flowar_s.py\ gs://b/r"]


def test_tpu_pod_status_logs_stop():
  def run(*args):
    result = launch("tpu_pod.sh", *args, "--dry-run")
    assert result.returncode == 0, result.stderr
    return printed(result)
  assert run("status", *SLICE) == [
      r"gcloud compute tpus tpu-vm describe flowar-l --zone us-east5-a --format=value\(state\)",
      rf"{SSH} --worker=all --command {BOOT}\ status"]
  assert run("status", *SLICE, "--queued") == [
      r"gcloud compute tpus queued-resources describe flowar-l --zone us-east5-a --format=value\(state.state\)",
      rf"{SSH} --worker=all --command {BOOT}\ status"]
  assert run("logs", *SLICE) == [rf"{SSH} --worker=0 --command {BOOT}\ logs\ --lines\ 100"]
  assert run("logs", *SLICE, "--worker", "3", "--lines", "20", "--follow") == [
      rf"{SSH} --worker=3 --command {BOOT}\ logs\ --lines\ 20\ --follow"]
  assert run("logs", "--workdir", "gs://b/runs/x/", "--worker", "1") == [
      "gcloud storage cat gs://b/runs/x/logs/worker_1.log"]
  assert run("stop", *SLICE, "--timeout", "300") == [rf"{SSH} --worker=all --command {BOOT}\ stop\ --timeout\ 300"]


def test_tpu_pod_needs_name_and_zone():
  result = launch("tpu_pod.sh", "configs/flowar_l.py", "gs://bucket/run")
  assert result.returncode == 2 and "--name NAME --zone ZONE" in result.stderr
  result = launch("tpu_pod.sh", "status", "--zone", "z")
  assert result.returncode == 2 and "status needs --name NAME --zone ZONE" in result.stderr
  result = launch("tpu_pod.sh", "watch", *SLICE, "c.py", "gs://b/r")
  assert result.returncode == 2 and "watch needs --accelerator-type" in result.stderr
  assert launch("tpu_pod.sh", "logs", "--workdir", "/local/run").returncode == 2


def test_tpu_pod_accepts_the_sweep_runners_command():
  """A sweep point's pod command (an existing slice: no --accelerator-type) ships the code and starts it."""
  command = pod_command("sweep-v5p", ["--zone=us-east5-a"], "configs/flowar_s.py", "gs://bucket/sweep/00_lr",
                        {"optimizer.base_lr": 1e-4})
  assert command[0] == "launch/tpu_pod.sh"
  result = launch("tpu_pod.sh", *command[1:3], "--dry-run", *command[3:])
  assert result.returncode == 0, result.stderr
  scp, unpack, start = printed(result)
  assert "--zone us-east5-a" in scp and "--worker=all" in unpack
  assert start.endswith(r"tpu_bootstrap.sh\ start\ configs/flowar_s.py\ gs://bucket/sweep/00_lr\ "
                        r"--config.optimizer.base_lr=0.0001")


# --- watch: a fake gcloud plays the slice ---------------------------------------------------------------

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Answers describe with the next line of $FAKE/states and the workers' status with the next line of
# $FAKE/jobs (';' separates workers); the last line repeats. Every call is appended to $FAKE/calls.
printf '%q ' "$@" >>"$FAKE/calls"; echo >>"$FAKE/calls"
next() {
  head -n 1 "$FAKE/$1"
  if [[ $(wc -l <"$FAKE/$1") -gt 1 ]]; then sed -i 1d "$FAKE/$1"; fi
}
case "$*" in
  *" describe "*)
    state="$(next states)"
    if [[ "$state" == NOT_FOUND ]]; then echo "ERROR: (gcloud) NOT_FOUND: $4 was not found" >&2; exit 1; fi
    echo "$state" ;;
  *"tpu_bootstrap.sh status"*) next jobs | tr ';' '\n' ;;
  *) [[ -n "${FAKE_LIVE:-}" ]] || { echo "unexpected gcloud call: $*" >&2; exit 3; } ;;
esac
"""


def fake_gcloud(tmp_path, states: list[str], jobs: list[str]) -> dict:
  """An environment whose `gcloud` is the fake above, with its answers queued."""
  fake = tmp_path / "fake"
  (fake / "bin").mkdir(parents=True)
  (fake / "bin" / "gcloud").write_text(FAKE_GCLOUD)
  (fake / "bin" / "gcloud").chmod(0o755)
  (fake / "states").write_text("\n".join(states) + "\n")
  (fake / "jobs").write_text("\n".join(jobs) + "\n")
  return dict(os.environ, FAKE=str(fake), PATH=f"{fake / 'bin'}:{os.environ['PATH']}")


def gcloud_calls(env: dict) -> list[str]:
  """The arguments of every call the fake gcloud got, quoted as a shell would need them."""
  with open(os.path.join(env["FAKE"], "calls")) as f:
    return [line.rstrip() for line in f]


WATCH = ["watch", *SLICE, "--accelerator-type", "v5p-16", "--spot", "--poll", "0", "--max-restarts", "3",
         "--dry-run", "configs/flowar_l.py", "gs://bucket/run"]
DESCRIBE = r"compute tpus tpu-vm describe flowar-l --zone us-east5-a --format=value\(state\)"
STATUS = rf"compute tpus tpu-vm ssh flowar-l --zone us-east5-a --worker=all --command {BOOT}\ status"
START = rf"{SSH} --worker=all --command {BOOT}\ start\ configs/flowar_l.py\ gs://bucket/run"
NO_JOB = "worker 0: no job (nothing started);worker 1: no job (nothing started)"


def test_watch_recreates_a_preempted_slice_and_restarts_the_job(tmp_path):
  env = fake_gcloud(tmp_path, ["PREEMPTED", "CREATING", "CREATING", "READY", "READY", "READY"],
                    [NO_JOB, "worker 0: running (pid 9);worker 1: running (pid 8)",
                     "worker 0: finished (exit 0);worker 1: finished (exit 0)"])
  result = launch("tpu_pod.sh", *WATCH, env=env)
  assert result.returncode == 0, result.stderr
  assert printed(result) == [
      "[watch] watching slice flowar-l in us-east5-a every 0 s (at most 3 restarts)",
      "[watch] slice flowar-l is PREEMPTED: deleting and recreating it (restart 1 of 3)",
      "gcloud compute tpus tpu-vm delete flowar-l --zone us-east5-a --quiet",
      "gcloud compute tpus tpu-vm create flowar-l --zone us-east5-a --accelerator-type v5p-16 "
      "--version v2-alpha-tpuv5 --spot",
      "[watch] slice flowar-l is CREATING: waiting",
      "[watch] slice flowar-l is READY: copying the code and starting the job",
      *SHIP,
      START,
      "[watch] the job finished on every worker"]
  # What watch asked gcloud itself (the commands above were only printed): the slice's state at each poll
  # and, once it was READY, the workers' state.
  assert gcloud_calls(env) == [DESCRIBE] * 4 + [STATUS, DESCRIBE, STATUS, DESCRIBE, STATUS]
  assert "worker 1: finished (exit 0)" in result.stderr


def test_watch_restarts_a_job_preempted_on_a_live_slice_and_stops_on_failure(tmp_path):
  env = fake_gcloud(tmp_path, ["READY"], ["worker 0: running (pid 9)", "worker 0: preempted (exit 143: SIGTERM)",
                                          "worker 0: running (pid 10)", "worker 0: failed (exit 1; see log)"])
  result = launch("tpu_pod.sh", *WATCH, env=env)
  assert result.returncode == 1
  assert printed(result) == [
      "[watch] watching slice flowar-l in us-east5-a every 0 s (at most 3 restarts)",
      "[watch] slice flowar-l is READY and the job is already running: watching it",
      "[watch] the job ended without finishing (preempted) on a READY slice: starting it again (restart 1 of 3)",
      START,
      "[watch] the job failed (see the worker lines above and logs): not restarting it"]


def test_watch_queued_resource_and_bounded_restarts(tmp_path):
  env = fake_gcloud(tmp_path, ["NOT_FOUND", "WAITING_FOR_RESOURCES", "ACTIVE", "SUSPENDED"],
                    [NO_JOB, "worker 0: running (pid 3)"])
  result = launch("tpu_pod.sh", *WATCH[:-2], "--queued", "--max-restarts", "2", *WATCH[-2:], env=env)
  assert result.returncode == 1
  lines = printed(result)
  create = ("gcloud compute tpus queued-resources create flowar-l --zone us-east5-a --node-id flowar-l "
            "--accelerator-type v5p-16 --runtime-version v2-alpha-tpuv5 --spot")
  delete = "gcloud compute tpus queued-resources delete flowar-l --zone us-east5-a --force --quiet"
  assert lines == [
      "[watch] watching slice flowar-l in us-east5-a every 0 s (at most 2 restarts)",
      "[watch] slice flowar-l does not exist: creating it", create,
      "[watch] slice flowar-l is WAITING_FOR_RESOURCES: waiting",
      "[watch] slice flowar-l is ACTIVE: copying the code and starting the job", *SHIP, START,
      "[watch] slice flowar-l is SUSPENDED: deleting and recreating it (restart 1 of 2)", delete, create,
      "[watch] slice flowar-l is SUSPENDED: deleting and recreating it (restart 2 of 2)", delete, create,
      "[watch] giving up: 2 restarts used"]


def test_watch_runs_the_commands_it_prints(tmp_path):
  """Without --dry-run the same loop calls gcloud for every step (the fake accepts them)."""
  env = fake_gcloud(tmp_path, ["PREEMPTED", "READY", "READY"],
                    [NO_JOB, "worker 0: finished (exit 0)"])
  env["FAKE_LIVE"] = "1"
  result = launch("tpu_pod.sh", *[a for a in WATCH if a != "--dry-run"], env=env)
  assert result.returncode == 0, result.stderr
  calls = [re.sub(r"\S*/flowar_jax\.tar\.gz ", "ARCHIVE ", c) for c in gcloud_calls(env)]
  assert calls == [DESCRIBE, "compute tpus tpu-vm delete flowar-l --zone us-east5-a --quiet",
                   "compute tpus tpu-vm create flowar-l --zone us-east5-a --accelerator-type v5p-16 "
                   "--version v2-alpha-tpuv5 --spot", DESCRIBE, STATUS,
                   *[c.removeprefix("gcloud ") for c in [*SHIP, START]], DESCRIBE, STATUS]
