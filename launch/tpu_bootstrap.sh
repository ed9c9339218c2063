#!/usr/bin/env bash
# Runs on every worker of a TPU VM slice (launch/tpu_pod.sh runs it on all workers at once over ssh):
#
#   launch/tpu_bootstrap.sh start CONFIG WORKDIR [--] [--config.key=value ...]  install once, train detached
#   launch/tpu_bootstrap.sh status                     this worker's job: running / finished / stopped / preempted / failed
#   launch/tpu_bootstrap.sh logs [--lines N] [--follow]    --follow ends when the job does
#   launch/tpu_bootstrap.sh stop [--timeout SECONDS]   SIGTERM: the trainer checkpoints, then exits with 143
#
# (`tpu_bootstrap.sh CONFIG WORKDIR ...` without a subcommand is `start`.)
#
# start builds ./.venv with Python >= 3.11 and flowar_jax[tpu] (once; again when setup.py changes), then
# starts training detached from the ssh session (tmux if installed, else setsid + nohup), so a dropped
# connection does not stop it, and returns. FLOWAR_DISTRIBUTED=1 makes the CLI call
# jax.distributed.initialize(), which finds the slice's workers in the TPU metadata. WORKDIR must be shared
# by all workers (gs://...); rerunning start resumes from its latest checkpoint.
#
# This worker's files, in FLOWAR_JOB_DIR (default ~/flowar_jax_job):
#   train.log   the trainer's output (appended by every start); copied to WORKDIR/logs/worker_<i>.log every
#               FLOWAR_LOG_SYNC_SECONDS (60) and when the job ends, so it outlives a deleted slice
#   pid         the trainer's process id;  boot_id: the boot it was started in
#   exit_code   written when the trainer exits (0 done; 143 ended by SIGTERM, stopped or preempted: once
#               training runs, the trainer saves a checkpoint before it exits)
#   stop_requested  written by stop, to tell a requested stop from a preemption
#
# Other settings: FLOWAR_PYTHON (a Python >= 3.11 to build .venv from), FLOWAR_DETACH (tmux | setsid),
# FLOWAR_WORKER_ID (default: the TPU metadata's agent-worker-number), FLOWAR_TRAIN_CMD (a shell command run
# instead of `python -m flowar_jax train`, with CONFIG WORKDIR OVERRIDES as "$@"; for tests).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
script="$root/launch/tpu_bootstrap.sh"
job_dir="${FLOWAR_JOB_DIR:-$HOME/flowar_jax_job}"
log="$job_dir/train.log"
tmux_socket=flowar_jax  # a tmux server of its own: `tmux -L flowar_jax ls` lists the job's session

