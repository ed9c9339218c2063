#!/usr/bin/env bash
# Runs on every worker of a TPU VM slice (launch/tpu_pod.sh starts it with `--worker=all`):
#
#   launch/tpu_bootstrap.sh CONFIG WORKDIR [--] [--config.key=value ...]
#
# Installs flowar_jax with libtpu into ./.venv (once per worker), then trains. FLOWAR_DISTRIBUTED=1 makes the
# CLI call jax.distributed.initialize() without arguments: JAX reads the slice's workers from the TPU metadata.
# WORKDIR must be shared by all workers (gs://...). The log of this worker goes to ~/flowar_jax_worker.log too.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--] [--config.key=value ...]" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
config="$1"; workdir="$2"; shift 2
[[ "${1:-}" == "--" ]] && shift
cd "$root"
if [[ ! -f .venv/.installed-tpu || setup.py -nt .venv/.installed-tpu ]]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[tpu]'
  touch .venv/.installed-tpu
fi
export FLOWAR_DISTRIBUTED=1
.venv/bin/python -m flowar_jax train --config "$config" --workdir "$workdir" "$@" 2>&1 | tee -a ~/flowar_jax_worker.log
