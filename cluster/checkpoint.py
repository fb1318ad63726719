"""Checkpoints of a run that can be trusted: ``runs/<name>/checkpoints/step-N/``.

Writing. Every actor writes into a hidden ``.step-N.tmp`` staging directory. When all of them have finished, the
driver (:meth:`CheckpointDir.commit`) writes ``trainer_state.json``, flushes every file of the staging tree to disk
(:func:`fsync_tree`), and then writes ``manifest.json`` LAST: every file's relative path, size and sha256. Only then
is the staging directory renamed to ``step-N`` and ``latest`` pointed at it (both renames are atomic on one
filesystem). A crash at any moment leaves either the previous checkpoint or the new one, never half of one; and a
``step-N`` without a manifest is incomplete by definition. On a multi-node cluster the run directory must be on
storage every node sees (NFS, a mounted bucket); there the driver's fsync cannot flush another node's writes, so each
actor calls :func:`fsync_tree` on its own output after writing it.

Reading. :func:`verify` compares a checkpoint with its manifest (sizes and sha256 of every listed file), and
:meth:`CheckpointDir.find_resume_point` walks the checkpoints newest → oldest and picks the newest one that passes,
saying in the log why each newer one was passed over. Checkpoints written before manifests existed have none and
are treated as incomplete: they are never resumed from.

Security. The DeepSpeed optimizer states (``policy_state/``, ``critic-M-state/``) are pickles, loaded with
``torch.load``: loading one runs whatever code it names. Resume therefore only loads from this run's own
checkpoints directory: :meth:`CheckpointDir.find_resume_point` only returns paths that resolve (symlinks followed)
inside it, and :func:`check_inside` is there for anyone who is handed a checkpoint path from elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from asyppo.common.files import atomic_write_text, fsync_path, fsync_tree

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
TRAINER_STATE_NAME = "trainer_state.json"
STAGING_GLOB = ".step-*.tmp"

# A log line lists this many problems of a rejected checkpoint; a checkpoint with its policy missing has hundreds.
_PROBLEMS_PER_LINE = 3


def _remove(path: Path) -> None:
    """Delete a checkpoint or staging directory; a symlink is unlinked, never followed into what it points at."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


# ------------------------------------------------------------------------------------------------------ manifest


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (checkpoint files can be many GB)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _checkpoint_files(checkpoint: Path) -> list[Path]:
    """Every file under ``checkpoint`` except the manifest itself, sorted; raises on a symlink, because a checkpoint
    must hold its own bytes (a link could point anywhere, and its target could change after the manifest)."""
    files = []
    for directory, dir_names, file_names in os.walk(checkpoint):
        for name in dir_names + file_names:
            if Path(directory, name).is_symlink():
                raise ValueError(f"checkpoint {checkpoint} holds a symlink, {Path(directory, name)}; "
                                 "checkpoints must hold plain files only")
        files += [Path(directory, name) for name in file_names]
    manifest = checkpoint / MANIFEST_NAME
    return sorted(file for file in files if file != manifest)


def build_manifest(checkpoint: Path, step: int) -> dict[str, Any]:
    """The manifest of a finished checkpoint tree: format, step, creation time, and per file its size and sha256."""
    files = {
        file.relative_to(checkpoint).as_posix(): {"size": file.stat().st_size, "sha256": sha256_of(file)}
        for file in _checkpoint_files(checkpoint)
    }
    return {
        "format": MANIFEST_FORMAT,
        "step": step,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }


