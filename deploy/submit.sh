#!/usr/bin/env bash
# Submit `asyppo train` to a running Ray cluster with plain `ray job submit`, using deploy/runtime_env.yaml
# (source tree as working_dir, vLLM/NCCL settings) plus W&B variables taken from your shell, and, when asyppo is
# importable by $PYTHON, a copy of it as the job's py_modules so the cluster runs your local code (else the asyppo
# installed in the cluster's image runs).
# `asyppo submit` does the same from Python; this script is the raw Ray form.
#
# Usage: deploy/submit.sh [--address URL] [--no-wait] [--] [asyppo train arguments ...]
#   deploy/submit.sh --config deploy/configs/cluster-5gpu.yaml trainer.steps=50
#   WANDB_API_KEY=... deploy/submit.sh --address http://127.0.0.1:8265 --config deploy/configs/cluster-5gpu.yaml
#   deploy/submit.sh --no-wait --config deploy/configs/cluster-5gpu.yaml trainer.name=qwen3-1.7b-asyppo --resume
# URL is the dashboard's address (port 8265), default $RAY_ADDRESS or http://127.0.0.1:8265.
# Environment: WANDB_API_KEY, WANDB_ENTITY, WANDB_BASE_URL are forwarded when set (note: the dashboard shows a
# job's runtime env, so on a shared cluster prefer a secret set on the nodes); PYTHON picks the interpreter
# used to read the YAML (default python3; it needs PyYAML, which Ray installs).
set -euo pipefail

die() { echo "submit.sh: $*" >&2; exit 2; }

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
submit_flags=()
while (($#)); do
  case "$1" in
    --address) (($# >= 2)) || die "--address needs a value"; address="$2"; shift 2 ;;
    --address=*) address="${1#*=}"; shift ;;
    --no-wait) submit_flags+=(--no-wait); shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ "$address" == http://* || "$address" == https://* ]] \
  || die "the address must be the dashboard URL, e.g. http://HEAD:8265 (got '$address')"
command -v ray > /dev/null || die "the 'ray' command is not on PATH; install ray[default] (same version as the cluster)"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"   # runtime_env.yaml's working_dir "." and relative --config paths mean the repository root

# Fail here rather than on the cluster when the config is wrong (skipped if asyppo is not installed locally).
if command -v asyppo > /dev/null; then
  config_args=()
  for arg in "$@"; do [[ "$arg" == --resume ]] || config_args+=("$arg"); done
  asyppo config ${config_args[@]+"${config_args[@]}"} > /dev/null
fi

# mktemp creates the file readable by its owner only; it may hold WANDB_API_KEY.
runtime_env_file="$(mktemp -t asyppo-runtime-env.XXXXXX)"
staging_dir="$(mktemp -d -t asyppo-submit.XXXXXX)"
trap 'rm -rf "$runtime_env_file" "$staging_dir"' EXIT
"${PYTHON:-python3}" - "$repo_root/deploy/runtime_env.yaml" "$runtime_env_file" "$staging_dir" <<'PY' \
  || die "could not write the runtime env (needs a Python with PyYAML; set PYTHON=...)"
import os
import sys
from pathlib import Path

import yaml

source, target, staging = sys.argv[1:]
with open(source, encoding="utf-8") as handle:
    runtime_env = yaml.safe_load(handle) or {}
try:
    from asyppo.cluster.cli import stage_package
except ImportError:
    print("submit.sh: asyppo is not importable here; the cluster runs the asyppo installed in its image",
          file=sys.stderr)
else:
    runtime_env["py_modules"] = [str(stage_package(Path(staging)))]
env_vars = runtime_env.setdefault("env_vars", {})
for name in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_BASE_URL"):
    if os.environ.get(name):
        env_vars[name] = os.environ[name]
with open(target, "w", encoding="utf-8") as handle:
    yaml.safe_dump(runtime_env, handle)
PY

echo "submitting to $address: asyppo train $*" >&2
ray job submit --address "$address" --runtime-env "$runtime_env_file" ${submit_flags[@]+"${submit_flags[@]}"} \
  -- asyppo train "$@"
