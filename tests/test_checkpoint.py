"""Checkpoints are atomic: a crash while writing leaves the previous checkpoint as the latest one."""

from asyppo.cluster.checkpoint import CheckpointDir, read_trainer_state


def write_checkpoint(ckpt: CheckpointDir, step: int):
    staging = ckpt.begin(step)
    (staging / "policy").mkdir()
    (staging / "policy" / "weights").write_text(f"weights of step {step}")
    return ckpt.commit(step, {"step": step, "version": step + 1})


def test_commit_publishes_a_complete_checkpoint(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=2)
    assert ckpt.latest() is None
    path = write_checkpoint(ckpt, 4)
    assert ckpt.latest() == path and path.name == "step-4"
    assert read_trainer_state(path) == {"step": 4, "version": 5}
    assert (path / "policy" / "weights").read_text() == "weights of step 4"


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=2)
    write_checkpoint(ckpt, 1)
    staging = ckpt.begin(2)  # the actors start writing step 2 … and the job dies here
    (staging / "policy").mkdir()
    reopened = CheckpointDir(tmp_path, keep=2)
    assert reopened.latest().name == "step-1"
    assert read_trainer_state(reopened.latest())["step"] == 1
    # A later attempt at the same step starts from a clean staging directory.
    assert not any(reopened.begin(2).iterdir())


def test_old_checkpoints_are_pruned(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=2)
    for step in (1, 2, 3, 10):
        write_checkpoint(ckpt, step)
    assert sorted(p.name for p in ckpt.root.glob("step-*")) == ["step-10", "step-3"]
    assert ckpt.latest().name == "step-10"