def _read_manifest(checkpoint: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The manifest of ``checkpoint``, or None and the problems that make it unusable."""
    path = checkpoint / MANIFEST_NAME
    if not path.is_file():
        return None, [f"{MANIFEST_NAME} missing (an incomplete checkpoint, or one written before manifests existed)"]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"{MANIFEST_NAME}: unreadable ({exc})"]
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        return None, [f"{MANIFEST_NAME}: format {found!r}, this code reads format {MANIFEST_FORMAT}"]
    if not isinstance(manifest.get("files"), dict):
        return None, [f"{MANIFEST_NAME}: has no file list"]
    return manifest, []


def _file_problem(checkpoint: Path, name: str, expected: dict[str, Any]) -> str | None:
    """What is wrong with one file listed in the manifest, or None if its size and sha256 match."""
    path = checkpoint / name
    expected = expected if isinstance(expected, dict) else {}
    # A manifest entry such as "../x" or a linked sub-directory must not make us read (and later load) foreign files.
    if not path.resolve().is_relative_to(checkpoint.resolve()):
        return f"{name}: lies outside the checkpoint"
    if not path.is_file():
        return f"{name}: missing"
    size = path.stat().st_size
    if size != expected.get("size"):
        return f"{name}: size {size} != {expected.get('size')} in the manifest"
    # Hashing last: it reads the whole file, and the size check already catches truncated writes.
    if sha256_of(path) != expected.get("sha256"):
        return f"{name}: sha256 mismatch (corrupt)"
    return None


def _step_number(path: Path) -> int | None:
    """N of a ``step-N`` path, or None for any other name."""
    prefix, _, number = path.name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() else None


def verify(checkpoint: str | os.PathLike) -> list[str]:
    """Problems of a checkpoint in plain words, each naming the file concerned; an empty list means it is complete.

    A checkpoint is complete when its manifest exists and every file the manifest lists has the listed size and
    sha256. Files present but not listed are ignored, not reported (the manifest is what a resume relies on; the
    writer lists every file it wrote). A ``step-N`` directory whose manifest names another step is rejected too.
    This reads every byte of the checkpoint.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return [f"{checkpoint.name}: not a directory"]
    manifest, problems = _read_manifest(checkpoint)
    if manifest is None:
        return problems
    step = _step_number(checkpoint)
    if step is not None and manifest.get("step") != step:
        problems.append(f"{MANIFEST_NAME}: written for step {manifest.get('step')}, not step {step}")
    if TRAINER_STATE_NAME not in manifest["files"]:
        problems.append(f"{TRAINER_STATE_NAME}: not in the manifest")
    for name, expected in manifest["files"].items():
        problem = _file_problem(checkpoint, name, expected)
        if problem:
            problems.append(problem)
    return problems


def check_inside(directory: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` with symlinks resolved, after checking that it lies inside ``directory`` (resolved too).

    Raises ValueError otherwise: checkpoints hold pickles, so they are only loaded from the run's own directory.
    """
    resolved, root = Path(path).resolve(), Path(directory).resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"{path} resolves to {resolved}, outside {root}; checkpoints hold pickled optimizer states "
                         "and are only loaded from the run's own checkpoints directory")
    return resolved


# --------------------------------------------------------------------------------------------------- resuming


@dataclass(frozen=True)
class ResumeSearch:
    """The outcome of looking for a checkpoint to resume from."""

    checkpoint: Path | None  # the newest complete checkpoint, or None if there is none
    rejected: dict[str, list[str]] = field(default_factory=dict)  # newer checkpoints passed over: name → problems

    def describe_rejected(self) -> str:
        """``step-20 (problem; problem), step-10 (problem)``, for an error message when there is no checkpoint."""
        return ", ".join(f"{name} ({_summary(problems)})" for name, problems in self.rejected.items())


def _summary(problems: list[str]) -> str:
    """The first few problems on one line, and how many more there are."""
    shown = "; ".join(problems[:_PROBLEMS_PER_LINE])
    hidden = len(problems) - _PROBLEMS_PER_LINE
    return f"{shown}; and {hidden} more" if hidden > 0 else shown


# ---------------------------------------------------------------------------------------------- the directory


class CheckpointDir:
    """The ``checkpoints/`` directory of one run: writes checkpoints, prunes old ones, finds one to resume from."""

    def __init__(self, run_path: Path, keep: int):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root = Path(run_path) / "checkpoints"
        self.keep = keep

    def _staging(self, step: int) -> Path:
        return self.root / f".step-{step}.tmp"

    def _checkpoints_newest_first(self) -> list[Path]:
        """Every ``step-N`` entry (directories and symlinks alike), highest N first."""
        entries = [p for p in self.root.glob("step-*") if _step_number(p) is not None]
        return sorted(entries, key=_step_number, reverse=True)

    def _pointed_name(self) -> str | None:
        """The name the ``latest`` pointer holds, or None without one."""
        pointer = self.root / "latest"
        return pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None

    def begin(self, step: int) -> Path:
        """A fresh staging directory for step ``step``; staging directories of crashed attempts, at any step, are
        removed (they can hold many GB and are never resumed from)."""
        for leftover in self.root.glob(STAGING_GLOB):
            _remove(leftover)
        staging = self._staging(step)
        staging.mkdir(parents=True)
        return staging

    def commit(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Publish the staging directory of ``step`` as ``step-N`` once every actor has written into it.

        Order matters: trainer state, then every file flushed, then the manifest (so a manifest only ever
        describes bytes already on disk), then the rename, then ``latest``, then pruning.
        """
        staging = self._staging(step)
        atomic_write_text(staging / TRAINER_STATE_NAME, json.dumps(trainer_state, indent=1))
        fsync_tree(staging)
        atomic_write_text(staging / MANIFEST_NAME, json.dumps(build_manifest(staging, step), indent=1))
        final = self.root / f"step-{step}"
        _remove(final)  # a checkpoint of the same step from an earlier attempt of this run
        os.replace(staging, final)
        fsync_path(self.root)
        atomic_write_text(self.root / "latest", final.name)
        self._prune()
        return final

    def _prune(self) -> None:
        """Keep the ``keep`` newest checkpoints that have a manifest, and whatever ``latest`` points to; delete the
        rest. Checkpoints without a manifest are incomplete and never count towards ``keep``."""
        complete = [p for p in self._checkpoints_newest_first() if self._has_manifest(p)]
        kept = {p.name for p in complete[: self.keep]} | {self._pointed_name()}
        for checkpoint in self._checkpoints_newest_first():
            if checkpoint.name not in kept:
                _remove(checkpoint)

    def _has_manifest(self, checkpoint: Path) -> bool:
        """Whether ``checkpoint`` lies in this directory and has a manifest (cheap: nothing is hashed)."""
        try:
            check_inside(self.root, checkpoint)
        except ValueError:
            return False
        return (checkpoint / MANIFEST_NAME).is_file()

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` points to, if it lies in this directory and has a manifest (cheap: nothing is
        hashed; for resuming use :meth:`find_resume_point`, which verifies)."""
        name = self._pointed_name()
        return self.root / name if name and self._has_manifest(self.root / name) else None

    def _problems(self, checkpoint: Path) -> list[str]:
        """Why ``checkpoint`` cannot be resumed from; empty if it can."""
        try:
            check_inside(self.root, checkpoint)
        except ValueError:
            return [f"{checkpoint.name}: points to {checkpoint.resolve()}, outside {self.root.resolve()} "
                    "(refused: checkpoints hold pickles)"]
        return verify(checkpoint)

    def find_resume_point(self, log: Callable[[str], None]) -> ResumeSearch:
        """The newest complete checkpoint by step number, whatever ``latest`` says, and the newer ones passed over.

        Each checkpoint is verified in full (every byte hashed). Each rejected one gets a log line naming its
        problems and the checkpoint tried next; a ``latest`` pointer naming another checkpoint than the one chosen
        and not rejected is logged too (it lags by one when the run stopped between the rename and the pointer update).
        """
        candidates = self._checkpoints_newest_first()
        rejected: dict[str, list[str]] = {}
        chosen = None
        for index, checkpoint in enumerate(candidates):
            problems = self._problems(checkpoint)
            if not problems:
                chosen = checkpoint
                break
            rejected[checkpoint.name] = problems
            older = candidates[index + 1].name if index + 1 < len(candidates) else None
            then = f"falling back to {older}" if older else "no older checkpoint to fall back to"
            log(f"checkpoint {checkpoint.name} is unusable ({_summary(problems)}); {then}")
        pointed = self._pointed_name()
        # A rejected pointer target has had its line already; otherwise say why the pointer is not followed.
        if chosen is not None and pointed and pointed != chosen.name and pointed not in rejected:
            log(f"checkpoints/latest names {pointed}, but the newest complete checkpoint is {chosen.name}; "
                f"resuming from {chosen.name}")
        return ResumeSearch(chosen, rejected)


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The driver's state saved with a checkpoint (step, policy version, prompt sampler)."""
    return json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())
