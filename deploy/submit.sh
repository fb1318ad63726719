#!/usr/bin/env bash
# Submit `asyppo train` to a running Ray cluster through Ray's job API, using deploy/runtime_env.yaml (source tree
# as working_dir, vLLM/NCCL settings) plus W&B variables taken from your shell, and, when asyppo is importable by
# $PYTHON, a copy of it as the job's py_modules so the cluster runs your local code (else the asyppo installed in
# the cluster's image runs).
# `asyppo submit` does the same from the asyppo CLI; this script needs only Ray (and PyYAML, which Ray installs).
#
# Usage: deploy/submit.sh [--address URL] [--no-wait] [--] [asyppo train arguments ...]
#   deploy/submit.sh --config deploy/configs/cluster-5gpu.yaml trainer.steps=50
#   WANDB_API_KEY=... deploy/submit.sh --address http://127.0.0.1:8265 --config deploy/configs/cluster-5gpu.yaml
#   deploy/submit.sh --no-wait --config deploy/configs/cluster-5gpu.yaml trainer.name=qwen3-1.7b-asyppo --resume
# URL is the dashboard's address (port 8265), default $RAY_ADDRESS or http://127.0.0.1:8265.
#
# Each argument reaches `asyppo train` on the cluster unchanged, as one argument: the job's command line is
# built with Python's shlex.join (the cluster runs it through /bin/sh), never by pasting "$*" together, so
# spaces, quotes, `;`, `$(...)` in a value are data, not shell syntax.
#
# Environment:
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / RAY_AUTH_MODE  the cluster's token when it runs with token
#       authentication (the KubeRay manifests do). Setting RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, a file holding
#       it) is enough: this script then sets RAY_AUTH_MODE=token, which Ray's client needs before it sends the
#       token. With RAY_AUTH_MODE=token alone, Ray reads ~/.ray/auth_token. The token is sent in a header of
#       each request, never put in the job's runtime env.
#   WANDB_API_KEY, WANDB_ENTITY, WANDB_BASE_URL, WANDB_MODE  forwarded to the job when set, as by `asyppo submit` (note: the dashboard shows a job's
#       runtime env, so on a shared cluster prefer a secret set on the nodes).
#   PYTHON  the interpreter that submits (default python3); it needs `ray[default]` (same version as the cluster).
set -euo pipefail

die() { echo "submit.sh: $*" >&2; exit 2; }

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
wait_for_job=1
while (($#)); do
  case "$1" in
    --address) (($# >= 2)) || die "--address needs a value"; address="$2"; shift 2 ;;
    --address=*) address="${1#*=}"; shift ;;
    --no-wait) wait_for_job=0; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ "$address" == http://* || "$address" == https://* ]] \
  || die "the address must be the dashboard URL, e.g. http://HEAD:8265 (got '$address')"
python="${PYTHON:-python3}"
command -v "$python" > /dev/null || die "'$python' is not on PATH; set PYTHON to a Python with ray[default]"

# Ray's client sends the token only in token mode; a token given without the mode would be silently unused.
if [[ -z "${RAY_AUTH_MODE:-}" && ( -n "${RAY_AUTH_TOKEN:-}" || -n "${RAY_AUTH_TOKEN_PATH:-}" ) ]]; then
  export RAY_AUTH_MODE=token
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"   # runtime_env.yaml's working_dir "." and relative --config paths mean the repository root

# Fail here rather than on the cluster when the config is wrong (skipped if asyppo is not installed locally).
if command -v asyppo > /dev/null; then
  config_args=()
  for arg in "$@"; do [[ "$arg" == --resume ]] || config_args+=("$arg"); done
  asyppo config ${config_args[@]+"${config_args[@]}"} > /dev/null
fi

staging_dir="$(mktemp -d -t asyppo-submit.XXXXXX)"
trap 'rm -rf "$staging_dir"' EXIT
# The arguments travel as Python's argv (no shell in between) and become the entrypoint with shlex.join.
"$python" - "$address" "$wait_for_job" "$repo_root/deploy/runtime_env.yaml" "$staging_dir" "$@" <<'PY'
import asyncio
import os
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

try:
    import yaml
    from ray.job_submission import JobStatus, JobSubmissionClient
except ImportError as error:
    sys.exit(f"submit.sh: {error}; set PYTHON to a Python with ray[default] (the cluster's Ray version)")

address, wait_for_job, source, staging, *train_args = sys.argv[1:]
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
# The same list as asyppo.cluster.cli.FORWARDED_ENV_VARS (tests/unit/test_deploy.py checks it).
for name in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_BASE_URL", "WANDB_MODE"):
    if os.environ.get(name):
        env_vars[name] = os.environ[name]

if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
    host = urlsplit(address).hostname or ""
    if address.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"submit.sh: warning: the token goes to {host} unencrypted (http); prefer `kubectl port-forward` "
              "or `ray dashboard` and http://127.0.0.1:8265, or an https address", file=sys.stderr)

entrypoint = shlex.join(["asyppo", "train", *train_args])
print(f"submitting to {address}: {entrypoint}", file=sys.stderr)
client = JobSubmissionClient(address)
job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
print(job_id)
if wait_for_job != "1":
    print(f"submit.sh: follow it with `ray job logs --address {address} --follow {job_id}`", file=sys.stderr)
    sys.exit(0)


async def follow() -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


try:
    asyncio.run(follow())
except KeyboardInterrupt:
    print(f"\nsubmit.sh: stopped following; the job goes on (`ray job stop --address {address} {job_id}` ends it)",
          file=sys.stderr)
    sys.exit(130)
status = client.get_job_status(job_id)
print(f"submit.sh: job {job_id}: {status}", file=sys.stderr)
sys.exit(0 if status == JobStatus.SUCCEEDED else 1)
PY
