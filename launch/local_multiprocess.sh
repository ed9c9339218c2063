#!/usr/bin/env bash
# Train with N JAX processes on this machine (each with K devices), joined by jax.distributed:
#
#   launch/local_multiprocess.sh [--processes N] [--devices-per-process K] [--port P] CONFIG WORKDIR [--] [--config.key=value ...]
#
# Process i gets JAX_COORDINATOR_ADDRESS=localhost:P, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (which
# flowar_jax.parallel.distributed reads). On a CPU-only machine each process has K fake CPU devices, so this
# rehearses a multi-host run: per-process data shards, one global mesh, Orbax multi-host checkpoints, logs and
# images from process 0. Output lines are prefixed with [i]; if one process fails, the others are stopped.
set -euo pipefail
processes=2; devices=1; port=""
while [[ $# -gt 0 && "$1" == --* && "$1" != --config* && "$1" != -- ]]; do
  case "$1" in
    --processes) processes="$2"; shift 2 ;;
    --devices-per-process) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--processes N] [--devices-per-process K] [--port P] CONFIG WORKDIR [--] [--config.key=value ...]" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
config="$1"; workdir="$2"; shift 2
[[ "${1:-}" == "--" ]] && shift
python="${PYTHON:-$root/.venv/bin/python}"
if [[ ! -x "$python" ]]; then make -C "$root" venv >/dev/null; fi
if [[ -z "$port" ]]; then port=$(( 20000 + RANDOM % 20000 )); fi
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((i = 0; i < processes; i++)); do
  (
    export JAX_COORDINATOR_ADDRESS="localhost:$port" JAX_NUM_PROCESSES="$processes" JAX_PROCESS_ID="$i"
    if [[ "${JAX_PLATFORMS:-cpu}" == cpu ]]; then
      export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
    fi
    "$python" -m flowar_jax train --config "$config" --workdir "$workdir" "$@" 2>&1 | sed -u "s/^/[$i] /"
  ) &
  pids+=($!)
done
status=0
for ((n = 0; n < processes; n++)); do
  if ! wait -n; then status=1; cleanup; fi  # one failed: the others would wait for it forever
done
trap - EXIT
exit $status
