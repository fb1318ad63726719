"""Faithful resume (docs/reliability.md): a driver killed with SIGKILL between checkpoints and then resumed gives
the run that would have happened, with each step logged once, the first start's base accuracy, and a config that
would make it a different run refused."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asyppo.common.config import ConfigError, build_config, resume_changes
from asyppo.cluster.driver import Trainer, train
from asyppo.cluster.metrics import MetricsSink, keep_steps_before, read_metrics
from tests.reference_run import JOB, assert_same_run

def test_resume_refuses_a_different_run_and_allows_safe_changes():
    base = build_config(overrides=JOB)
    assert resume_changes(base, build_config(overrides=[*JOB, "trainer.steps=40", "logging.wandb_mode=disabled",
                                                        "trainer.call_timeout_s=60", "rollout.num_workers=2"])) == []
    changes = resume_changes(base, build_config(overrides=[*JOB, "algorithm.clip_high=0.3", "data.eval_size=16",
                                                           "model.policy=/elsewhere", "trainer.steps=9"]))
    assert [path for path, _ in changes] == ["algorithm.clip_high", "data.eval_size", "model.policy"]
    assert "was 0.28 in the run being resumed, now 0.3" in changes[0][1]
    # A cosine schedule decays over trainer.steps: running longer would change every later step's learning rate.
    cosine = build_config(overrides=[*JOB, "critics.lr_schedule=cosine"])
    [(path, reason)] = resume_changes(cosine, build_config(overrides=[*JOB, "critics.lr_schedule=cosine",
                                                                     "trainer.steps=40"]))
    assert path == "trainer.steps" and "critics.lr_schedule=cosine decays over trainer.steps" in reason


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(6)) + '{"step": 6, "x"')
    keep_steps_before(path, 3)
    assert [record["step"] for record in read_metrics(path)] == [0, 1, 2]
    keep_steps_before(tmp_path / "absent.jsonl", 3)  # nothing to cut is fine
    assert not (tmp_path / "absent.jsonl").exists()


def test_a_resumed_run_is_a_new_wandb_run_in_the_same_group(tmp_path):
    cfg = build_config(overrides=[*JOB, f"trainer.run_dir={tmp_path}"])
    run_path = tmp_path / "run"
    run_path.mkdir()
    first = MetricsSink(cfg, run_path, resumed=False, total_steps=4, start_step=0)
    first.log(0, {"reward_mean": 0.5})
    first_id, first_group = first._wandb.id, first._wandb.group
    first.close()
    second = MetricsSink(cfg, run_path, resumed=True, total_steps=4, start_step=2)
    second.log(2, {"reward_mean": 0.6})
    assert second._wandb.group == first_group == cfg.trainer.name
    assert second._wandb.id != first_id and second._wandb.name.endswith("from-step-2")
    second.close()
    assert (run_path / "wandb_runs").read_text().split() == [first_id, second._wandb.id]


def test_metrics_files_are_strict_json_and_a_nan_reads_back_as_nan(tmp_path):
    """A diagnostic with nothing to measure is NaN (σ flat at step 0); the JSONL files must still parse under strict
    JSON (jq, JavaScript), so it is written as null, and read_metrics gives the NaN back."""
    cfg = build_config(overrides=[*JOB, f"trainer.run_dir={tmp_path}", "logging.wandb_mode=disabled"])
    run_path = tmp_path / "run"
    run_path.mkdir()
    sink = MetricsSink(cfg, run_path, resumed=False, total_steps=2, start_step=0)
    sink.log(0, {"reward_mean": 0.5, "sigma_error_spearman": float("nan"), "grad_norm": float("inf")})
    sink.log_event(0, {"eval_accuracy": 0.25, "eval_accuracy_greedy": float("nan")})
    sink.close()

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    for name in ("metrics.jsonl", "eval.jsonl"):
        for line in (run_path / name).read_text().splitlines():
            json.loads(line, parse_constant=refuse)
    [line] = read_metrics(run_path / "metrics.jsonl")
    assert line["reward_mean"] == 0.5 and line["step"] == 0
    assert math.isnan(line["sigma_error_spearman"]) and math.isnan(line["grad_norm"])
    [evaluation] = read_metrics(run_path / "eval.jsonl")
    assert evaluation["eval_accuracy"] == 0.25 and math.isnan(evaluation["eval_accuracy_greedy"])


@pytest.mark.cluster
def test_sigkill_between_checkpoints_then_resume_reproduces_the_run(tmp_path, reference_run):
    reference, reference_dir = reference_run
    killed_overrides = [*JOB, f"trainer.run_dir={tmp_path}", "trainer.name=killed"]
    run_path = tmp_path / "killed"

    driver = subprocess.Popen([sys.executable, "-m", "asyppo.cluster.cli", "train", *killed_overrides],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        # The checkpoint of step 1 committed (its manifest is written last): the kill lands in step 2 or 3, before
        # step 3's checkpoint. (Waiting for step 2's metrics line instead left only step 3's ~1 s as the window.)
        while not (run_path / "checkpoints" / "step-1" / "manifest.json").exists():
            assert driver.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "the driver never reached its first checkpoint"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        _kill_group(driver)
    assert not (run_path / "checkpoints" / "step-3").exists()

    # A config that would make it another run is refused before any actor starts.
    with pytest.raises(ConfigError, match="algorithm.clip_high"):
        Trainer(build_config(overrides=[*killed_overrides, "algorithm.clip_high=0.3"]), resume=True)

    resumed = train(build_config(overrides=killed_overrides), resume=True)
    assert resumed["base_accuracy"] == reference["base_accuracy"]
    assert resumed["final_accuracy"] == reference["final_accuracy"]
    assert_same_run(reference_dir, run_path)


def _lines(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _kill_group(process: subprocess.Popen) -> None:
    """Whatever the killed driver left running (its embedded Ray) goes too."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.cluster
def test_sigterm_finishes_the_step_saves_a_checkpoint_and_exits_with_the_resume_command(tmp_path):
    from asyppo.cluster.checkpoint import verify

    overrides = [*JOB, f"trainer.run_dir={tmp_path}", "trainer.name=stopped", "trainer.steps=8",
                 "trainer.checkpoint_every=0", "trainer.eval_every=0"]  # no checkpoint before the last step
    run_path = tmp_path / "stopped"
    driver = subprocess.Popen([sys.executable, "-m", "asyppo.cluster.cli", "train", *overrides],
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not _lines(run_path / "metrics.jsonl"):
            assert driver.poll() is None and time.monotonic() < deadline, "the driver never finished a step"
            time.sleep(0.2)
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=300)
    finally:
        _kill_group(driver)
    assert driver.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    last = _lines(run_path / "metrics.jsonl")[-1]["step"]
    assert last < 7
    checkpoint = run_path / "checkpoints" / f"step-{last}"
    assert verify(checkpoint) == []  # complete: every file matches the manifest
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == last
    final_line = stderr.strip().splitlines()[-1]
    assert final_line.startswith(f"asyppo: stopped by SIGTERM after step {last}; checkpoint saved; resume with: "
                                 f"asyppo train --config {run_path / 'config.yaml'} --resume"), final_line
    assert "*** SIGTERM received" not in stderr and "Traceback" not in stderr  # no Ray stack dump
