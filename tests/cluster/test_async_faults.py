"""Async mode (trainer.max_staleness ≥ 1): generations far longer than the weight broadcast's timeout, and a
rollout worker of several lost (docs/architecture.md, "Asynchronous mode and long generations";
docs/reliability.md)."""

from __future__ import annotations

import logging
import textwrap

import pytest

import asyppo.actors.rollout_worker
import asyppo.cluster.supervisor
from asyppo.cluster.driver import train
from asyppo.cluster.metrics import read_metrics
from asyppo.common.config import build_config
from asyppo.core.seeds import derive_seed
from tests.faults import fails_once
from tests.reference_run import JOB

pytestmark = pytest.mark.cluster


def test_a_worker_of_two_killed_mid_generation_in_async_mode_is_restarted_and_every_step_runs_once(
    tmp_path, monkeypatch, caplog,
):
    """rollout-1 dies as it starts generating step 2's share, which it was given while step 1 trained (weights v1).
    Step 1's broadcast finds it dead: Ray has restarted it and the driver sends it the new weights (v2). Step 2 then
    finds its share missing and has it generated again with v2, while rollout-0's share stays as v1 sampled it: the
    batch mixes versions, counts as v1 (the oldest, within max_staleness) and each token keeps the log-prob of the
    engine that sampled it."""
    seed_of_step_2 = derive_seed(0, "rollout", 2, 0)
    monkeypatch.setattr(asyppo.cluster.supervisor, "RolloutWorker", fails_once(
        asyppo.actors.rollout_worker.RolloutWorker, "generate",
        lambda calls, self, problems, **kw: self.worker_index == 1 and kw["seed"] == seed_of_step_2,
        tmp_path / "rollout-1-died", instance=lambda self: self.worker_index))
    caplog.set_level(logging.WARNING, logger="asyppo")

    summary = train(build_config(overrides=[*JOB, f"trainer.run_dir={tmp_path}", "trainer.name=async-faulted",
                                            "trainer.max_staleness=1", "rollout.num_workers=2",
                                            "trainer.actor_restarts=2"]))

    assert (tmp_path / "rollout-1-died").exists(), "the fault did not happen"
    assert summary["steps"] == 4 and "final_accuracy" in summary
    lines = read_metrics(tmp_path / "async-faulted" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    assert [line["actor_restarts"] for line in lines] == [0, 1, 1, 1]  # noticed at step 1's broadcast
    assert lines[2]["rollout_weight_version"] == 1 and lines[2]["policy_version"] == 3
    assert any("rollout-1 died and Ray restarted it (restart 1 of trainer.actor_restarts=2); it holds the learner's "
               "weights v2" in record.getMessage() for record in caplog.records)


def test_an_async_job_whose_generations_outlast_the_broadcast_timeout_finishes(tmp_path):
    """Every rollout takes about three times weight_sync.timeout_s (a reward that takes 0.2 s a response, 32
    responses), and the next step's rollout is generating while a step trains: the broadcast waits for it before it
    starts, instead of queuing behind it until its own timeout runs out."""
    reward = tmp_path / "slow_reward.py"
    reward.write_text(textwrap.dedent("""
        import time

        def slow_exact_match(prompt, response, answer, row):
            time.sleep(0.2)
            return response.strip() == answer
    """))
    summary = train(build_config(overrides=[
        *JOB, f"trainer.run_dir={tmp_path}", "trainer.name=slow", "trainer.max_staleness=1", "trainer.steps=2",
        "weight_sync.timeout_s=2", f"reward.function={reward}:slow_exact_match", "data.eval_size=4",
    ]))
    assert summary["steps"] == 2
    lines = read_metrics(tmp_path / "slow" / "metrics.jsonl")
    assert [line["rollout_weight_version"] for line in lines] == [0, 0]  # step 1's rollout was in flight
    assert [line["policy_version"] for line in lines] == [1, 2]
    assert all(line["weight_sync_logp_diff"] < 1e-3 for line in lines)  # the weights arrived, and were checked
