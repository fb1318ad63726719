"""The held-out numbers (docs/monitoring.md, "Evaluation") against hand-counted verdicts."""

from __future__ import annotations

import pytest
import torch

from asyppo.cluster.evaluation import evaluate_sets, evaluation_metrics
from asyppo.cluster.metrics import describe_evaluation


def outputs(*verdicts: list[bool]) -> list[dict]:
    """Rollout outputs as the workers return them, one per worker, rows prompt-major."""
    return [{"correct": torch.tensor(rows, dtype=torch.bool)} for rows in verdicts]


def test_avg_and_pass_at_k_over_workers():
    # 3 problems × k=2 samples, split over 2 workers (problem 0 on the first, problems 1-2 on the second):
    # problem 0: right, wrong; problem 1: wrong, wrong; problem 2: right, right.
    sampled = outputs([True, False], [False, False, True, True])
    greedy = outputs([True], [False, False])
    metrics = evaluation_metrics("", sampled, greedy, k=2)
    assert metrics == {"eval_accuracy": pytest.approx(3 / 6), "eval_pass_at_k": pytest.approx(2 / 3),
                       "eval_accuracy_greedy": pytest.approx(1 / 3), "eval_problems": 3.0, "eval_k": 2.0}
    named = evaluation_metrics("gsm8k", sampled, greedy, k=2)
    assert named["eval_gsm8k_pass_at_k"] == metrics["eval_pass_at_k"] and "eval_accuracy" not in named


def test_with_one_sample_avg_and_pass_agree():
    metrics = evaluation_metrics("", outputs([True, False, True, True]), outputs([False, False, True, True]), k=1)
    assert metrics["eval_accuracy"] == metrics["eval_pass_at_k"] == 0.75 and metrics["eval_accuracy_greedy"] == 0.5


def test_one_console_line_per_set():
    metrics = {**evaluation_metrics("", outputs([True, False]), outputs([True]), k=2),
               **evaluation_metrics("hard", outputs([False]), outputs([False]), k=1), "time_eval": 1.0}
    assert describe_evaluation(7, metrics) == [
        "step 7: held-out accuracy 0.500 sampled (avg@2, pass@2 1.000), 1.000 greedy (1 problems)",
        "step 7: hard accuracy 0.000 sampled, 0.000 greedy (1 problems)",
    ]


def test_every_set_is_launched_before_any_is_collected():
    """The training run and `asyppo eval` share evaluate_sets; its order keeps every engine busy on all sets."""
    events, verdicts = [], {"easy": [True, True], "hard": [False, True]}

    def launch(problems, n, greedy):
        events.append(("launch", problems[0], n, greedy))
        return problems[0], n, greedy

    def collect(launched, name):
        events.append(("collect", name))
        problem, n, _ = launched
        return outputs(verdicts[problem][:1] * n if n == 1 else verdicts[problem])

    metrics = evaluate_sets({"": ["easy"], "hard": ["hard"]}, 2, launch, collect)
    assert [event[0] for event in events] == ["launch"] * 4 + ["collect"] * 4
    assert ("launch", "easy", 2, False) in events and ("launch", "hard", 1, True) in events
    assert metrics["eval_accuracy"] == 1.0 and metrics["eval_hard_accuracy"] == 0.5
    assert metrics["eval_hard_pass_at_k"] == 1.0 and metrics["eval_hard_accuracy_greedy"] == 0.0

