#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single- or multi-host) and look after the job:
#
#   launch/tpu_pod.sh start   SLICE [--repo URL [--ref REF]] [--wait] CONFIG WORKDIR [--] [--config.key=value ...]
#   launch/tpu_pod.sh         SLICE [--repo URL [--ref REF]] CONFIG WORKDIR [--] [...]   (start --wait)
#   launch/tpu_pod.sh watch   SLICE [--max-restarts N] [--poll SECONDS] CONFIG WORKDIR [--] [--config.key=value ...]
#   launch/tpu_pod.sh status  SLICE
#   launch/tpu_pod.sh logs    SLICE [--worker I] [--lines N] [--follow]    or    logs --workdir WORKDIR [--worker I]
#   launch/tpu_pod.sh stop    SLICE [--timeout SECONDS]
#
#   SLICE = --name NAME --zone ZONE [--accelerator-type TYPE] [--version RUNTIME] [--project PROJECT] [--spot]
#           [--queued] [--dry-run]        (options also take the --option=value form)
#
# start   creates the slice NAME unless it exists (creating needs --accelerator-type; the runtime version
#         defaults from TYPE: v5p v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e,
#         v4 tpu-ubuntu2204-base; --queued asks through a queued resource of the same name, --spot for spot
#         capacity), puts the code on every worker in ~/flowar_jax (this checkout's tracked and
#         untracked-but-not-ignored files, or `git clone --branch REF URL` with --repo), and runs
#         launch/tpu_bootstrap.sh start on all workers: it installs Python >= 3.11 and flowar_jax[tpu] once
#         and starts training detached, so the job survives the end of this command and its ssh sessions.
#         --wait (implied without a subcommand, as the sweep runner calls it) then shows worker 0's log until
#         the job ends and exits 0 if it finished on every worker, 1 otherwise; a dropped connection only
#         ends the log, not the job, and the wait goes on.
# watch   start, then keeps the job going: every --poll seconds (60) it reads the slice's state; a slice
#         that was preempted (PREEMPTED / TERMINATED, or a queued resource SUSPENDED / FAILED) is deleted,
#         created again, given the code and the job, which resumes from its latest checkpoint in WORKDIR. A
#         job preempted on a live slice (exit 143 without `stop`) is started again. Ends when every worker
#         has finished (0), after `stop`, when the job fails (1), or after --max-restarts (10) restarts (1).
# status  the slice's state, then one line per worker: running, finished, stopped, preempted, failed (exit code).
# logs    the end of a worker's log (worker 0) over ssh; with --workdir, the copy each worker keeps in
#         WORKDIR/logs/worker_<i>.log (readable after the slice is gone).
# stop    SIGTERM to the job on all workers: the trainer saves a checkpoint, then exits (143); waits for it.
#
# CONFIG is a path inside the repository (e.g. configs/flowar_l.py). WORKDIR must be reachable from every
# worker: a gs:// path. --dry-run prints the gcloud commands instead of running them (watch still runs the
# ones that only read the slice's and the job's state, to show what it would do).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
remote_bootstrap="bash ~/flowar_jax/launch/tpu_bootstrap.sh"

