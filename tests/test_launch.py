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
SYSTEM_PATH = "/usr/bin:/bin"  # for the bootstrap tests: no uv or Python but the fakes and the system's


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



@pytest.mark.parametrize("job,code", [("worker 0: finished (exit 0)", 0), ("worker 0: failed (exit 1; see log)", 1)])
def test_start_without_a_subcommand_waits_for_the_job(tmp_path, job, code):
  """The sweep runner's form trains points in turn: it starts the job detached, follows worker 0's log until
  the job ends, and exits with whether it finished."""
  env = fake_gcloud(tmp_path, ["READY"], [job])
  env["FAKE_LIVE"] = "1"
  result = launch("tpu_pod.sh", *SLICE, "configs/flowar_l.py", "gs://bucket/run", env=env)
  assert result.returncode == code, result.stderr
  calls = [re.sub(r"\S*/flowar_jax\.tar\.gz ", "ARCHIVE ", c) for c in gcloud_calls(env)]
  assert calls == [DESCRIBE, *[c.removeprefix("gcloud ") for c in [*SHIP, START]],
                   rf"compute tpus tpu-vm ssh flowar-l --zone us-east5-a --worker=0 --command {BOOT}\ logs\ "
                   r"--lines\ 100\ --follow", STATUS]


# --- the walk-through in docs/tpu_pods.md -----------------------------------------------------------------

def doc_commands() -> list[list[str]]:
  """The launch commands in the code blocks of docs/tpu_pods.md's "First run on a pod", as argument lists."""
  with open(os.path.join(ROOT, "docs", "tpu_pods.md")) as f:
    text = f.read()
  section = re.search(r"^### First run on a pod$(.*?)^##", text, flags=re.M | re.S).group(1)
  commands = []
  for block in re.findall(r"^```bash$(.*?)^```$", section, flags=re.M | re.S):
    for command in block.replace("\\\n", " ").strip().splitlines():
      commands.append(shlex.split(command))
  return commands


def test_the_first_run_walk_through_runs_as_written(tmp_path):
  commands = doc_commands()
  assert [c[0] for c in commands] == ["launch/tpu_pod.sh"] * 7
  assert [c[1] for c in commands] == ["start", "logs", "logs", "status", "stop", "start", "watch"]
  start, follow, stored, status, stop, resume, watch = commands
  assert resume == start  # resuming is running the same command again

  slice_ = "flowar-l --zone us-east5-a --project MY_PROJECT"
  ssh = f"gcloud compute tpus tpu-vm ssh {slice_}"
  start_job = (rf"{ssh} --worker=all --command {BOOT}\ start\ configs/flowar_l.py\ gs://MY_BUCKET/runs/flowar_l\ "
               r"--config.data.data_dir=/mnt/imagenet")
  ship = [rf"gcloud compute tpus tpu-vm scp ARCHIVE flowar-l:flowar_jax.tar.gz --zone us-east5-a "
          r"--project MY_PROJECT --worker=all",
          rf"{ssh} --worker=all --command mkdir\ -p\ ~/flowar_jax\ \&\&\ tar\ -xzf\ ~/flowar_jax.tar.gz\ -C\ ~/flowar_jax"]
  expected = {
      "start": [f"gcloud compute tpus tpu-vm create {slice_} --accelerator-type v5p-16 --version v2-alpha-tpuv5",
                *ship, start_job],
      "logs": [rf"{ssh} --worker=0 --command {BOOT}\ logs\ --lines\ 100\ --follow"],
      "status": [rf"gcloud compute tpus tpu-vm describe {slice_} --format=value\(state\)",
                 rf"{ssh} --worker=all --command {BOOT}\ status"],
      "stop": [rf"{ssh} --worker=all --command {BOOT}\ stop\ --timeout\ 900"],
  }
  for command, lines in [(start, expected["start"]), (follow, expected["logs"]), (status, expected["status"]),
                         (stop, expected["stop"]),
                         (stored, ["gcloud storage cat gs://MY_BUCKET/runs/flowar_l/logs/worker_1.log"])]:
    result = launch("tpu_pod.sh", command[1], "--dry-run", *command[2:])
    assert result.returncode == 0, (command, result.stderr)
    assert printed(result) == lines, command

  # watch, against a slice that a spot preemption takes away once (the queued resource is SUSPENDED).
  env = fake_gcloud(tmp_path, ["ACTIVE", "SUSPENDED", "ACTIVE", "ACTIVE"],
                    [NO_JOB, NO_JOB, "worker 0: finished (exit 0);worker 1: finished (exit 0)"])
  result = launch("tpu_pod.sh", "watch", "--dry-run", "--poll", "0", *watch[2:], env=env)
  assert result.returncode == 0, result.stderr
  assert printed(result) == [
      "[watch] watching slice flowar-l in us-east5-a every 0 s (at most 10 restarts)",
      "[watch] slice flowar-l is ACTIVE: copying the code and starting the job", *ship, start_job,
      "[watch] slice flowar-l is SUSPENDED: deleting and recreating it (restart 1 of 10)",
      f"gcloud compute tpus queued-resources delete {slice_} --force --quiet",
      f"gcloud compute tpus queued-resources create {slice_} --node-id flowar-l --accelerator-type v5p-16 "
      "--runtime-version v2-alpha-tpuv5 --spot",
      "[watch] slice flowar-l is ACTIVE: copying the code and starting the job", *ship, start_job,
      "[watch] the job finished on every worker"]

