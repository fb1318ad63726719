"""The `asyppo` command as a user runs it: bad input is reported before anything starts."""

import shutil
import subprocess
import sys

import pytest
import yaml

ASYPPO = shutil.which("asyppo") or f"{sys.executable} -m asyppo.cluster.cli"


def run(*args, timeout=120):
    return subprocess.run([*ASYPPO.split(), *args], capture_output=True, text=True, timeout=timeout)


def test_config_prints_the_resolved_config():
    result = run("config", "preset=gppo-erc", "rollout.num_workers=2")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["algorithm"]["clip_mode"] == "gppo" and resolved["rollout"]["num_workers"] == 2
    assert resolved["algorithm"]["erc_band"] == [0.95, 1.05]


@pytest.mark.parametrize("command", ["config", "train"])
def test_a_bad_config_names_the_field_and_exits_2(command, tmp_path):
    result = run(command, "critics.num_critics=1", f"trainer.run_dir={tmp_path}")
    assert result.returncode == 2
    assert "critics.num_critics: advantage mask k>0 needs at least 2 critics, got 1" in result.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written for an invalid job"


def test_a_bad_dataset_row_is_reported_before_any_actor_starts(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1=", "answer": "2"}\n{"question": "2+2="}\n')
    result = run("train", f"data.train={data}", "data.eval=null", f"trainer.run_dir={tmp_path / 'runs'}")
    assert result.returncode == 1
    assert str(data) in result.stderr and "line 2" in result.stderr and "answer" in result.stderr
    assert "Started a local Ray instance" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists()



def test_eval_with_a_reward_function_that_does_not_import_says_so_in_one_line(tmp_path):
    """`asyppo eval` runs training's reward check before any actor starts (not a traceback from a rollout worker)."""
    result = run("eval", "--checkpoint", str(tmp_path), "reward.function=no_such_module_here:score",
                 "data.eval_size=4")
    assert result.returncode == 2, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "reward.function" in line]
    assert "no_such_module_here" in line
    assert "Traceback" not in result.stderr and "Started a local Ray instance" not in result.stderr