usage() {
  sed -n '3,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

die() { echo "$*" >&2; exit 2; }

# Prints (with --dry-run) or runs a command that changes something.
act() {
  if [[ -n "$dry" ]]; then
    local line
    printf -v line '%q ' "$@"
    echo "${line% }"
  else
    "$@"
  fi
}

# One line per watch event, with the time, on stdout between the commands.
event() { echo "[watch $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*"; }

# --- options ---------------------------------------------------------------------------------------------

parse() {
  name=""; zone=""; type=""; version=""; project=""; spot=""; queued=""; repo=""; ref="main"; dry=""
  worker=0; lines=100; follow=""; workdir_logs=""; stop_timeout=900; max_restarts=10; poll=60; wait_job=""
  while [[ $# -gt 0 && "$1" == --* && "$1" != --config* && "$1" != -- ]]; do
    if [[ "$1" == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi  # --zone=Z as --zone Z
    case "$1" in
      --name) name="$2"; shift 2 ;;
      --zone) zone="$2"; shift 2 ;;
      --accelerator-type) type="$2"; shift 2 ;;
      --version) version="$2"; shift 2 ;;
      --project) project="$2"; shift 2 ;;
      --spot) spot=1; shift ;;
      --queued) queued=1; shift ;;
      --repo) repo="$2"; shift 2 ;;
      --ref) ref="$2"; shift 2 ;;
      --dry-run) dry=1; shift ;;
      --worker) worker="$2"; shift 2 ;;
      --lines) lines="$2"; shift 2 ;;
      --follow) follow=1; shift ;;
      --wait) wait_job=1; shift ;;
      --workdir) workdir_logs="$2"; shift 2 ;;
      --timeout) stop_timeout="$2"; shift 2 ;;
      --max-restarts) max_restarts="$2"; shift 2 ;;
      --poll) poll="$2"; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  rest=("$@")
  if [[ -z "$version" && -n "$type" ]]; then
    case "$type" in
      v5p-*) version="v2-alpha-tpuv5" ;;
      v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
      v6e-*) version="v2-alpha-tpuv6e" ;;
      v4-*|v3-*|v2-*) version="tpu-ubuntu2204-base" ;;
      *) die "no default runtime version for accelerator type $type: pass --version" ;;
    esac
  fi
  common=(--zone "$zone")
  if [[ -n "$project" ]]; then common+=(--project "$project"); fi
}

need_slice() {
  if [[ -z "$name" || -z "$zone" ]]; then
    echo "$subcommand needs --name NAME --zone ZONE" >&2
    usage
  fi
}

