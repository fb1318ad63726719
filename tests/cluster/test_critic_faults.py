"""Critics killed between two of their calls (docs/reliability.md, "Lost and hung actors"): after their training and
before the checkpoint, between their scoring and their training. Ray restarts such a critic with a new process (its
constructor: the initial critic), and the next call reaches it without failing, so the driver has to look for it:
before every checkpoint (or the checkpoint would keep an initial critic) and before every training call (or the
critic would train without scores). A death right after that look is found by the call itself."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from asyppo.cluster.checkpoint import verify
from asyppo.cluster.driver import Trainer, train
from asyppo.cluster.metrics import read_metrics
from asyppo.cluster.supervisor import Supervisor
from asyppo.common.config import build_config
from asyppo.critics.value_model import VALUE_HEAD_FILE
from tests.faults import kill_between_calls
from tests.reference_run import JOB

pytestmark = pytest.mark.cluster

# The small job for two steps, a checkpoint after each, two restarts per actor.
OVERRIDES = [*JOB, "trainer.steps=2", "trainer.checkpoint_every=1", "trainer.actor_restarts=2"]


def restart_warning(restart: int, outcome: str) -> str:
    return f"critic-1 died and Ray restarted it (restart {restart} of trainer.actor_restarts=2); it {outcome}"


def kill_after_the_look(monkeypatch, what: str, killed: list) -> None:
    """critic-1 killed (and restarted) right after the driver's first look for restarted critics in phase ``what``:
    the race that the look alone cannot close."""
    look = Supervisor.restore_critics

    def look_then_kill(self, phase, *pids):
        restarted = look(self, phase, *pids)
        if phase == what and not pids and not killed:  # the look that asks every critic for its process id
            killed.append(kill_between_calls(self.critics[1]))
        return restarted

    monkeypatch.setattr(Supervisor, "restore_critics", look_then_kill)


def weights(directory) -> dict[str, torch.Tensor]:
    """A saved critic's tensors: the backbone's and the value head's."""
    return {**load_file(str(directory / "model.safetensors")),
            **{f"value_head.{k}": v for k, v in load_file(str(directory / VALUE_HEAD_FILE)).items()}}


def test_critic_killed_after_training_is_restored_before_the_checkpoint_not_saved_fresh(
    tmp_path, monkeypatch, caplog,
):
    # critic-1 dies twice between its training of step 1 and step 1's checkpoint: once before the checkpoint starts
    # (found by the look before the save), once right after that look (its save then comes from a new process).
    killed_before, killed_after = [], []
    save_checkpoint = Trainer.save_checkpoint

    def kill_then_save(self, step):
        if step == 1:
            killed_before.append(kill_between_calls(self.actors.critics[1]))
        return save_checkpoint(self, step)

    monkeypatch.setattr(Trainer, "save_checkpoint", kill_then_save)
    kill_after_the_look(monkeypatch, "step 1: checkpoint", killed_after)
    caplog.set_level(logging.WARNING, logger="asyppo")

    train(build_config(overrides=[*OVERRIDES, f"trainer.run_dir={tmp_path}", "trainer.name=saved"]))

    assert killed_before, "the fault did not happen"
    checkpoints = tmp_path / "saved" / "checkpoints"
    assert verify(checkpoints / "step-1") == []
    kept, before = weights(checkpoints / "step-1" / "critic-1"), weights(checkpoints / "step-0" / "critic-1")
    # Not an initial critic (its value head starts at zero) ...
    assert kept["value_head.weight"].abs().sum() > 0
    # ... but the one restored from step 0's checkpoint: step 1's training of critic-1 is lost, as the warning says.
    assert kept.keys() == before.keys()
    assert all(torch.equal(kept[name], before[name]) for name in kept)
    # critic-0 lived and kept its training of step 1.
    trained = weights(checkpoints / "step-1" / "critic-0")
    assert not torch.equal(trained["value_head.weight"], weights(checkpoints / "step-0" / "critic-0")["value_head.weight"])
    assert killed_after, "the second fault did not happen"
    warnings = [record.getMessage() for record in caplog.records]
    restored = "was restored from the checkpoint step-0; its training since then is lost"
    assert [w for w in warnings if w.startswith("critic-1 died")] == [restart_warning(1, restored),
                                                                     restart_warning(2, restored)], warnings


def test_critic_killed_between_scoring_and_training_scores_again_and_the_job_goes_on(tmp_path, monkeypatch, caplog):
    # Step 0: critic-1 dies after it scored, before the driver sends the updates (found by the look before them).
    # Step 1: it dies right after that look, so its update reaches the new process, which holds no scores.
    killed_before, killed_after = [], []
    update = Trainer._update

    def kill_then_update(self, step, *args):
        if step == 0:
            killed_before.append(kill_between_calls(self.actors.critics[1]))
        return update(self, step, *args)

    monkeypatch.setattr(Trainer, "_update", kill_then_update)
    kill_after_the_look(monkeypatch, "step 1: critic training", killed_after)
    caplog.set_level(logging.WARNING, logger="asyppo")

    train(build_config(overrides=[*OVERRIDES, f"trainer.run_dir={tmp_path}", "trainer.name=scored"]))

    assert killed_before and killed_after, "the faults did not happen"
    warnings = [record.getMessage() for record in caplog.records]
    assert [w for w in warnings if w.startswith("critic-1 died")] == [
        restart_warning(1, "starts again from the initial critic (no checkpoint yet): its training so far is lost"),
        restart_warning(2, "was restored from the checkpoint step-0; its training since then is lost"),
    ], warnings
    run_path = tmp_path / "scored"
    metrics = read_metrics(run_path / "metrics.jsonl")
    assert [line["step"] for line in metrics] == [0, 1]  # every step, once
    assert [line["actor_restarts"] for line in metrics] == [1, 2]
    assert verify(run_path / "checkpoints" / "step-1") == []
    # The restarted critic trained in both steps: its checkpoints are neither initial nor equal.
    step0, step1 = (weights(run_path / "checkpoints" / f"step-{s}" / "critic-1") for s in (0, 1))
    assert step0["value_head.weight"].abs().sum() > 0
    assert not torch.equal(step0["value_head.weight"], step1["value_head.weight"])