# --- tpu_bootstrap.sh on this machine, with fakes ----------------------------------------------------------

FAKE_UV = """#!/usr/bin/env bash
# uv's `venv` makes a venv whose python is this test's; `pip install` is recorded, nothing is downloaded.
echo "uv $*" >>"$FAKE_CALLS"
if [[ "$1" == venv ]]; then
  mkdir -p "${@: -1}/bin"
  printf '#!/bin/sh\\nexec %s "$@"\\n' "$REAL_PYTHON" >"${@: -1}/bin/python"
  chmod +x "${@: -1}/bin/python"
fi
"""
# A trainer that logs a step every 0.1 s and, like flowar_jax on SIGTERM, "checkpoints" and exits with 143.
TRAINER = ('echo "training $*"; trap "echo saving a checkpoint; exit 143" TERM; '
           'for i in $(seq 600); do echo "step $i"; sleep 0.1; done')


class Worker:
  """A copy of launch/tpu_bootstrap.sh in a scratch repository, run as TPU worker 3 with fake tools."""

  def __init__(self, tmp_path, detach: str = "setsid"):
    self.repo, self.bin, self.home = tmp_path / "repo", tmp_path / "bin", tmp_path / "home"
    for d in (self.repo / "launch", self.bin, self.home):
      d.mkdir(parents=True)
    for name in ("tpu_bootstrap.sh", "log_sync.py"):
      shutil.copy(os.path.join(ROOT, "launch", name), self.repo / "launch" / name)
    (self.repo / "setup.py").write_text("")
    self.calls = tmp_path / "calls"
    self.job_dir = self.home / "flowar_jax_job"
    self.workdir = tmp_path / "workdir"
    self.env = dict(os.environ, HOME=str(self.home), PATH=f"{self.bin}:{SYSTEM_PATH}", FAKE_CALLS=str(self.calls),
                    REAL_PYTHON=sys.executable, FLOWAR_WORKER_ID="3", FLOWAR_LOG_SYNC_SECONDS="0.5",
                    FLOWAR_DETACH=detach, FLOWAR_TRAIN_CMD=TRAINER, TMUX_TMPDIR=str(tmp_path),
                    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

  def fake(self, name: str, text: str) -> None:
    (self.bin / name).write_text(text)
    (self.bin / name).chmod(0o755)

  def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(self.repo / "launch" / "tpu_bootstrap.sh"), *args], capture_output=True,
                          text=True, env=dict(self.env, **env), timeout=60, check=False)

  def wait_for(self, predicate, what: str, timeout: float = 20.0) -> None:
    end = time.time() + timeout
    while not predicate():
      assert time.time() < end, f"timed out waiting for {what}"
      time.sleep(0.1)

  def status(self) -> str:
    result = self("status")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()

  def log(self) -> str:
    return (self.job_dir / "train.log").read_text()

  def synced_log(self) -> str:
    path = self.workdir / "logs" / "worker_3.log"
    return path.read_text() if path.exists() else ""

  def cleanup(self) -> None:
    pid_file = self.job_dir / "pid"
    if pid_file.exists() and not (self.job_dir / "exit_code").exists():
      try:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
      except ProcessLookupError:
        pass
    subprocess.run(["tmux", "-L", "flowar_jax", "kill-server"], env=self.env, capture_output=True, check=False)


@pytest.fixture
def worker(tmp_path, request):
  w = Worker(tmp_path, getattr(request, "param", "setsid"))
  w.fake("uv", FAKE_UV)
  yield w
  w.cleanup()


