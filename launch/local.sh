#!/usr/bin/env bash
# Train on this machine: launch/local.sh CONFIG WORKDIR [--] [--config.key=value ...]
# Creates .venv on first use (as `make venv` does), then runs `flowar_jax train`. Running the same command
# again resumes from the latest checkpoint in WORKDIR.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--] [--config.key=value ...]" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
config="$1"; workdir="$2"; shift 2
[[ "${1:-}" == "--" ]] && shift  # overrides may follow a `--`, as for the other launchers
make -C "$root" venv >/dev/null
exec "$root/.venv/bin/python" -m flowar_jax train --config "$config" --workdir "$workdir" "$@"
