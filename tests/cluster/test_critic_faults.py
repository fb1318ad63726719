"""Critics killed between two of their calls (docs/reliability.md, "Lost and hung actors"): between their scoring and
their training, after their training and before the checkpoint. Ray restarts such a critic with a new process (its
constructor: the initial critic), and the next call reaches it without failing, so the driver has to look for it:
before every training call (or the critic would train without scores) and before every checkpoint (or the checkpoint
would keep an initial critic). A death right after that look is found by the call itself.

One job carries all four faults (each actor start costs more than the steps): critic-0 is the one killed around its
training, critic-1 the one killed around the checkpoint; each test reads its own part of the run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class FaultedRun:
    path: Path
    kills: dict[str, list]  # fault → the (old pid, new pid) of the kill, once it happened
    warnings: list[str]


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory) -> FaultedRun:
    """Step 0: critic-0 dies after it scored, before the driver sends the updates (found by the look before them).
    Step 1: critic-0 dies right after that look, so its update reaches the new process, which holds no scores; then
    critic-1 dies twice between its training and step 1's checkpoint: once before the checkpoint starts (found by
    the look before the save), once right after that look (its save then comes from a new process)."""
    root = tmp_path_factory.mktemp("critic-faults")
    kills = {"scored": [], "scored-after-look": [], "trained": [], "trained-after-look": []}
    update, save_checkpoint, look = Trainer._update, Trainer.save_checkpoint, Supervisor.restore_critics

    def kill_then_update(self, step, *args):
        if step == 0:
            kills["scored"].append(kill_between_calls(self.actors.critics[0]))
        return update(self, step, *args)

    def kill_then_save(self, step):
        if step == 1:
            kills["trained"].append(kill_between_calls(self.actors.critics[1]))
        return save_checkpoint(self, step)

    after_look = {"step 1: critic training": (0, "scored-after-look"), "step 1: checkpoint": (1, "trained-after-look")}

    def look_then_kill(self, phase, pids=None, **kwargs):
        """The race that the look alone cannot close: a critic killed (and restarted) right after the driver's first
        look for restarted critics in a phase (the look that asks every critic for its process id)."""
        restarted = look(self, phase, pids, **kwargs)
        if phase in after_look and pids is None:
            critic, fault = after_look[phase]
            if not kills[fault]:
                kills[fault].append(kill_between_calls(self.critics[critic]))
        return restarted

    warnings = Warnings()
    logging.getLogger("asyppo").addHandler(warnings)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Trainer, "_update", kill_then_update)
            patch.setattr(Trainer, "save_checkpoint", kill_then_save)
            patch.setattr(Supervisor, "restore_critics", look_then_kill)
            train(build_config(overrides=[*OVERRIDES, f"trainer.run_dir={root}", "trainer.name=faulted"]))
    finally:
        logging.getLogger("asyppo").removeHandler(warnings)
    for fault, happened in kills.items():
        assert happened, f"the fault {fault!r} did not happen"
    return FaultedRun(root / "faulted", kills, warnings.messages)


def restart_warning(critic: int, restart: int, outcome: str) -> str:
    return f"critic-{critic} died and Ray restarted it (restart {restart} of trainer.actor_restarts=2); it {outcome}"


def weights(directory) -> dict[str, torch.Tensor]:
    """A saved critic's tensors: the backbone's and the value head's."""
    return {**load_file(str(directory / "model.safetensors")),
            **{f"value_head.{k}": v for k, v in load_file(str(directory / VALUE_HEAD_FILE)).items()}}


RESTORED = "was restored from the checkpoint step-0; its training since then is lost"


def test_critic_killed_between_scoring_and_training_scores_again_and_the_job_goes_on(faulted_run):
    assert [w for w in faulted_run.warnings if w.startswith("critic-0 died")] == [
        restart_warning(0, 1, "starts again from the initial critic (no checkpoint yet): its training so far is lost"),
        restart_warning(0, 2, RESTORED),
    ], faulted_run.warnings
    metrics = read_metrics(faulted_run.path / "metrics.jsonl")
    assert [line["step"] for line in metrics] == [0, 1]  # every step, once
    assert [line["actor_restarts"] for line in metrics] == [1, 2]  # critic-1's deaths come after step 1's line
    # The restarted critic trained in both steps: its checkpoints are neither initial nor equal.
    checkpoints = faulted_run.path / "checkpoints"
    step0, step1 = (weights(checkpoints / f"step-{s}" / "critic-0") for s in (0, 1))
    assert step0["value_head.weight"].abs().sum() > 0
    assert not torch.equal(step0["value_head.weight"], step1["value_head.weight"])


def test_critic_killed_after_training_is_restored_before_the_checkpoint_not_saved_fresh(faulted_run):
    checkpoints = faulted_run.path / "checkpoints"
    assert verify(checkpoints / "step-0") == [] and verify(checkpoints / "step-1") == []
    kept, before = weights(checkpoints / "step-1" / "critic-1"), weights(checkpoints / "step-0" / "critic-1")
    # Not an initial critic (its value head starts at zero) ...
    assert kept["value_head.weight"].abs().sum() > 0
    # ... but the one restored from step 0's checkpoint: step 1's training of critic-1 is lost, as the warning says.
    assert kept.keys() == before.keys()
    assert all(torch.equal(kept[name], before[name]) for name in kept)
    assert [w for w in faulted_run.warnings if w.startswith("critic-1 died")] == [
        restart_warning(1, 1, RESTORED), restart_warning(1, 2, RESTORED)], faulted_run.warnings
