"""The number of rollout workers changes who samples, not what is sampled (docs/architecture.md, "Seeds")."""

from __future__ import annotations

import pytest

from asyppo.cluster.driver import train
from asyppo.common.config import build_config
from tests.reference_run import JOB, assert_same_run

pytestmark = pytest.mark.cluster


def test_three_rollout_workers_give_the_one_worker_run(tmp_path, reference_run):
    """Each prompt's seed is keyed by its position in the step's generation, not by the worker that samples it:
    the reference job (one worker) run with three (slices of 3, 3 and 2 prompts) logs the same numbers, so a resume
    with another worker count, or a fleet that grows and shrinks, continues the same run."""
    reference, reference_dir = reference_run
    summary = train(build_config(overrides=[*JOB, f"trainer.run_dir={tmp_path}", "trainer.name=three-workers",
                                            "rollout.num_workers=3"]))
    assert summary["final_accuracy"] == reference["final_accuracy"]
    assert_same_run(reference_dir, tmp_path / "three-workers")
