"""Faults caused for real inside Ray actors: a subclass of an actor class whose method kills (SIGKILL) or stops
(SIGSTOP) its own process at a chosen call.

A marker file makes the fault happen once: Ray restarts a killed actor by running the same class again, and the
restarted process must not die the same way. Calls are counted in a file for the same reason.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # Ray's workers cannot import the tests


def fails_once(base: type, method: str, when: Callable[..., bool], marker: Path, sig: int = signal.SIGKILL,
               instance: Callable[[Any], object] = lambda self: 0) -> type:
    """``base`` whose ``method`` sends ``sig`` to its own process, before doing anything, on the first call for which
    ``when(call_number, self, *args, **kwargs)`` holds. ``call_number`` counts, from 1, the calls on the actor
    ``instance(self)`` names (e.g. a critic's index), across its restarts."""

    def method_with_fault(self, *args, **kwargs):
        counter = marker.with_name(f"{marker.name}.{instance(self)}.calls")
        calls = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(calls))
        if not marker.exists() and when(calls, self, *args, **kwargs):
            marker.write_text(f"{signal.Signals(sig).name} pid {os.getpid()} at call {calls}\n")
            os.kill(os.getpid(), sig)
        return getattr(base, method)(self, *args, **kwargs)

    return type(f"{base.__name__}With{signal.Signals(sig).name.title()}", (base,), {method: method_with_fault})
