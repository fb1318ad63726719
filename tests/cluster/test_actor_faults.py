"""Lost and hung actors (docs/reliability.md): real actor processes killed (SIGKILL) or stopped (SIGSTOP) in the middle
of a step. A rollout worker or a critic that dies is restarted by Ray and brought back, and the run goes on exactly as
if nothing had happened; an actor that stops answering ends the job with one line naming the actor and the phase,
and the command that resumes it (a dead learner does too: tests/cluster/test_multinode.py, where it dies with its
node and the run is resumed)."""

from __future__ import annotations

import json
import logging
import signal

import psutil
import pytest

import asyppo.actors.rollout_worker
import asyppo.cluster.supervisor
import asyppo.critics.mini_critic
from asyppo.common.config import build_config
from asyppo.cluster.driver import train
from asyppo.cluster.errors import JobFailed
from asyppo.cluster.metrics import read_metrics
from asyppo.core.seeds import derive_seed
from tests.faults import fails_once
from tests.reference_run import JOB, assert_same_run

pytestmark = pytest.mark.cluster



def generates_step(step: int):
    """A fault condition on RolloutWorker.generate: true for the call that generates step ``step``'s rollout (the
    driver's seed of it; trainer.seed = 0 here)."""
    seed = derive_seed(0, "rollout", step, 0)
    return lambda calls, self, problems, **kw: kw["seed"] == seed


def test_killed_rollout_worker_and_critic_are_restarted_and_the_run_is_unchanged(
    tmp_path, reference_run, monkeypatch, caplog, capsys,
):
    """The reference job (one rollout worker) run with three, and with a rollout worker and a critic killed: the
    same numbers. Each prompt's sampling seed is keyed by its position in the step's generation, not by the worker
    that samples it (slices of 3, 3 and 2 prompts here), so a resume with another worker count, or a fleet that
    grows and shrinks, continues the same run; and a killed actor, restarted and brought back, changes nothing."""
    _, reference_dir = reference_run
    # rollout-0 dies as it starts generating step 1's responses, and again as the learner's broadcast after step 1
    # reaches it (its second receive_weights: the first restart got v1 through the object store); critic-1 dies as
    # it starts training in step 2, after the checkpoint of step 1 (checkpoint_every=2), which holds exactly the
    # state it had.
    first_worker = dict(instance=lambda self: self.worker_index)
    step_1 = generates_step(1)  # a closure travels to Ray's workers by value, this module's functions would not
    dies_generating = fails_once(asyppo.actors.rollout_worker.RolloutWorker, "generate",
                                 lambda calls, self, problems, **kw: self.worker_index == 0 and step_1(
                                     calls, self, problems, **kw), tmp_path / "rollout-died", **first_worker)
    monkeypatch.setattr(asyppo.cluster.supervisor, "RolloutWorker", fails_once(
        dies_generating, "receive_weights", lambda calls, self, *args: self.worker_index == 0 and calls == 2,
        tmp_path / "rollout-died-again", **first_worker))
    monkeypatch.setattr(asyppo.cluster.supervisor, "MiniCritic", fails_once(
        asyppo.critics.mini_critic.MiniCritic, "update", lambda calls, self, *args: self.index == 1 and calls == 3,
        tmp_path / "critic-died", instance=lambda self: self.index))
    caplog.set_level(logging.WARNING, logger="asyppo")

    # The surviving workers wait out the weight-sync timeout inside the broadcast that rollout-0's death broke:
    # a short one keeps the test short (it changes no number).
    summary = train(build_config(overrides=[*JOB, f"trainer.run_dir={tmp_path}", "trainer.name=faulted",
                                            "trainer.actor_restarts=2", "rollout.num_workers=3",
                                            "weight_sync.timeout_s=6"]))

    for marker in ("rollout-died", "rollout-died-again", "critic-died"):
        assert (tmp_path / marker).exists(), f"{marker}: the fault did not happen"
    warnings = [record.getMessage() for record in caplog.records]
    for expected in ("rollout-0 died and Ray restarted it (restart 1 of trainer.actor_restarts=2); it holds the "
                     "learner's weights v1 and rejoined the weight-sync group",
                     "rollout-0 died and Ray restarted it (restart 2 of trainer.actor_restarts=2); it holds the "
                     "learner's weights v2 and rejoined the weight-sync group",
                     "critic-1 died and Ray restarted it (restart 1 of trainer.actor_restarts=2); it was restored "
                     "from the checkpoint step-1; its training since then is lost"):
        assert expected in warnings, warnings
    run_path = tmp_path / "faulted"
    assert [line["actor_restarts"] for line in read_metrics(run_path / "metrics.jsonl")] == [0, 2, 3, 3]
    # What Ray's raylet says about the deaths (a paragraph of possible causes each) is in driver.log, not on the
    # console beside the job's own lines.
    raylet = [line.split(" ray.raylet: ", 1)[1] for line in (run_path / "logs" / "driver.log").read_text().splitlines()
              if " ray.raylet: " in line]
    assert raylet, "Ray reported no worker death to the driver"
    console = capsys.readouterr()
    assert not [line for line in raylet if line.strip() and line in console.out + console.err]
    # Same samples, same critic state: every number equals the uninterrupted one-worker run's.
    assert summary["final_accuracy"] == reference_run[0]["final_accuracy"]
    assert_same_run(reference_dir, run_path)


def test_stopped_rollout_worker_ends_in_a_timeout_naming_it_and_the_phase(tmp_path, monkeypatch):
    # The actors' start is bounded by trainer.start_timeout_s: call_timeout_s is for calls, which take a second here.
    overrides = [*JOB, f"trainer.run_dir={tmp_path}", "trainer.name=hung", "trainer.call_timeout_s=12"]
    run_path = tmp_path / "hung"
    marker = tmp_path / "rollout-stopped"
    monkeypatch.setattr(asyppo.cluster.supervisor, "RolloutWorker", fails_once(
        asyppo.actors.rollout_worker.RolloutWorker, "generate", generates_step(2), marker, sig=signal.SIGSTOP))

    with pytest.raises(JobFailed) as failure:
        train(build_config(overrides=overrides))
    assert str(failure.value).startswith(
        "step 2: rollout: no answer from rollout-0 within trainer.call_timeout_s=12s (the process is alive but "
        "not answering")
    assert str(failure.value).endswith(f"; resume with: asyppo train --config {run_path / 'config.yaml'} --resume")
    stopped_pid = int(marker.read_text().split()[2])
    assert not psutil.pid_exists(stopped_pid) or psutil.Process(stopped_pid).status() == psutil.STATUS_ZOMBIE, \
        "the stopped worker was left behind"
    assert json.loads((run_path / "checkpoints" / "step-1" / "trainer_state.json").read_text())["step"] == 1
