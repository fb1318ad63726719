"""The reward of one response (docs/algorithms.md §1): a reward function, the scores, DAPO overlong shaping.

A reward function is any callable ``fn(prompt, response, answer, row)`` (docs/rewards.md):

* ``prompt`` -- the prompt text as built from the dataset row (``data.prompt_template``, before any chat template),
* ``response`` -- the text the policy generated (no EOS text),
* ``answer`` -- the row's reference answer as text (``data.answer_key``),
* ``row`` -- the whole dataset row as read, for columns of your own (empty for built-in tasks),

returning one of

* a **verdict** (``bool``): scored ``reward.correct`` when true, ``reward.wrong`` when false,
* a **score** (a finite number): correct (for the logged accuracy) when it is > 0,
* a ``(score, correct)`` pair.

``reward.function`` names one as ``package.module:name`` or ``path/to/file.py:name``; left unset, the task's own
verifier is used (``asyppo.tasks.arithmetic:reward``, ``asyppo.tasks.chain:reward``, ``asyppo.tasks.math:reward``,
each a function of exactly this shape). DAPO's overlong shaping is added to whatever the function scores. The
learner places the scalar on the last valid response token; this module only scores text.

This module is plain Python (no Ray import) so it can be used and tested anywhere; rollout workers call it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import math
import numbers
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from asyppo.tasks.registry import TASKS

__all__ = ["Reward", "RewardFunction", "as_reward", "load_reward_function", "overlong_penalty"]


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


def load_reward_function(spec: str) -> Callable[..., Any]:
    """The callable that ``spec`` names: ``package.module:name`` (imported; the working directory is on the path)
    or ``path/to/file.py:name`` (loaded from that file, relative to the working directory). Loaded once per
    process. Raises ``ValueError`` saying what is wrong: the form, a missing module or file, an import that
    failed, a missing or non-callable name."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ValueError(f"{spec!r} must look like 'package.module:function' or 'path/to/file.py:function'")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"{target}: no such file (relative paths start at the working directory, {Path.cwd()})")
        target = str(path)
    return _load(target, name)


@functools.lru_cache(maxsize=None)
def _load(target: str, name: str) -> Callable[..., Any]:
    """``name`` from the module ``target`` (a dotted name, or the absolute path of a ``.py`` file)."""
    try:
        if target.endswith(".py"):
            path = Path(target)
            # One module per file, under a name no import statement would collide with.
            module_name = "asyppo_reward_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {target!r}: {exc} (is it installed, or in the working directory?)") from None
    except Exception as exc:  # noqa: BLE001 - any error while running the user's module is theirs to see
        raise ValueError(f"importing {target!r} failed: {type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if function is None:
        raise ValueError(f"{target!r} has no {name!r}")
    if not callable(function):
        raise ValueError(f"{target}:{name} is a {type(function).__name__}, not a function")
    return function


def as_reward(result: Any) -> tuple[float | None, bool | None]:
    """A reward function's return value as ``(score, correct)``: a verdict gives ``(None, verdict)`` (the caller
    scores it), a number ``(score, None)``, a pair both. ``ValueError`` for anything else, or a score that is
    not finite."""
    if isinstance(result, tuple) and len(result) == 2:
        score, correct = result
        if not isinstance(correct, (bool, np.bool_, numbers.Integral)) or isinstance(score, bool):
            raise ValueError(f"returned {result!r}: a (score, correct) pair needs a number and a bool")
    elif isinstance(result, (bool, np.bool_)):
        return None, bool(result)
    else:
        score, correct = result, None
    if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(score):
        raise ValueError(f"returned {result!r}: expected a bool verdict, a finite score or a (score, correct) pair")
    return float(score), None if correct is None else bool(correct)


@dataclass(frozen=True)
class RewardFunction:
    """Outcome reward for one response (docs/algorithms.md §1); picklable, so it can be shipped to Ray actors (it
    carries the name of the reward function, which each process loads once).

    ``function`` is ``reward.function`` (None: the task's own verifier). ``correct`` / ``wrong`` score a verdict
    (default 1 / 0; ERC's recipe uses +1 / -1). DAPO overlong shaping is off unless ``max_length`` and ``buffer``
    are both set; it then adds ``overlong_penalty(response_length, max_length, buffer, factor)`` to the score.
    ``truncated_is_wrong`` makes a response cut off by the generation limit (no EOS) score as wrong even if its
    verdict is true; off by default, since a truncated response rarely states the answer anyway.
    """

    task: str = "arithmetic"
    function: str | None = None
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

    @property
    def scorer(self) -> Callable[..., Any]:
        """The reward function itself: ``reward.function``, or the task's verifier."""
        return load_reward_function(self.function) if self.function else TASKS[self.task].reward

    def __call__(self, prompt: str, response: str, answer: str, row: dict, *, response_length: int,
                 truncated: bool) -> Reward:
        """The reward of one response of ``response_length`` tokens (docs/algorithms.md §1); the function runs once."""
        score, correct = as_reward(self.scorer(prompt, response, answer, row))
        if score is None:  # a verdict
            accepted = correct and not (truncated and self.truncated_is_wrong)
            score = float(self.correct if accepted else self.wrong)
        elif correct is None:
            correct = score > 0
        if self.overlong_enabled:
            score += overlong_penalty(response_length, self.max_length, self.buffer, self.factor)
        return Reward(score, correct)
