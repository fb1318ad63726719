"""Jobs submitted to a real Ray head (`ray start` with token authentication, as the deploy files run it) keep their results
where the log says, and the usual mistakes end in one line (docs/deploy.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from asyppo.common.network import LOOPBACK, free_port

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
# The built-in job, small enough for a 2-CPU head (its 3 requested CPUs are fitted to the 2 there).
SMALL = ["trainer.steps=2", "trainer.eval_every=0", "data.eval_size=32", "rollout.prompts_per_step=8",
         "rollout.samples_per_prompt=4", "learner.mini_batch_size=16", "learner.micro_batch_size=16",
         "logging.wandb_mode=offline", "trainer.call_timeout_s=300"]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A 2-CPU Ray head with its own HOME (its token) and temp dir (so no other test's ray.init() finds it)."""
    home = tmp_path_factory.mktemp("home")
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths must stay short
    dashboard = free_port(LOOPBACK)
    # What is built once per machine stays where the other tests built it, not in the new HOME: the built-in models,
    # DeepSpeed's compiled shared-memory op (a minute to compile again) and vLLM's record of each model class (an
    # inspection in a fresh interpreter, ~20 s) all live in the user's cache directory. (TORCH_EXTENSIONS_DIR set to
    # ~/.cache/torch_extensions is not that: torch then drops its per-Python subfolder, and compiles the op again.)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}", "XDG_CACHE_HOME": cache}
    env.pop("RAY_ADDRESS", None)
    # Token authentication, as the deploy files run every cluster (docs/deploy.md); the head keeps the token.
    env["RAY_AUTH_MODE"] = "token"
    generated = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True,
                               text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr
    started = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--num-cpus=2", "--num-gpus=0", f"--port={free_port(LOOPBACK)}",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        token = home / ".ray" / "auth_token"
        assert token.is_file()
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "token": token}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def submit(head, cwd: Path, *args: str, token: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**head["env"], "HOME": str(cwd)}  # the client's own HOME: the token only if given below
    env.pop("RAY_AUTH_MODE")
    if token:
        env["RAY_AUTH_TOKEN_PATH"] = str(head["token"])
    return subprocess.run([str(BIN / "asyppo"), "submit", "--address", head["address"], *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_submitted_job_leaves_its_run_where_the_log_says(head, tmp_path):
    result = submit(head, tmp_path, *SMALL, "trainer.name=submitted")  # trainer.run_dir: the default, "runs"
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run = (tmp_path / "runs" / "submitted").resolve()
    # Said before submitting, and by the job itself, as an absolute location.
    assert f"the job writes its run to {tmp_path.resolve() / 'runs'}" in result.stderr
    assert f"run directory: {run}" in result.stdout
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert (run / "checkpoints" / "step-1" / "policy" / "config.json").is_file()
    # The 2-CPU head could not hold the default 3 CPUs: fitted, said once, not a 120-s wait and a traceback.
    assert "every role's CPU share is scaled by 0.67" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    # A quiet console (docs/monitoring.md): the job's own lines and the progress bar; Ray's, vLLM's, DeepSpeed's and
    # W&B's output is in the run's log files.
    lines = [line for line in result.stdout.replace("\r", "\n").splitlines() if line.strip()]
    progress = [line for line in lines if line.startswith("submitted:")]
    others = [line for line in lines if line not in progress]
    assert progress and "2/2" in progress[-1]
    assert len(others) <= 12, "\n".join(others)  # the default 100-step job adds one line per evaluation to these
    assert any(line.startswith("held-out accuracy:") for line in others)
    assert any("W&B run (offline)" in line for line in others)
    for noise in ("vllm", "deepspeed", "loading weights", "started a local ray instance", "wandb:"):
        assert noise not in result.stdout.lower(), noise
    assert "vllm" in (run / "logs" / "rollout-0.log").read_text().lower()


def test_ray_job_submit_with_a_relative_run_dir_is_refused_in_one_line(head, tmp_path):
    env = {**head["env"], "RAY_AUTH_TOKEN_PATH": str(head["token"])}
    result = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--working-dir", ".", "--",
         "asyppo", "train", *SMALL], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    logs = result.stdout + result.stderr
    assert result.returncode != 0, logs[-3000:]
    assert "asyppo: invalid config:\n  trainer.run_dir: 'runs' is relative" in logs
    assert "runtime_resources" in logs  # where it would have landed
    assert "Traceback" not in logs and not (tmp_path / "runs").exists()


def test_submitting_without_the_token_says_what_to_set(head, tmp_path):
    result = submit(head, tmp_path, *SMALL, token=False, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"asyppo: {head['address']} requires Ray's token authentication: set RAY_AUTH_TOKEN")
    assert "Traceback" not in result.stderr
