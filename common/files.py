"""Writing files so that they survive a crash: flushing trees to disk, replacing a file atomically.

Used by the checkpoint directory (``asyppo.cluster.checkpoint``), the metrics files, and by every actor on what it
saves (on shared storage only the node that wrote a file can flush it).
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush one file or directory to disk (a directory's fsync makes the names of its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file and directory under ``path`` (and ``path`` itself) to disk; symlinks are not followed.

    Actors call it on what they wrote before returning from ``save``: on shared storage only the node that wrote a
    file can flush it. Children are flushed before their parents, so a durable directory lists durable entries.
    """
    root = Path(path)
    for directory, _, file_names in os.walk(root, topdown=False):
        for name in file_names:
            file = Path(directory, name)
            if not file.is_symlink():
                fsync_path(file)
        fsync_path(Path(directory))


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old or the new content, never a mix, even after a
    power loss (the temporary file is flushed before the rename, the directory after it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)

