"""What a resume may change, and the metrics files it continues (docs/reliability.md); the kills and the resumed
runs themselves are in tests/cluster/test_resume_after_kills.py."""

from __future__ import annotations

import json
import math


from asyppo.common.config import build_config, resume_changes
from asyppo.cluster.metrics import MetricsSink, keep_steps_before, read_metrics
from tests.reference_run import JOB

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


def test_a_resume_with_another_number_of_learner_ranks_is_refused_at_zero_1_and_above():
    """DeepSpeed loads a ZeRO ≥ 1 optimizer state only into as many ranks as saved it; ZeRO-0 keeps it whole."""
    for field in ("learner.num_gpus", "learner.ranks"):  # on GPU, on CPU
        two_ranks = [f"{field}=2", "learner.micro_batch_size=8"]  # micro-batch × ranks divides the mini-batch
        for stage in (1, 2, 3):
            base = build_config(overrides=[*JOB, f"learner.zero_stage={stage}"])
            [(path, reason)] = resume_changes(base, build_config(overrides=[*JOB, f"learner.zero_stage={stage}",
                                                                            *two_ranks]))
            assert path == field and f"learner.zero_stage={stage}" in reason and "had 1 learner rank" in reason
        base = build_config(overrides=JOB)  # ZeRO-0
        assert resume_changes(base, build_config(overrides=[*JOB, *two_ranks])) == []
