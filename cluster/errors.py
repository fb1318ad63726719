"""How a job ends when it cannot go on: one line that says what failed and how to resume (docs/reliability.md)."""

from __future__ import annotations


class JobFailed(RuntimeError):
    """The job cannot go on (a dead actor, a timeout, stale weights, bad input); the message says which and what
    to do."""

    exit_code = 1


class ActorLost(JobFailed):
    """An actor's process died during a call; ``actor`` is its name (``rollout-0``, ``critic-1``, ``learner``).
    ``unavailable``: Ray reported it temporarily unreachable (it may be restarting), not dead for good."""

    def __init__(self, message: str, actor: str, unavailable: bool = False):
        super().__init__(message)
        self.actor = actor
        self.unavailable = unavailable


class JobStopped(JobFailed):
    """The job was stopped on purpose (SIGTERM, Ctrl-C) after saving a checkpoint; exits with 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