@pytest.mark.parametrize("worker", ["setsid", "tmux"], indirect=True)
def test_bootstrap_detaches_logs_syncs_and_stops(worker):
  if worker.env["FLOWAR_DETACH"] == "tmux" and not shutil.which("tmux"):
    pytest.skip("tmux is not installed")
  assert worker.status() == "worker 3: no job (nothing started in %s)" % worker.job_dir
  began = time.time()
  result = worker("start", "configs/flowar_l.py", str(worker.workdir), "--", "--config.seed=3")
  assert result.returncode == 0, result.stderr
  assert time.time() - began < 10  # returned while the 60 s job runs
  venv = worker.repo / ".venv"
  assert worker.calls.read_text().splitlines() == [
      f"uv venv --quiet --python >=3.11 {venv}",
      f"uv pip install --quiet --python {venv}/bin/python -e {worker.repo}[tpu]"]
  pid = int((worker.job_dir / "pid").read_text())
  os.kill(pid, 0)  # the trainer runs
  assert result.stdout.splitlines()[-1].startswith(f"worker 3: running (pid {pid}, started ")
  worker.wait_for(lambda: "step 3" in worker.log(), "the trainer's log")
  assert f"training configs/flowar_l.py {worker.workdir} --config.seed=3" in worker.log()
  worker.wait_for(lambda: "step 2" in worker.synced_log(), "the log's copy in WORKDIR/logs")
  assert worker.status().startswith("worker 3: running")
  assert "step" in worker("logs", "--lines", "2").stdout
  # A second start while it runs is refused.
  again = worker("start", "configs/flowar_l.py", str(worker.workdir))
  assert again.returncode == 1 and "already running" in again.stderr

  stopped = worker("stop", "--timeout", "20")
  assert stopped.returncode == 0, stopped.stderr
  assert stopped.stdout.startswith("worker 3: stopped (exit 143: SIGTERM from stop")
  assert (worker.job_dir / "exit_code").read_text().strip() == "143"
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)
  # The last lines reach WORKDIR as the job ends.
  worker.wait_for(lambda: "training exited with code 143" in worker.synced_log(), "the final copy of the log")
  assert "saving a checkpoint" in worker.synced_log()


def test_bootstrap_reports_finished_failed_and_preempted(worker):
  def run_to_end(command: str) -> str:
    result = worker("start", "c.py", str(worker.workdir), FLOWAR_TRAIN_CMD=command)
    assert result.returncode == 0, result.stderr
    worker.wait_for(lambda: (worker.job_dir / "exit_code").exists(), "the job to end")
    return worker.status()
  assert run_to_end("echo done") == "worker 3: finished (exit 0)"
  assert run_to_end("exit 3") == f"worker 3: failed (exit 3; see {worker.job_dir}/train.log)"
  # SIGTERM that no `stop` asked for: a maintenance event or a preemption notice.
  result = worker("start", "c.py", str(worker.workdir))
  assert result.returncode == 0, result.stderr
  os.kill(int((worker.job_dir / "pid").read_text()), signal.SIGTERM)
  worker.wait_for(lambda: (worker.job_dir / "exit_code").exists(), "the job to end")
  assert worker.status().startswith("worker 3: preempted (exit 143: SIGTERM;")
  # The log of all three starts is kept, and uv was needed once.
  assert worker.log().count("starting in") == 3
  assert len(worker.calls.read_text().splitlines()) == 2


def test_bootstrap_logs_follow_ends_with_the_job(worker):
  result = worker("start", "c.py", str(worker.workdir), FLOWAR_TRAIN_CMD="sleep 1.5; echo last line")
  assert result.returncode == 0, result.stderr
  began = time.time()
  follow = worker("logs", "--follow", "--lines", "5")
  assert follow.returncode == 0 and "last line" in follow.stdout
  assert time.time() - began < 15
  assert worker.status() == "worker 3: finished (exit 0)"

def test_bootstrap_continues_the_log_of_a_recreated_worker(worker):
  """A new slice has an empty disk: the log starts from the copy its predecessor left in WORKDIR."""
  (worker.workdir / "logs").mkdir(parents=True)
  (worker.workdir / "logs" / "worker_3.log").write_text("before the preemption\n")
  result = worker("start", "c.py", str(worker.workdir), FLOWAR_TRAIN_CMD="echo after")
  assert result.returncode == 0, result.stderr
  worker.wait_for(lambda: "exited with code 0" in worker.synced_log(), "the final copy")
  assert worker.synced_log().startswith("before the preemption\n")
  assert "after" in worker.synced_log()