# CONFIG WORKDIR [--] [overrides] -> config, workdir, overrides; the bootstrap command line for the workers.
need_job() {
  need_slice
  [[ ${#rest[@]} -lt 2 ]] && usage
  config="${rest[0]}"; workdir="${rest[1]}"
  overrides=("${rest[@]:2}")
  if [[ "${overrides[0]:-}" == "--" ]]; then overrides=("${overrides[@]:1}"); fi
  if [[ "$workdir" != gs://* ]]; then
    echo "warning: WORKDIR $workdir is not a gs:// path; each worker will write its own local copy" >&2
  fi
  local arg
  start_command="$remote_bootstrap start"
  for arg in "$config" "$workdir" "${overrides[@]}"; do start_command+=" $(printf '%q' "$arg")"; done
}

# --- the slice -------------------------------------------------------------------------------------------

describe_command() {
  if [[ -n "$queued" ]]; then
    describe=(gcloud compute tpus queued-resources describe "$name" "${common[@]}" "--format=value(state.state)")
  else
    describe=(gcloud compute tpus tpu-vm describe "$name" "${common[@]}" "--format=value(state)")
  fi
}

# The slice's state (READY, CREATING, PREEMPTED, ...; a queued resource: ACTIVE, WAITING_FOR_RESOURCES,
# SUSPENDED, ...), NOT_FOUND when it does not exist, UNKNOWN when gcloud failed otherwise.
slice_state() {
  local out
  describe_command
  if out="$("${describe[@]}" 2>&1)"; then
    echo "${out##*$'\n'}"  # the last line: gcloud may warn before it
  elif [[ "$out" == *NOT_FOUND* || "$out" == *"not found"* ]]; then
    echo NOT_FOUND
  else
    echo "gcloud: $out" | tail -n 3 >&2
    echo UNKNOWN
  fi
}

create_slice() {
  [[ -z "$type" ]] && die "slice $name does not exist in $zone: pass --accelerator-type (e.g. v5p-64) to create it"
  local capacity=()
  if [[ -n "$spot" ]]; then capacity=(--spot); fi
  if [[ -n "$queued" ]]; then
    act gcloud compute tpus queued-resources create "$name" "${common[@]}" --node-id "$name" \
      --accelerator-type "$type" --runtime-version "$version" "${capacity[@]}"
  else
    act gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type "$type" \
      --version "$version" "${capacity[@]}"
  fi
}

delete_slice() {
  if [[ -n "$queued" ]]; then  # --force deletes the queued resource's TPU VM with it
    act gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  else
    act gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  fi
}

is_ready() { [[ "$1" == READY || "$1" == ACTIVE ]]; }
is_reclaimed() { [[ "$1" =~ ^(PREEMPTED|TERMINATED|SUSPENDING|SUSPENDED|FAILED)$ ]]; }

# Creates the slice when it does not exist and waits until it is READY (a queued resource: ACTIVE).
ensure_slice() {
  local state
  if [[ -n "$dry" ]]; then  # nothing is asked: with --accelerator-type the slice is assumed missing
    if [[ -n "$type" ]]; then create_slice; fi
    return
  fi
  state="$(slice_state)"
  if [[ "$state" == NOT_FOUND ]]; then
    create_slice
    state="$(slice_state)"
  fi
  while ! is_ready "$state"; do
    [[ "$state" == UNKNOWN ]] && die "could not read the state of slice $name (the gcloud error is above)"
    if is_reclaimed "$state"; then
      die "slice $name is $state: delete it (launch/tpu_pod.sh watch recreates it and restarts the job)"
    fi
    echo "slice $name is $state: waiting until it is ready" >&2
    sleep 30
    state="$(slice_state)"
  done
}

# --- the code and the job --------------------------------------------------------------------------------

ssh_workers() {  # ssh_workers WORKERS COMMAND: runs COMMAND on the slice's workers (all, or one index)
  act gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker="$1" --command "$2"
}

ship_code() {
  if [[ -n "$repo" ]]; then
    ssh_workers all "rm -rf ~/flowar_jax && git clone --depth 1 --branch $(printf '%q' "$ref") $(printf '%q' "$repo") ~/flowar_jax"
    return
  fi
  if [[ -z "${archive:-}" ]]; then  # built once; a recreated slice gets the same code
    archive_dir="$(mktemp -d)"
    archive="$archive_dir/flowar_jax.tar.gz"
    trap 'rm -rf "$archive_dir"' EXIT
    if [[ -z "$dry" ]]; then
      (cd "$root" && git ls-files -z --cached --others --exclude-standard |
         tar -czf "$archive" --null --ignore-failed-read -T -) || return 1
    fi
  fi
  # `|| return`: under `if ship_code` (watch) bash does not stop at a failed step by itself.
  act gcloud compute tpus tpu-vm scp "$archive" "$name:flowar_jax.tar.gz" "${common[@]}" --worker=all || return 1
  ssh_workers all "mkdir -p ~/flowar_jax && tar -xzf ~/flowar_jax.tar.gz -C ~/flowar_jax"
}

# The job's state over all workers, from `tpu_bootstrap.sh status`: running, failed, preempted, stopped,
# none (nothing started), finished (on every worker), or unknown (ssh failed). The lines go to stderr.
job_state() {
  local out states
  if ! out="$(gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all \
                --command "$remote_bootstrap status" 2>/dev/null)"; then
    echo unknown
    return
  fi
  grep -E 'worker [0-9]+: ' <<<"$out" >&2 || true
  states="$(grep -oE 'worker [0-9]+: [a-z]+' <<<"$out" | awk '{print $3}' | sort -u | tr '\n' ' ')"
  case " $states" in
    *" running "*|*" stopping "*) echo running ;;
    *" failed "*) echo failed ;;
    *" preempted "*|*" died "*) echo preempted ;;
    *" stopped "*) echo stopped ;;
    *" no "*) echo none ;;
    " finished ") echo finished ;;
    *) echo unknown ;;
  esac
}

# --- subcommands -----------------------------------------------------------------------------------------

cmd_start() {
  need_job
  ensure_slice
  ship_code
  ssh_workers all "$start_command"
  if [[ -n "$dry" ]]; then return; fi
  if [[ -n "$wait_job" ]]; then wait_for_job; return; fi
  echo "started on every worker of $name; the job runs detached. Follow it with:" >&2
  echo "  $0 logs --name $name --zone $zone --follow    ($0 status, $0 stop: the same options)" >&2
}

# Shows worker 0's log until the job ends; exit status 0 when it finished on every worker.
wait_for_job() {
  local job follow_lines=100
  while true; do
    if ! ssh_workers 0 "$remote_bootstrap logs --lines $follow_lines --follow"; then sleep "$poll"; fi
    follow_lines=0  # after a dropped connection, go on from the end
    job="$(job_state)"
    case "$job" in
      running) ;;
      unknown) sleep "$poll" ;;
      finished) return 0 ;;
      *) echo "the job ended without finishing ($job): see the worker lines above" >&2; return 1 ;;
    esac
  done
}

