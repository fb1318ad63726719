"""Faults caused for real inside Ray actors: a subclass of an actor class whose method kills (SIGKILL) or stops
(SIGSTOP) its own process at a chosen call; or an idle actor's process killed from the driver, between two calls.

A marker file makes the fault happen once: Ray restarts a killed actor by running the same class again, and the
restarted process must not die the same way. Calls are counted in a file for the same reason.
"""

from __future__ import annotations

import os
import signal
import time
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


def kill_between_calls(actor, timeout_s: float = 120.0) -> tuple[int, int]:
    """SIGKILL the process of ``actor`` (a handle whose ``pid()`` names its process) while it runs no call, and return
    once Ray has restarted it, as ``(old pid, new pid)``: the next call the driver sends reaches the new process, as
    when an actor dies after one call has returned and before the next one is sent."""
    old = ray.get(actor.pid.remote(), timeout=timeout_s)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            new = ray.get(actor.pid.remote(), timeout=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):  # dying, or restarting
            new = old
        if new != old:
            return old, new
        time.sleep(0.2)
    raise AssertionError(f"the actor killed in process {old} was not restarted within {timeout_s:.0f}s")
