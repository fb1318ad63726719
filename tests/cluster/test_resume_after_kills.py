"""Faithful resume (docs/reliability.md): a driver killed with SIGKILL between checkpoints and then resumed gives
the run that would have happened, with each step logged once, the first start's base accuracy, and a config that
would make it a different run refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asyppo.common.config import ConfigError, build_config
from asyppo.cluster.driver import Trainer, train
from tests.reference_run import JOB, assert_same_run

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