cmd_status() {
  local state
  need_slice
  if [[ -n "$dry" ]]; then
    describe_command
    act "${describe[@]}"
    ssh_workers all "$remote_bootstrap status"
    return
  fi
  state="$(slice_state)"
  echo "slice $name: $state"
  if is_ready "$state"; then
    ssh_workers all "$remote_bootstrap status"
  elif is_reclaimed "$state"; then
    echo "the slice was reclaimed and the job with it; WORKDIR keeps its checkpoints and logs/worker_<i>.log:" \
      "launch/tpu_pod.sh watch (or delete + start) resumes it"
  fi
}

cmd_logs() {
  local follow_arg=""
  if [[ -n "$workdir_logs" ]]; then
    [[ "$workdir_logs" != gs://* ]] && die "logs --workdir reads the copy in a gs:// WORKDIR, got $workdir_logs"
    act gcloud storage cat "${workdir_logs%/}/logs/worker_$worker.log"
    return
  fi
  need_slice
  if [[ -n "$follow" ]]; then follow_arg=" --follow"; fi
  ssh_workers "$worker" "$remote_bootstrap logs --lines $lines$follow_arg"
}

cmd_stop() {
  need_slice
  ssh_workers all "$remote_bootstrap stop --timeout $stop_timeout"
}

# Restarts the job until it finishes: see `watch` at the top.
cmd_watch() {
  local state job restarts=0 started="" last=""
  need_job
  [[ -z "$type" ]] && die "watch needs --accelerator-type to recreate the slice after a preemption"
  event "watching slice $name in $zone every $poll s (at most $max_restarts restarts)"
  while true; do
    state="$(slice_state)"
    if is_ready "$state" && [[ -z "$started" ]]; then
      job="$(job_state)"
      if [[ "$job" == running ]]; then
        event "slice $name is $state and the job is already running: watching it"
        started=1
      elif [[ "$job" == finished ]]; then
        event "the job has already finished on every worker"
        return 0
      else
        event "slice $name is $state: copying the code and starting the job"
        if ship_code && ssh_workers all "$start_command"; then started=1; else event "starting failed: retrying"; fi
      fi
    elif is_ready "$state"; then
      job="$(job_state)"
      case "$job" in
        finished) event "the job finished on every worker"; return 0 ;;
        stopped) event "the job was stopped (launch/tpu_pod.sh stop): not restarting it"; return 0 ;;
        failed) event "the job failed (see the worker lines above and logs): not restarting it"; return 1 ;;
        preempted|none)
          restarts=$(( restarts + 1 ))
          if (( restarts > max_restarts )); then event "giving up: $max_restarts restarts used"; return 1; fi
          event "the job ended without finishing ($job) on a $state slice: starting it again (restart $restarts of $max_restarts)"
          if ! ssh_workers all "$start_command"; then event "starting failed: retrying"; fi
          ;;
        unknown) event "could not read the job's state over ssh: retrying" ;;
      esac
    elif [[ "$state" == NOT_FOUND ]] || is_reclaimed "$state"; then
      if [[ -n "$started" || "$state" != NOT_FOUND ]]; then
        restarts=$(( restarts + 1 ))
        if (( restarts > max_restarts )); then event "giving up: $max_restarts restarts used"; return 1; fi
        event "slice $name is $state: deleting and recreating it (restart $restarts of $max_restarts)"
      else
        event "slice $name does not exist: creating it"
      fi
      started=""
      if [[ "$state" != NOT_FOUND ]] && ! delete_slice; then event "deleting failed: retrying"; sleep "$poll"; continue; fi
      if ! create_slice; then event "creating failed (no capacity?): retrying"; fi
    elif [[ "$state" != "$last" ]]; then
      event "slice $name is $state: waiting"
    fi
    last="$state"
    sleep "$poll"
  done
}

main() {
  local implied=()
  case "${1:-}" in
    start|watch|status|logs|stop) subcommand="$1"; shift ;;
    -h|--help|"") usage ;;
    *) subcommand=start; implied=(--wait) ;;  # the form from before subcommands: train, in turn
  esac
  parse "${implied[@]}" "$@"
  "cmd_$subcommand"
}

main "$@"
