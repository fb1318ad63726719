"""Where built-in models are cached, and building a cache entry once when several processes ask for it.

Used by the built-in tiny models (``asyppo.tasks.tiny_models``) and the built-in pretrained ones
(``asyppo.tasks.pretrained``). No Ray import here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["default_cache_dir", "exclusive_lock"]


def default_cache_dir() -> Path:
    """``$ASYPPO_CACHE`` if set, else ``asyppo`` in the user's cache directory (``$XDG_CACHE_HOME``, default
    ``~/.cache``), where torch keeps its compiled extensions and vLLM its records too."""
    if os.environ.get("ASYPPO_CACHE"):
        return Path(os.environ["ASYPPO_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "asyppo"


@contextlib.contextmanager
def exclusive_lock(path: Path, log: Callable[[str], None]) -> Iterator[None]:
    """An advisory ``flock`` on ``path``, so that concurrent callers build an entry once (``log`` says when one
    waits for another)."""
    import fcntl

    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[bootstrap] waiting for another process building {path.with_suffix('')} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
