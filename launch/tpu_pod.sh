#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single- or multi-host):
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [--accelerator-type TYPE] [--version RUNTIME] [--project PROJECT]
#                     [--spot] [--repo URL [--ref REF]] [--dry-run] CONFIG WORKDIR [--] [--config.key=value ...]
#
#   e.g. launch/tpu_pod.sh --name flowar-l --zone us-east5-a --accelerator-type v5p-64 \
#          configs/flowar_l.py gs://BUCKET/runs/flowar_l -- --config.data.data_dir=/mnt/imagenet
#
# 1. Creates the slice NAME (gcloud compute tpus tpu-vm create) unless it exists (creating needs
#    --accelerator-type; options also take the --option=value form); the runtime version
#    defaults from TYPE (v5p: v2-alpha-tpuv5, v5litepod: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e,
#    v4: tpu-ubuntu2204-base).
# 2. Puts the code on every worker in ~/flowar_jax: this checkout's files (git ls-files: tracked and
#    untracked-but-not-ignored) copied with scp, or `git clone --branch REF URL` with --repo.
# 3. Runs launch/tpu_bootstrap.sh CONFIG WORKDIR [overrides] on all workers at once (--worker=all); it installs
#    the package with libtpu and trains with jax.distributed auto-initialised from the TPU metadata.
# CONFIG is a path inside the repository (e.g. configs/flowar_l.py). WORKDIR must be reachable from every
# worker: a gs:// path. --dry-run prints the gcloud commands instead of running them.
set -euo pipefail
name=""; zone=""; type=""; version=""; project=""; spot=""; repo=""; ref="main"; dry=""
while [[ $# -gt 0 && "$1" == --* && "$1" != --config* && "$1" != -- ]]; do
  if [[ "$1" == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi  # --zone=Z as --zone Z
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator-type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot="--spot"; shift ;;
    --repo) repo="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [[ -z "$name" || -z "$zone" || $# -lt 2 ]]; then
  sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
[[ "${1:-}" == "--" ]] && shift
if [[ "$workdir" != gs://* ]]; then
  echo "warning: WORKDIR $workdir is not a gs:// path; each worker will write its own local copy" >&2
fi
if [[ -z "$version" && -n "$type" ]]; then
  case "$type" in
    v5p-*) version="v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    v4-*|v3-*|v2-*) version="tpu-ubuntu2204-base" ;;
    *) echo "no default runtime version for accelerator type $type: pass --version" >&2; exit 2 ;;
  esac
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
common=(--zone "$zone")
[[ -n "$project" ]] && common+=(--project "$project")
run() {
  if [[ -n "$dry" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
quoted_args=""
for arg in "$config" "$workdir" "$@"; do quoted_args+=" $(printf '%q' "$arg")"; done

if [[ -n "$dry" && -n "$type" ]] || { [[ -z "$dry" ]] && ! gcloud compute tpus tpu-vm describe "$name" "${common[@]}" >/dev/null 2>&1; }; then
  if [[ -z "$type" ]]; then
    echo "slice $name does not exist in $zone: pass --accelerator-type (e.g. v5p-64) to create it" >&2; exit 2
  fi
  run gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type "$type" --version "$version" $spot
fi
if [[ -n "$repo" ]]; then
  run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command \
    "rm -rf ~/flowar_jax && git clone --depth 1 --branch $(printf '%q' "$ref") $(printf '%q' "$repo") ~/flowar_jax"
else
  archive="$(mktemp -d)/flowar_jax.tar.gz"
  if [[ -z "$dry" ]]; then
    (cd "$root" && git ls-files -z --cached --others --exclude-standard |
       tar -czf "$archive" --null --ignore-failed-read -T -)
  fi
  run gcloud compute tpus tpu-vm scp "$archive" "$name:flowar_jax.tar.gz" "${common[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command \
    "mkdir -p ~/flowar_jax && tar -xzf ~/flowar_jax.tar.gz -C ~/flowar_jax"
fi
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command \
  "bash ~/flowar_jax/launch/tpu_bootstrap.sh$quoted_args"
