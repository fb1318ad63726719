"""Atomic checkpoints of a run: ``runs/<name>/checkpoints/step-N/``.

Every actor writes into a hidden ``.step-N.tmp`` directory; only when all of them have finished does the driver
rename it to ``step-N`` and then point ``latest`` at it (both renames are atomic on one filesystem). A crash at any
moment leaves either the previous checkpoint or the new one, never half of one. On a multi-node cluster the run
directory must be on storage every node sees (NFS, a mounted bucket).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointDir:
    def __init__(self, run_path: Path, keep: int):
        self.root = Path(run_path) / "checkpoints"
        self.keep = keep

    def begin(self, step: int) -> Path:
        """A fresh staging directory for step ``step`` (left-overs of a crashed attempt are removed)."""
        staging = self.root / f".step-{step}.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        return staging

    def commit(self, step: int, trainer_state: dict[str, Any]) -> Path:
        staging = self.root / f".step-{step}.tmp"
        _atomic_write_text(staging / "trainer_state.json", json.dumps(trainer_state, indent=1))
        final = self.root / f"step-{step}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _atomic_write_text(self.root / "latest", final.name)
        self._prune()
        return final

    def _prune(self) -> None:
        done = sorted(self.root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "trainer_state.json").exists() else None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())
