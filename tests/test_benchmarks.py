"""Benchmarks are not timed tests: here each script runs a smoke-sized job, and what it writes is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from asyppo.cluster.config import build_config

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import learning  # noqa: E402

SMALL = ["rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "learner.mini_batch_size=16",
         "learner.micro_batch_size=16", "critics.micro_batch_size=32", "data.eval_size=32"]


@pytest.mark.parametrize("experiment", sorted(learning.EXPERIMENTS))
def test_every_variant_of_every_experiment_is_a_valid_job(experiment):
    spec = learning.EXPERIMENTS[experiment]
    for overrides in spec.variants.values():
        build_config(overrides=[*spec.common, *overrides])  # raises ConfigError naming the field


@pytest.mark.cluster
def test_learning_grid_smoke_run_then_resume(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "learning.py"), "critic-warmup", "--steps", "2",
               "--seeds", "0", "--variants", "skip-masks", "--out", str(tmp_path), "--set", *SMALL]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "1 run(s) to do" in first.stdout

    record = json.loads((tmp_path / "skip-masks" / "seed-0.json").read_text())
    assert record["steps"] == 2 and record["seed"] == 0
    assert all(len(values) == 2 for values in record["per_step"].values())
    assert [point["step"] for point in record["eval"]][-1] == 1
    assert record["final_accuracy"] == record["eval"][-1]["accuracy"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    gain = summary["variants"]["skip-masks"]["gain"]["mean"]
    assert gain == pytest.approx(record["final_accuracy"] - record["base_accuracy"])
    assert (tmp_path / "curves.png").stat().st_size > 0 and "| skip-masks | 1 |" in (tmp_path / "summary.md").read_text()

    # A run whose result file exists is not run again.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert again.returncode == 0 and "0 run(s) to do, 1 already there" in again.stdout, again.stdout + again.stderr