usage() {
  sed -n '4,7p' "$script" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

say() { echo "[flowar_jax $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*"; }

worker_id() {
  if [[ -n "${FLOWAR_WORKER_ID:-}" ]]; then echo "$FLOWAR_WORKER_ID"; return; fi
  if [[ -n "${TPU_WORKER_ID:-}" ]]; then echo "$TPU_WORKER_ID"; return; fi
  curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0
}

boot_id() { cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown; }

# --- Python >= 3.11 and the package --------------------------------------------------------------------

is_python311() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

# uv makes the venv from a Python >= 3.11, downloading a managed CPython when the image has none (TPU VM
# base images ship 3.10). It is installed from PyPI into ~/.local/bin when missing.
find_uv() {
  if command -v uv >/dev/null; then command -v uv; return; fi
  if [[ ! -x "$HOME/.local/bin/uv" ]]; then
    python3 -m pip install --user --quiet uv >&2 || return 1
  fi
  [[ -x "$HOME/.local/bin/uv" ]] && echo "$HOME/.local/bin/uv"
}

# An installed Python >= 3.11, for when uv cannot be had.
find_python311() {
  local candidate
  for candidate in ${FLOWAR_PYTHON:-} python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null && is_python311 "$candidate"; then command -v "$candidate"; return; fi
  done
  return 1
}

install() {
  local venv="$root/.venv" marker="$root/.venv/.installed-tpu" uv python
  # A venv from an earlier bootstrap may be Python 3.10: rebuild it.
  if [[ -f "$marker" && ! "$root/setup.py" -nt "$marker" ]] && is_python311 "$venv/bin/python"; then
    return
  fi
  rm -rf "$venv"
  if uv="$(find_uv)"; then
    say "installing flowar_jax[tpu] into $venv with $uv"
    "$uv" venv --quiet --python "${FLOWAR_PYTHON:->=3.11}" "$venv"
    "$uv" pip install --quiet --python "$venv/bin/python" -e "${root}[tpu]"
  elif python="$(find_python311)"; then
    say "uv is not available: installing flowar_jax[tpu] into $venv with $python"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -e "${root}[tpu]"
  else
    echo "no Python >= 3.11 here and uv could not be installed (python3 -m pip install --user uv):" \
      "install python3.11 or set FLOWAR_PYTHON" >&2
    exit 1
  fi
  if ! is_python311 "$venv/bin/python"; then
    echo "$venv/bin/python is not Python >= 3.11 (flowar_jax needs 3.11+)" >&2
    exit 1
  fi
  touch "$marker"
}

# --- the job ---------------------------------------------------------------------------------------------

is_running() {
  local pid
  [[ -f "$job_dir/pid" && ! -f "$job_dir/exit_code" ]] || return 1
  [[ "$(cat "$job_dir/boot_id" 2>/dev/null)" == "$(boot_id)" ]] || return 1  # a pid of an earlier boot
  pid="$(cat "$job_dir/pid")"
  kill -0 "$pid" 2>/dev/null
}

# One line for this worker; `tpu_pod.sh status` and `watch` read the word after "worker N:".
status_line() {
  local prefix code
  prefix="worker $(worker_id):"
  if is_running; then
    if [[ -f "$job_dir/stop_requested" ]]; then
      echo "$prefix stopping (pid $(cat "$job_dir/pid"): SIGTERM sent, saving a checkpoint)"
    else
      echo "$prefix running (pid $(cat "$job_dir/pid"), started $(cat "$job_dir/started"))"
    fi
  elif [[ -f "$job_dir/exit_code" ]]; then
    code="$(cat "$job_dir/exit_code")"
    if [[ "$code" == 0 ]]; then
      echo "$prefix finished (exit 0)"
    elif [[ "$code" == 143 && -f "$job_dir/stop_requested" ]]; then
      echo "$prefix stopped (exit 143: SIGTERM from stop; start again to resume from the last checkpoint)"
    elif [[ "$code" == 143 ]]; then
      echo "$prefix preempted (exit 143: SIGTERM; start again to resume from the last checkpoint)"
    else
      echo "$prefix failed (exit $code; see $log)"
    fi
  elif [[ -f "$job_dir/pid" ]]; then
    echo "$prefix died (no exit code: killed, or the VM restarted; start again to resume)"
  else
    echo "$prefix no job (nothing started in $job_dir)"
  fi
}

# The detached part: runs the trainer, keeps its log synced to WORKDIR, records how it ended.
run_job() {
  local workdir="$2" python="$root/.venv/bin/python" dest child syncer code=0
  dest="$workdir/logs/worker_$(worker_id).log"
  # A recreated slice starts with an empty disk: continue the log its predecessor left in WORKDIR.
  "$python" "$root/launch/log_sync.py" --seed "$log" "$dest" >>"$job_dir/log_sync.err" 2>&1 || true
  say "worker $(worker_id) starting in $root: $*" >>"$log"
  "$python" "$root/launch/log_sync.py" --every "${FLOWAR_LOG_SYNC_SECONDS:-60}" "$log" "$dest" \
    >>"$job_dir/log_sync.err" 2>&1 &
  syncer=$!
  export FLOWAR_DISTRIBUTED=1 PYTHONUNBUFFERED=1
  if [[ -n "${FLOWAR_TRAIN_CMD:-}" ]]; then
    bash -c "$FLOWAR_TRAIN_CMD" flowar_train "$@" >>"$log" 2>&1 </dev/null &
  else
    "$python" -m flowar_jax train --config "$1" --workdir "$2" "${@:3}" >>"$log" 2>&1 </dev/null &
  fi
  child=$!
  echo "$child" >"$job_dir/pid"
  # tmux's hangup or a TERM to this runner reaches the trainer as SIGTERM, so it checkpoints.
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM HUP INT
  wait "$child" || code=$?
  while kill -0 "$child" 2>/dev/null; do  # a signal interrupted `wait`: the trainer is still saving
    code=0
    wait "$child" || code=$?
  done
  say "worker $(worker_id): training exited with code $code" >>"$log"
  echo "$code" >"$job_dir/exit_code.tmp"
  mv "$job_dir/exit_code.tmp" "$job_dir/exit_code"
  kill -TERM "$syncer" 2>/dev/null || true
  wait "$syncer" || true
  "$python" "$root/launch/log_sync.py" --once "$log" "$dest" >>"$job_dir/log_sync.err" 2>&1 || true
}

# Starts run_job in the background so that it outlives this ssh session.
detach() {
  local mode="${FLOWAR_DETACH:-}" command
  if [[ -z "$mode" ]]; then
    if command -v tmux >/dev/null; then mode=tmux; else mode=setsid; fi
  fi
  case "$mode" in
    tmux)
      # A tmux server that already runs would not pass this session's environment on: the job reads it
      # back from job.env (read-only variables left out: bash cannot assign them).
      export -p | grep -v '^declare -[a-zA-Z]*r' >"$job_dir/job.env"
      printf -v command '%q ' source "$job_dir/job.env"
      printf -v command '%s&& exec %s' "$command" "$(printf '%q ' bash "$script" _run "$@")"
      tmux -L "$tmux_socket" kill-session -t flowar_jax 2>/dev/null || true  # a leftover, job not running
      env -u TMUX tmux -L "$tmux_socket" new-session -d -s flowar_jax "bash -c $(printf '%q' "$command")"
      ;;
    setsid)
      setsid nohup bash "$script" _run "$@" </dev/null >>"$job_dir/runner.log" 2>&1 &
      ;;
    *) echo "FLOWAR_DETACH must be tmux or setsid, got '$mode'" >&2; exit 2 ;;
  esac
}

