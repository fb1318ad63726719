"""Benchmarks are not timed tests: here each script runs a smoke-sized job, and what it writes is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

SMALL = ["rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "learner.mini_batch_size=16",
         "learner.micro_batch_size=16", "critics.micro_batch_size=32", "data.eval_size=32"]


@pytest.mark.cluster
def test_learning_grid_smoke_run_then_resume_and_the_step_breakdown_of_its_record(tmp_path):
    """One real 2-step job through benchmarks/learning.py (the resumable loop that bench_steps.py shares), then
    bench_steps.py's breakdown and projection computed from that job's record."""
    grid = tmp_path / "grid"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "learning.py"), "critic-warmup", "--steps", "2",
               "--seeds", "0", "--variants", "skip-masks", "--out", str(grid), "--set", *SMALL]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "1 run(s) to do" in first.stdout

    record = json.loads((grid / "skip-masks" / "seed-0.json").read_text())
    assert record["steps"] == 2 and record["seed"] == 0
    assert all(len(values) == 2 for values in record["per_step"].values())
    assert [point["step"] for point in record["eval"]][-1] == 1
    assert record["final_accuracy"] == record["eval"][-1]["accuracy"]
    summary = json.loads((grid / "summary.json").read_text())
    gain = summary["variants"]["skip-masks"]["gain"]["mean"]
    assert gain == pytest.approx(record["final_accuracy"] - record["base_accuracy"])
    assert (grid / "curves.png").stat().st_size > 0 and "| skip-masks | 1 |" in (grid / "summary.md").read_text()
    assert (grid / "mechanisms.png").stat().st_size > 0 and "tokens ERC keeps" in (grid / "summary.md").read_text()

    # A run whose result file exists is not run again.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert again.returncode == 0 and "0 run(s) to do, 1 already there" in again.stdout, again.stdout + again.stderr

    # bench_steps.py on that record as its sync run: the remainder is the step minus its sequential phases, over the
    # steps after the first.
    steps = tmp_path / "steps"
    (steps / "sync").mkdir(parents=True)
    (steps / "sync" / "seed-0.json").write_text(json.dumps(record))
    stdout = _run_script("bench_steps.py", "--summary-only", "--out", str(steps))
    breakdown = json.loads((steps / "summary.json").read_text())
    per_step = record["per_step"]
    expected = per_step["time_step"][1] - sum(
        per_step[key][1] for key in ("time_rollout", "time_values", "time_critic_train", "time_weight_sync"))
    assert breakdown["breakdown_sync"]["orchestration"] == pytest.approx(expected)
    assert set(breakdown["projection"]["seconds_target"]) == {"rollout", "learner", "critics"}
    assert "orchestration remainder" in stdout


def _run_script(name: str, *args: str, timeout: int = 900) -> str:
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / name), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.cluster
def test_rollout_benchmark_smoke(tmp_path):
    out = tmp_path / "rollout.json"
    stdout = _run_script("bench_rollout.py", "--task", "arithmetic", "--prompts", "4", "--samples", "2",
                         "--repeats", "1", "--rounds", "1", "--output", str(out))
    result = json.loads(out.read_text())
    # Same seeds on both engines: the same tokens were generated, and the ratio is the tokens/s ratio.
    assert result["generated_tokens"] >= 4 * 2
    assert result["ratio_rollout_worker_to_plain"] == pytest.approx(
        result["plain"]["median_s"] / result["rollout_worker"]["median_s"])
    worker = result["rollout_worker"]
    assert 0 < worker["engine_median_s"] <= worker["median_s"]
    assert "ratio rollout_worker / plain" in stdout


@pytest.mark.cluster
def test_weight_sync_benchmark_smoke(tmp_path):
    out = tmp_path / "sync.json"
    _run_script("bench_weight_sync.py", "--sizes", "10M", "--repeats", "1", "--output", str(out))
    (row,) = json.loads(out.read_text())["results"]
    # Each path's weights were checked against the learner model after its measurement.
    assert max(row["max_logprob_gap"].values()) <= 1e-3
    assert row["fraction_of_raw"] == pytest.approx(row["raw_median_s"] / row["process_group_median_s"])
    assert row["raw_s_per_gb"] == pytest.approx(row["raw_median_s"] / (row["bytes"] / 1e9))


def test_logprobs_benchmark_smoke(tmp_path):
    out = tmp_path / "logprobs.json"
    _run_script("bench_logprobs.py", "--size", "2", "64", "512", "--hidden", "32", "--chunk-size", "16",
                "--output", str(out), timeout=300)
    report = json.loads(out.read_text())
    assert {row["variant"] for row in report["measurements"]} == {"naive", "chunked"}
    (comparison,) = report["comparisons"]
    assert comparison["full_logits_mib"] == pytest.approx(2 * 64 * 512 * 4 / 2**20)


@pytest.mark.cluster
def test_trl_benchmark_smoke(tmp_path):
    pytest.importorskip("trl", reason="TRL is a benchmark-only extra (pip install -e '.[bench]')")
    out = tmp_path / "trl.json"
    _run_script("bench_trl.py", "--steps", "2", "--prompts", "8", "--samples", "4", "--output", str(out))
    result = json.loads(out.read_text())
    # 2 rollout batches of 8 × 4 = 32 responses, each in the workload's 4 optimizer steps (of 8 responses).
    assert (result["prompts"], result["samples"], result["mini_batch"]) == (8, 4, 8)
    assert result["trl_optimizer_steps"] == 8
    assert result["rows"]["asyppo (grpo preset)"]["generated_tokens"] >= 2 * 32
    assert all(row["generated_tokens"] > 0 for row in result["rows"].values())


def test_critic_fit_benchmark_smoke(tmp_path):
    out = tmp_path / "fit.json"
    # The arithmetic task: its built-in models are the default job's (the chain task's take minutes to bootstrap).
    _run_script("critic_fit.py", "--task", "arithmetic", "--steps", "2", "--train-prompts", "8", "--test-prompts",
                "8", "--lrs", "1e-3", "--backbones", "critic", "--out", str(out), timeout=600)
    result = json.loads(out.read_text())
    assert result["train_responses"] == 8 * 8 and result["test_responses"] == 8 * 8
    # The value head starts at zero, so V ≡ 0 before the first step: explained variance exactly 0.
    for fit in [*result["fits"], *result["positive_controls"]]:
        assert fit["curve"][0]["step"] == 0 and fit["curve"][0]["test_explained_var"] == pytest.approx(0.0, abs=1e-12)
    assert [fit["target"] for fit in result["fits"]] == ["returns"] and len(result["positive_controls"]) == 1
    assert set(result["references"]) == {"prompt-oracle"}


def test_critic_fit_on_the_pretrained_model_smoke(tmp_path):
    """The pretrained mini-critic study (--task words): SmolLM2's rollouts through its chat template, an ensemble of
    two critics cut to 2 layers, each on its own prompt shard, scored on the held-out rollouts."""
    from transformers import AutoTokenizer

    from asyppo.critics.sharding import prompt_shard

    out = tmp_path / "words"
    _run_script("critic_fit.py", "--task", "words", "--shapes", "pretrained-2", "--critics", "2", "--train-prompts",
                "6", "--test-prompts", "3", "--samples", "2", "--steps", "2", "--batch-size", "4", "--out", str(out),
                timeout=600)
    rollouts = json.loads((out / "rollouts.json").read_text())
    assert (len(rollouts["train"]), len(rollouts["test"])) == (12, 6)
    assert not {row["problem"] for row in rollouts["train"]} & {row["problem"] for row in rollouts["test"]}
    assert {prompt_shard(row["problem_id"], 2) for row in rollouts["train"]} == {0, 1}  # each critic has data
    tokenizer = AutoTokenizer.from_pretrained(rollouts["model"])
    for row in rollouts["train"]:  # asked through the chat template, answered within the limit, scored 0 or 1
        assert tokenizer.decode(row["prompt_ids"]).endswith(f"{row['problem']}<|im_end|>\n<|im_start|>assistant\n")
        assert len(row["response_ids"]) <= 16 and row["reward"] in (0.0, 1.0)
    (shape,) = json.loads((out / "summary.json").read_text())["shapes"]
    assert shape["shape"] == "pretrained-2" and len(shape["critic_explained_var"]) == 2
    # Two critics trained on different shards disagree, and what is reported of them is finite.
    assert shape["sigma_p90"] > 0 and shape["train_ms_per_token"] > 0 and shape["peak_rss_gib"] > 0
    assert "| 2 × pretrained-2 |" in (out / "summary.md").read_text()


def test_gpu_benchmark_smoke(tmp_path):
    """bench_gpu.py's code paths at tiny sizes on the CPU (its measurements need a GPU: benchmarks/results/gpu.json)."""
    out = tmp_path / "gpu.json"
    _run_script("bench_gpu.py", "--smoke", "--output", str(out), timeout=600)
    result = json.loads(out.read_text())
    stage = result["bf16"]["stages"]["0"]
    # Without a GPU both learners run float32: the same step twice, so the comparison must find no difference.
    assert stage["logp_abs_diff_max"] == 0.0 and stage["update_norm_ratio"] == pytest.approx(1.0)
    assert stage["resume_exact"] is True
    costs = result["costs"]
    assert costs["learner_update"]["optimizer_steps"] == 1.0 and costs["critic_train"]["skipped_steps"] == 0.0
    assert costs["sequence_tokens"] == 2 * (8 + 16)


@pytest.mark.cluster
def test_role_memory_benchmark_smoke(tmp_path):
    out = tmp_path / "memory.json"
    stdout = _run_script("role_memory.py", "--config", "default", "--steps", "1", "--interval", "0.2",
                         "--output", str(out), *SMALL, "critics.num_critics=2", timeout=600)
    result = json.loads(out.read_text())
    assert result["config"] == "default" and result["steps"] == 1
    # Every actor of the job was seen, each holding at least a Python process with torch (far over 100 MiB); the
    # sum of its processes' own peaks bounds the largest sum seen at one look.
    assert sorted(row["actor"] for row in result["actors"]) == ["critic-0", "critic-1", "learner-0", "rollout-0"]
    for row in result["actors"]:
        assert row["processes"] >= 1 and 0.1 < row["peak_rss_gib"] <= row["peak_hwm_gib"] + 0.01, row
    assert "| learner-0 | " in stdout
