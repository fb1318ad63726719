"""Async mode (trainer.max_staleness ≥ 1) as long-reasoning jobs run it: generations far longer than the weight
broadcast's timeout, and a rollout worker of several lost mid-generation (docs/architecture.md, "Asynchronous mode
and long generations"; docs/reliability.md). One job carries both (each actor start costs more than the steps)."""

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


def test_long_generations_and_a_worker_of_two_killed_mid_generation_in_async_mode(tmp_path, monkeypatch, caplog):
    """Every rollout takes over twice weight_sync.timeout_s (a reward that takes 0.25 s a response, 16 responses a
    worker), and the next step's rollout is generating while a step trains: the broadcast waits for it before it
    starts, instead of queuing behind it until its own timeout runs out.

    rollout-1 dies as it starts generating step 2's share, which it was given while step 1 trained (weights v1).
    Step 1's broadcast finds it dead: Ray has restarted it and the driver sends it the new weights (v2). Step 2 then
    finds its share missing and has it generated again with v2, while rollout-0's share stays as v1 sampled it: the
    batch mixes versions, counts as v1 (the oldest, within max_staleness) and each token keeps the log-prob of the
    engine that sampled it. Every step runs once."""
    reward = tmp_path / "slow_reward.py"
    reward.write_text(textwrap.dedent("""
        import time

        def slow_exact_match(prompt, response, answer, row):
            time.sleep(0.25)
            return response.strip() == answer
    """))
    seed_of_step_2 = derive_seed(0, "rollout", 2, 0)
    monkeypatch.setattr(asyppo.cluster.supervisor, "RolloutWorker", fails_once(
        asyppo.actors.rollout_worker.RolloutWorker, "generate",
        lambda calls, self, problems, **kw: self.worker_index == 1 and kw["seed"] == seed_of_step_2,
        tmp_path / "rollout-1-died", instance=lambda self: self.worker_index))
    caplog.set_level(logging.WARNING, logger="asyppo")

    summary = train(build_config(overrides=[
        *JOB, f"trainer.run_dir={tmp_path}", "trainer.name=async", "trainer.max_staleness=1",
        "rollout.num_workers=2", "trainer.actor_restarts=2", "weight_sync.timeout_s=2",
        f"reward.function={reward}:slow_exact_match", "data.eval_size=4",
    ]))

    assert (tmp_path / "rollout-1-died").exists(), "the fault did not happen"
    assert summary["steps"] == 4 and "final_accuracy" in summary
    lines = read_metrics(tmp_path / "async" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    # Step s trains on the rollout that weights v(s-1) generated while step s-1 trained; step 0 and 1 on v0's.
    assert [line["rollout_weight_version"] for line in lines] == [0, 0, 1, 2]
    assert [line["policy_version"] for line in lines] == [1, 2, 3, 4]
    assert [line["actor_restarts"] for line in lines] == [0, 1, 1, 1]  # noticed at step 1's broadcast
    assert any("rollout-1 died and Ray restarted it (restart 1 of trainer.actor_restarts=2); it holds the learner's "
               "weights v2" in record.getMessage() for record in caplog.records)
    assert all(line["weight_sync_logp_diff"] < 1e-3 for line in lines)  # the weights arrived, and were checked