start() {
  [[ $# -lt 2 ]] && usage
  local config="$1" workdir="$2"; shift 2
  [[ "${1:-}" == "--" ]] && shift
  mkdir -p "$job_dir"
  if is_running; then
    echo "a job is already running on this worker (pid $(cat "$job_dir/pid")): stop it first" >&2
    exit 1
  fi
  install
  rm -f "$job_dir/pid" "$job_dir/exit_code" "$job_dir/stop_requested"
  boot_id >"$job_dir/boot_id"
  date -u +%Y-%m-%dT%H:%M:%SZ >"$job_dir/started"
  detach "$config" "$workdir" "$@"
  local waited=0
  while [[ ! -f "$job_dir/pid" ]] && (( waited < 100 )); do sleep 0.1; waited=$(( waited + 1 )); done
  if [[ ! -f "$job_dir/pid" ]]; then
    echo "the job did not start within 10 s: see $job_dir/runner.log and $log" >&2
    exit 1
  fi
  status_line
}

stop() {
  local timeout=900 waited=0
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --timeout) timeout="$2"; shift 2 ;;
      *) echo "unknown option $1" >&2; exit 2 ;;
    esac
  done
  if is_running; then
    touch "$job_dir/stop_requested"
    kill -TERM "$(cat "$job_dir/pid")"
    # The trainer saves a checkpoint at the next step (all workers agree on which), then exits.
    while is_running && (( waited < timeout )); do sleep 1; waited=$(( waited + 1 )); done
  fi
  status_line
  if is_running; then
    echo "still running after $timeout s (saving a checkpoint?): run stop again later" >&2
    exit 1
  fi
}

logs() {
  local lines=100 follow=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --lines) lines="$2"; shift 2 ;;
      --follow) follow=(-F); shift ;;
      *) echo "unknown option $1" >&2; exit 2 ;;
    esac
  done
  if [[ ! -f "$log" ]]; then echo "no log at $log on worker $(worker_id)" >&2; exit 1; fi
  if [[ ${#follow[@]} -gt 0 ]] && is_running; then
    follow+=(--pid "$(cat "$job_dir/pid")")  # stop following when the trainer exits
  elif [[ ${#follow[@]} -gt 0 ]]; then
    follow=()
  fi
  tail -n "$lines" "${follow[@]}" "$log"
}

main() {
  [[ $# -lt 1 ]] && usage
  case "$1" in
    start) shift; start "$@" ;;
    status) mkdir -p "$job_dir"; status_line ;;
    stop) shift; stop "$@" ;;
    logs) shift; logs "$@" ;;
    _run) shift; run_job "$@" ;;
    -h|--help) usage ;;
    *) start "$@" ;;
  esac
}

main "$@"