FAKE_PYTHON3_10 = """#!/usr/bin/env bash
# The image's python3: 3.10, and PyPI unreachable for pip.
echo "python3 $*" >>"$FAKE_CALLS"
exit 1
"""
FAKE_PYTHON3_12 = """#!/usr/bin/env bash
# An installed python3.12 (this test's Python underneath) whose `-m venv` makes a venv with a recording pip.
if [[ "$1 $2" == "-m venv" ]]; then
  echo "python3.12 $*" >>"$FAKE_CALLS"
  mkdir -p "$3/bin"
  printf '#!/bin/sh\\nexec %s "$@"\\n' "$REAL_PYTHON" >"$3/bin/python"
  printf '#!/bin/sh\\necho "pip $*" >>"%s"\\n' "$FAKE_CALLS" >"$3/bin/pip"
  chmod +x "$3/bin/python" "$3/bin/pip"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def test_bootstrap_falls_back_to_an_installed_python_311(worker):
  """No uv and none to install: an installed python3.12 builds the venv. A venv an older bootstrap built
  with Python 3.10 is replaced, though its install marker is newer than setup.py."""
  (worker.bin / "uv").unlink()
  worker.fake("python3", FAKE_PYTHON3_10)
  worker.fake("python3.12", FAKE_PYTHON3_12)
  old = worker.repo / ".venv"
  (old / "bin").mkdir(parents=True)
  (old / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")  # fails the >= 3.11 check, like 3.10
  (old / "bin" / "python").chmod(0o755)
  (old / ".installed-tpu").write_text("")
  result = worker("start", "c.py", str(worker.workdir), FLOWAR_TRAIN_CMD="echo ok")
  assert result.returncode == 0, result.stderr
  venv = worker.repo / ".venv"
  assert worker.calls.read_text().splitlines() == [
      "python3 -m pip install --user --quiet uv", f"python3.12 -m venv {venv}",
      "pip install -q --upgrade pip", f"pip install -q -e {worker.repo}[tpu]"]
  assert "uv is not available" in result.stdout


def test_bootstrap_without_any_python_311_says_so(worker):
  (worker.bin / "uv").unlink()
  worker.fake("python3", FAKE_PYTHON3_10)
  for version in ("3.11", "3.12", "3.13"):  # hide the system's python3.x
    worker.fake(f"python{version}", "#!/bin/sh\nexit 127\n")
  result = worker("start", "c.py", str(worker.workdir))
  assert result.returncode == 1
  assert "no Python >= 3.11 here and uv could not be installed" in result.stderr


# --- SLURM ------------------------------------------------------------------------------------------------

def run_sbatch(tmp_path, **slurm: str) -> subprocess.CompletedProcess:
  """launch/slurm.sbatch as sbatch would run it, with a fake srun that prints its arguments."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  (bin_dir / "srun").write_text('#!/usr/bin/env bash\nprintf "%q " srun "$@"; echo\n')
  (bin_dir / "srun").chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR="/shared/flowar_jax", SLURM_JOB_NUM_NODES="2",
             **slurm)
  return launch("slurm.sbatch", "configs/flowar_l.py", "/shared/runs/l", "--", "--config.mesh.fsdp=-1", env=env)


def test_slurm_one_task_per_gpu_and_one_task_per_node(tmp_path):
  train = ("--chdir=/shared/flowar_jax /shared/flowar_jax/.venv/bin/python -m flowar_jax train "
           "--config configs/flowar_l.py --workdir /shared/runs/l --config.mesh.fsdp=-1")
  per_gpu = run_sbatch(tmp_path, SLURM_GPUS_PER_NODE="h100:8", SLURM_NTASKS_PER_NODE="8", SLURM_NTASKS="16")
  assert per_gpu.returncode == 0, per_gpu.stderr
  assert per_gpu.stdout.strip() == f"srun --kill-on-bad-exit=1 --gpus-per-task=1 {train}"
  assert "2 node(s) x 8 task(s), 1 GPU(s) per task" in per_gpu.stderr
  per_node = run_sbatch(tmp_path, SLURM_GPUS_PER_NODE="8", SLURM_NTASKS_PER_NODE="1", SLURM_NTASKS="2")
  assert per_node.stdout.strip() == f"srun --kill-on-bad-exit=1 --gpus-per-task=8 {train}"
  # Tasks per node from --ntasks alone; a count that does not divide the GPUs is refused.
  per_pair = run_sbatch(tmp_path, SLURM_GPUS_ON_NODE="8", SLURM_NTASKS="8")
  assert "--gpus-per-task=2 " in per_pair.stdout
  bad = run_sbatch(tmp_path, SLURM_GPUS_PER_NODE="8", SLURM_NTASKS_PER_NODE="3", SLURM_NTASKS="6")
  assert bad.returncode == 2 and "--ntasks-per-node=3 must divide --gpus-per-node=8" in bad.stderr
  unknown = run_sbatch(tmp_path, SLURM_NTASKS_PER_NODE="8")
  assert unknown.returncode == 2 and "pass --gpus-per-node and --ntasks-per-node" in unknown.stderr


def test_local_multiprocess_usage():
  result = launch("local_multiprocess.sh", "--processes", "2", "configs/digits.py")
  assert result.returncode == 2 and "usage:" in result.stderr
