"""The small job that the fault tests compare against: run once uninterrupted, then broken in various ways."""

from __future__ import annotations

import pytest

from asyppo.cluster.metrics import read_metrics

JOB = [
    "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "learner.mini_batch_size=16",
    "learner.micro_batch_size=8", "critics.micro_batch_size=32", "data.eval_size=32", "trainer.steps=4",
    "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.call_timeout_s=180", "weight_sync.timeout_s=60",
    "logging.wandb_mode=offline", "logging.console=false",
]
# Sync mode reproduces the uninterrupted run to float32 round-off; 1e-6 relative is the bar.
TOLERANCE = 1e-6
# Numbers that legitimately differ between a faulted run and the reference, besides timings: the restart count, the
# cluster's node count (a run may lose or gain nodes), and the transport figures of the weight broadcast, absent in a
# step whose broadcast a dying rollout worker failed (the weights then went through the object store).
NOT_COMPARED = ("actor_restarts", "cluster_nodes", "rollout_workers", "weight_sync_bytes", "weight_sync_gb_per_s",
                "weight_sync_num_buckets")


def is_timing(key: str) -> bool:
    return key.startswith("time_") or "per_s" in key or key.endswith("seconds")


def assert_same_run(reference_dir, run_dir, *, steps: int | None = None, tolerance: float = TOLERANCE,
                    abs_tolerance: float = 1e-9) -> None:
    """Every step logged once, and every non-timing number of metrics.jsonl and eval.jsonl equal to the reference's
    (within ``tolerance`` relative or ``abs_tolerance``); with ``steps``, the two runs' first ``steps`` steps are compared
    (and their evaluations before and after those steps, which a run evaluates alike whether it ends there or not)."""
    for name in ("metrics.jsonl", "eval.jsonl"):
        expected = read_metrics(reference_dir / name)
        if steps is not None:
            expected = [line for line in expected if line["step"] < steps]
        got = read_metrics(run_dir / name)
        if steps is not None:
            got = [line for line in got if line["step"] < steps]
        assert [line["step"] for line in got] == [line["step"] for line in expected], name  # each step once
        for want, have in zip(expected, got):
            for key, value in want.items():
                if not is_timing(key) and key not in NOT_COMPARED:
                    # NaN (a diagnostic with nothing to measure, e.g. σ flat at step 0) must be NaN in both.
                    expected_value = pytest.approx(value, rel=tolerance, abs=abs_tolerance, nan_ok=True)
                    assert have[key] == expected_value, (name, want["step"], key)
