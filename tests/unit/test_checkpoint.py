"""Checkpoints can be trusted: atomic (a crash while writing leaves the previous checkpoint as the latest one),
described by a manifest written last, verified before a resume, and only ever loaded from the run's own directory."""

import hashlib
import json
import os

import pytest

from asyppo.cluster.checkpoint import CheckpointDir, read_trainer_state, verify

STATE_FILE = "policy_state/state/mp_rank_00_model_states.pt"


def write_checkpoint(ckpt: CheckpointDir, step: int):
    """What the actors and the driver write for one step: HF weights, a DeepSpeed state, then the commit."""
    staging = ckpt.begin(step)
    (staging / "policy").mkdir()
    (staging / "policy" / "weights").write_text(f"weights of step {step}")
    (staging / "policy_state" / "state").mkdir(parents=True)
    (staging / STATE_FILE).write_bytes(bytes(range(256)) * (step + 1))
    return ckpt.commit(step, {"step": step, "version": step + 1})


def flip_one_byte(path):
    """Corrupt a file in place without changing its size (what a bad disk or a torn copy does)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def never_log(line):
    raise AssertionError(f"unexpected log line: {line}")


def test_commit_publishes_a_complete_checkpoint(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=2)
    assert ckpt.latest() is None
    path = write_checkpoint(ckpt, 4)
    assert ckpt.latest() == path and path.name == "step-4"
    assert read_trainer_state(path) == {"step": 4, "version": 5}
    assert (path / "policy" / "weights").read_text() == "weights of step 4"
    assert verify(path) == []


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


def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    path = write_checkpoint(CheckpointDir(tmp_path, keep=2), 3)
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = {
        p.relative_to(path).as_posix(): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in path.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert set(on_disk) == {"policy/weights", STATE_FILE, "trainer_state.json"}
    assert manifest["files"] == on_disk
    assert manifest["format"] == 1 and manifest["step"] == 3 and manifest["created"]
    assert not list((tmp_path / "checkpoints").glob(".*.tmp")), "no staging or temporary file is left behind"
    assert not list(path.glob(".*.tmp"))


def test_a_truncated_file_is_named_with_its_sizes(tmp_path):
    path = write_checkpoint(CheckpointDir(tmp_path, keep=2), 1)
    with (path / STATE_FILE).open("r+b") as handle:
        handle.truncate(100)
    assert verify(path) == [f"{STATE_FILE}: size 100 != 512 in the manifest"]


def test_a_flipped_byte_is_named_as_corrupt(tmp_path):
    path = write_checkpoint(CheckpointDir(tmp_path, keep=2), 1)
    flip_one_byte(path / "policy" / "weights")
    assert verify(path) == ["policy/weights: sha256 mismatch (corrupt)"]


def test_a_deleted_file_is_named_as_missing(tmp_path):
    path = write_checkpoint(CheckpointDir(tmp_path, keep=2), 1)
    (path / "trainer_state.json").unlink()
    assert verify(path) == ["trainer_state.json: missing"]


def test_without_a_manifest_the_checkpoint_is_incomplete(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=2)
    path = write_checkpoint(ckpt, 1)
    (path / "manifest.json").unlink()
    [problem] = verify(path)
    assert problem.startswith("manifest.json missing")
    assert ckpt.latest() is None  # the resume hint no longer offers it


def test_files_not_in_the_manifest_are_ignored(tmp_path):
    path = write_checkpoint(CheckpointDir(tmp_path, keep=2), 1)
    (path / "notes.txt").write_text("added by hand")
    assert verify(path) == []


def test_resume_falls_back_to_the_previous_complete_checkpoint(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=3)
    write_checkpoint(ckpt, 10)
    newest = write_checkpoint(ckpt, 20)
    flip_one_byte(newest / STATE_FILE)
    lines = []
    search = ckpt.find_resume_point(lines.append)
    assert search.checkpoint == ckpt.root / "step-10"
    assert lines == [f"checkpoint step-20 is unusable ({STATE_FILE}: sha256 mismatch (corrupt)); "
                     "falling back to step-10"]
    assert search.rejected == {"step-20": [f"{STATE_FILE}: sha256 mismatch (corrupt)"]}


def test_resume_takes_the_newest_complete_checkpoint_even_if_latest_lags(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=3)
    write_checkpoint(ckpt, 1)
    write_checkpoint(ckpt, 2)
    (ckpt.root / "latest").write_text("step-1")  # the run died between the rename and the pointer update
    lines = []
    assert ckpt.find_resume_point(lines.append).checkpoint.name == "step-2"
    assert lines == ["checkpoints/latest names step-1, but the newest complete checkpoint is step-2; "
                     "resuming from step-2"]


def test_resume_with_every_checkpoint_broken_finds_none_and_says_why(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=3)
    write_checkpoint(ckpt, 10)
    write_checkpoint(ckpt, 20)
    (ckpt.root / "step-20" / "policy" / "weights").unlink()
    (ckpt.root / "step-10" / "manifest.json").unlink()
    lines = []
    search = ckpt.find_resume_point(lines.append)
    assert search.checkpoint is None
    assert list(search.rejected) == ["step-20", "step-10"]
    assert search.rejected["step-20"] == ["policy/weights: missing"]
    assert search.describe_rejected().startswith("step-20 (policy/weights: missing), step-10 (manifest.json missing")
    assert lines[-1].endswith("; no older checkpoint to fall back to")


def test_with_no_checkpoint_at_all_there_is_no_resume_point(tmp_path):
    search = CheckpointDir(tmp_path, keep=2).find_resume_point(never_log)
    assert search.checkpoint is None and search.rejected == {}


def test_leftover_staging_directories_of_any_step_are_removed(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=2)
    crashed = ckpt.begin(7)
    (crashed / "policy").mkdir()
    (crashed / "policy" / "weights").write_text("half written")
    ckpt.begin(9)
    assert not crashed.exists()
    assert [p.name for p in ckpt.root.iterdir()] == [".step-9.tmp"]


def test_a_step_directory_linking_outside_the_run_is_refused(tmp_path):
    elsewhere = write_checkpoint(CheckpointDir(tmp_path / "other-run", keep=2), 5)
    assert verify(elsewhere) == []  # complete, but not this run's: it may hold anyone's pickles
    ckpt = CheckpointDir(tmp_path / "run", keep=2)
    write_checkpoint(ckpt, 1)
    (ckpt.root / "step-5").symlink_to(elsewhere, target_is_directory=True)
    lines = []
    search = ckpt.find_resume_point(lines.append)
    assert search.checkpoint.name == "step-1"
    [problem] = search.rejected["step-5"]
    assert "outside" in problem and "refused" in problem
    (ckpt.root / "latest").write_text("step-5")
    assert ckpt.latest() is None


def test_a_manifest_entry_leading_outside_the_checkpoint_is_refused(tmp_path):
    path = write_checkpoint(CheckpointDir(tmp_path, keep=2), 1)
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"pickle")
    manifest = json.loads((path / "manifest.json").read_text())
    digest = hashlib.sha256(b"pickle").hexdigest()
    manifest["files"]["../../outside.pt"] = {"size": 6, "sha256": digest}
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert verify(path) == ["../../outside.pt: lies outside the checkpoint"]


def test_pruning_never_removes_the_checkpoint_latest_points_to(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=1)
    write_checkpoint(ckpt, 30)  # a newer checkpoint, rejected at resume (say it was corrupt) …
    # … so the run went on from an older step: its new checkpoints are numbered below step-30.
    resumed = write_checkpoint(ckpt, 5)
    assert ckpt.latest() == resumed
    assert sorted(p.name for p in ckpt.root.glob("step-*")) == ["step-30", "step-5"]


def test_incomplete_checkpoints_do_not_count_towards_keep(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=2)
    write_checkpoint(ckpt, 1)
    write_checkpoint(ckpt, 2)
    legacy = ckpt.root / "step-50"  # written before manifests existed: never resumed from
    legacy.mkdir()
    write_checkpoint(ckpt, 3)
    assert sorted(p.name for p in ckpt.root.glob("step-*")) == ["step-2", "step-3"]


def test_commit_refuses_a_symlink_in_the_staging_tree(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=2)
    staging = ckpt.begin(1)
    os.symlink(tmp_path, staging / "policy")
    with pytest.raises(ValueError, match="symlink"):
        ckpt.commit(1, {"step": 1})
    assert not (ckpt.root / "step-1").exists()
