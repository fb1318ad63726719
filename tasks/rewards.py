"""The reward of one response (docs/algorithms.md §1): the task's verifier, the scores, DAPO overlong shaping.

One scalar per response: ``correct`` when the task's verifier accepts the response, ``wrong`` otherwise, plus the
optional DAPO overlong shaping. The learner places that scalar on the last valid response token; this module
only scores text. The verifiers belong to their tasks (``asyppo.tasks.registry``).

This module is plain Python (no Ray import) so it can be used and tested anywhere; rollout workers call it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, NamedTuple

from asyppo.tasks.registry import TASKS

__all__ = ["Reward", "RewardFunction", "overlong_penalty"]


def _as_int(name: str, value: Any) -> int:
    """``value`` as a Python int; accepts numpy / torch integer scalars, rejects bools, floats and the rest."""
    if isinstance(value, bool):
        raise TypeError(f"overlong_penalty: {name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"overlong_penalty: {name} must be an integer, got {value!r}") from None


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float) -> float:
    """DAPO soft overlong punishment (docs/algorithms.md §1).

    ``expected = max_length - buffer``; the penalty is ``min(-(length - expected) / buffer * factor, 0)``:
    zero up to ``expected`` tokens, then falling linearly to ``-factor`` at ``max_length`` (and, as the formula
    states, further below for longer responses). ``length`` is the response length in tokens.
    """
    length = _as_int("length", length)
    max_length = _as_int("max_length", max_length)
    buffer = _as_int("buffer", buffer)
    if length < 0:
        raise ValueError(f"overlong_penalty: length must be >= 0, got {length}")
    if not 0 < buffer <= max_length:
        raise ValueError(
            f"overlong_penalty: need 0 < buffer <= max_length, got buffer={buffer}, max_length={max_length}"
        )
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise TypeError(f"overlong_penalty: factor must be a number, got {factor!r}")
    if not math.isfinite(factor) or factor < 0:
        raise ValueError(f"overlong_penalty: factor must be finite and >= 0, got {factor!r}")
    expected = max_length - buffer
    return min(-(length - expected) / buffer * factor, 0.0)


class Reward(NamedTuple):
    """The score of one response and whether its task's verifier accepted it (logged as accuracy)."""

    score: float
    correct: bool


@dataclass(frozen=True)
class RewardFunction:
    """Outcome reward for one response (docs/algorithms.md §1); picklable, so it can be shipped to Ray actors.

    ``correct`` / ``wrong`` are the scores for accepted / rejected responses (default 1 / 0; ERC's
    recipe uses +1 / -1). DAPO overlong shaping is off unless ``max_length`` and ``buffer`` are both set; it
    then adds ``overlong_penalty(response_length, max_length, buffer, factor)`` to the score.
    ``truncated_is_wrong`` makes a response cut off by the generation limit (no EOS) score as wrong even if its
    text happens to state the answer; off by default, since a truncated response rarely states it anyway.
    """

    task: str = "arithmetic"
    correct: float = 1.0
    wrong: float = 0.0
    max_length: int | None = None
    buffer: int | None = None
    factor: float = 1.0
    truncated_is_wrong: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"RewardFunction: task must be one of {sorted(TASKS)}, got {self.task!r}")
        for name in ("correct", "wrong", "factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"RewardFunction: {name} must be a finite number, got {value!r}")
        if (self.max_length is None) != (self.buffer is None):
            raise ValueError(
                "RewardFunction: set both max_length and buffer to enable overlong shaping, or neither "
                f"(got max_length={self.max_length!r}, buffer={self.buffer!r})"
            )
        if self.overlong_enabled:
            # Validates the numbers once, up front, instead of on the first scored response.
            overlong_penalty(0, self.max_length, self.buffer, self.factor)

    @property
    def overlong_enabled(self) -> bool:
        return self.max_length is not None

    def __call__(self, response_text: str, answer: str, *, response_length: int, truncated: bool) -> Reward:
        """The reward of one response of ``response_length`` tokens (docs/algorithms.md §1); the verifier runs once."""
        correct = bool(TASKS[self.task].verify(response_text, answer))
        accepted = correct and not (truncated and self.truncated_is_wrong)
        score = float(self.correct if accepted else self.wrong)
        if self.overlong_enabled:
            score += overlong_penalty(response_length, self.max_length, self.buffer, self.factor)
        return Reward(score, correct)
