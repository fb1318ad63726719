"""Rule-based reward verifiers (ALGORITHMS.md §1).

One scalar per response: ``correct`` when the verifier accepts the response, ``wrong`` otherwise, plus the
optional DAPO overlong shaping. The learner places that scalar on the last valid response token; this module
only scores text.

Two verifiers:

* ``verify_arithmetic`` for the built-in arithmetic task (exact numeric answer).
* ``verify_math`` for math datasets, built on the ``math-verify`` package.

This module is plain Python (no Ray import) so it can be used and tested anywhere; reward workers call it.
"""

from __future__ import annotations

import logging
import math
import operator
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

logger = logging.getLogger(__name__)

__all__ = [
    "RewardFunction",
    "overlong_penalty",
    "verify_arithmetic",
    "verify_math",
]

# A plain decimal number: optional sign, digits, optional fractional part. No exponent, no thousands separators.
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def _parse_number(text: str) -> Decimal | None:
    """The number ``text`` states, if ``text`` is exactly one plain decimal number; else ``None``."""
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regex already rules this out
        return None


def verify_arithmetic(response: str, answer: str) -> bool:
    """Exact-answer check for the built-in arithmetic task (ALGORITHMS.md §1).

    ``response`` is the text the policy generated after the prompt, with the EOS text already removed by the
    caller. It counts as correct when, after stripping leading and trailing whitespace, it is exactly one plain
    decimal number (optional sign, digits, optional fractional part) whose value equals ``answer``'s. Anything
    else in the response -- a second number, a trailing ``=``, words, an empty response -- makes it wrong: the
    policy has to state the answer and stop. Values are compared exactly (``Decimal``), so ``"07"`` and
    ``"7.0"`` state the same number as ``"7"``.

    Raises ``TypeError`` for non-string arguments and ``ValueError`` when ``answer`` itself is not a plain
    number (a bad reference answer is a data error, not a wrong response).
    """
    if not isinstance(response, str):
        raise TypeError(f"verify_arithmetic: response must be a str, got {type(response).__name__}")
    if not isinstance(answer, str):
        raise TypeError(f"verify_arithmetic: answer must be a str, got {type(answer).__name__}")
    expected = _parse_number(answer.strip())
    if expected is None:
        raise ValueError(f"verify_arithmetic: reference answer {answer!r} is not a plain decimal number")
    stated = _parse_number(response.strip())
    return stated is not None and stated == expected


# ---------------------------------------------------------------------------------------------------------
# math-verify
# ---------------------------------------------------------------------------------------------------------


class _DeadlineExceeded(Exception):
    """Raised by ``_call_with_deadline`` when the worker thread did not finish in time."""


def _call_with_deadline(function: Callable[[], Any], timeout_seconds: float) -> Any:
    """Run ``function`` in a daemon thread and wait at most ``timeout_seconds`` for it.

    math-verify bounds its own work with ``signal.alarm``, which Python only allows on the main thread; reward
    workers may run inside Ray actor threads. Off the main thread we therefore run math-verify without its
    timeouts in a separate daemon thread and stop *waiting* at the deadline. Python cannot kill a thread, so a
    pathological sympy computation keeps running in the background until it ends on its own, but the caller is
    never blocked longer than the deadline.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=target, name="verify-math", daemon=True)
    worker.start()
    worker.join(timeout_seconds)
    if worker.is_alive():
        raise _DeadlineExceeded(f"did not finish within {timeout_seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _math_verify_gold_text(answer: str) -> str:
    """Reference answers are usually bare LaTeX (``\\frac{1}{2}``); math-verify extracts LaTeX reliably only
    from a math environment or ``\\boxed{}``, so a bare answer is wrapped in ``$...$``."""
    if "$" in answer or "\\boxed" in answer or "\\(" in answer or "\\[" in answer:
        return answer
    return f"${answer}$"


def _verify_math_untimed(response: str, answer: str, signal_timeout: int | None) -> bool:
    from math_verify import parse, verify

    gold = parse(_math_verify_gold_text(answer), parsing_timeout=signal_timeout)
    if not gold:
        raise ValueError(f"verify_math: math-verify could not parse the reference answer {answer!r}")
    predicted = parse(response, parsing_timeout=signal_timeout)
    if not predicted:
        return False
    return bool(verify(gold, predicted, timeout_seconds=signal_timeout))


def verify_math(response: str, answer: str, *, timeout_seconds: int = 5) -> bool:
    """Math answer check with the ``math-verify`` package (ALGORITHMS.md §1).

    The reference ``answer`` is parsed as LaTeX (wrapped in ``$...$`` when bare); the response is parsed with
    math-verify's default extraction (LaTeX environments, ``\\boxed{}``, plain expressions), and the two are
    compared with ``math_verify.verify`` (numeric, symbolic, set/interval equivalence). So ``\\frac{1}{2}``
    and ``0.5`` match.

    Never hangs or crashes on garbage responses: unparsable text is simply wrong, and each call is bounded by
    ``timeout_seconds`` (a timeout counts as wrong, with a warning). On the main thread math-verify's own
    signal-based timeouts apply; on any other thread (Ray actor threads, thread pools) the check runs in a
    helper thread that is abandoned at the deadline, see ``_call_with_deadline``.

    Raises ``TypeError`` for non-string arguments and ``ValueError`` when the reference answer cannot be parsed
    (a data error).
    """
    if not isinstance(response, str):
        raise TypeError(f"verify_math: response must be a str, got {type(response).__name__}")
    if not isinstance(answer, str):
        raise TypeError(f"verify_math: answer must be a str, got {type(answer).__name__}")
    if not answer.strip():
        raise ValueError("verify_math: the reference answer is empty")
    if timeout_seconds < 1:
        raise ValueError(f"verify_math: timeout_seconds must be >= 1, got {timeout_seconds}")

    if threading.current_thread() is threading.main_thread():
        # math-verify reports its own timeouts by returning an empty parse / False, with a warning.
        return _verify_math_untimed(response, answer, signal_timeout=int(timeout_seconds))
    try:
        return _call_with_deadline(lambda: _verify_math_untimed(response, answer, None), timeout_seconds)
    except _DeadlineExceeded:
        logger.warning("verify_math: gave up after %s s on a response of %d chars", timeout_seconds, len(response))
        return False


# ---------------------------------------------------------------------------------------------------------
# Shaping and the reward function
# ---------------------------------------------------------------------------------------------------------


def _as_int(name: str, value: Any) -> int:
    """``value`` as a Python int; accepts numpy / torch integer scalars, rejects bools, floats and the rest."""
    if isinstance(value, bool):
        raise TypeError(f"overlong_penalty: {name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"overlong_penalty: {name} must be an integer, got {value!r}") from None


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float) -> float:
    """DAPO soft overlong punishment (ALGORITHMS.md §1).

    ``expected = max_length - buffer``; the penalty is ``min(-(length - expected) / buffer * factor, 0)``:
    zero up to ``expected`` tokens, then falling linearly to ``-factor`` at ``max_length`` (and, as the spec's
    formula states, further below for longer responses). ``length`` is the response length in tokens.
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


Task = Literal["arithmetic", "math"]
_VERIFIERS: dict[str, Callable[[str, str], bool]] = {
    "arithmetic": verify_arithmetic,
    "math": verify_math,
}


@dataclass(frozen=True)
class RewardFunction:
    """Outcome reward for one response (ALGORITHMS.md §1); picklable, so it can be shipped to Ray actors.

    ``correct`` / ``wrong`` are the scores for accepted / rejected responses (the spec's default 1 / 0; ERC's
    recipe uses +1 / -1). DAPO overlong shaping is off unless ``max_length`` and ``buffer`` are both set; it
    then adds ``overlong_penalty(response_length, max_length, buffer, factor)`` to the score.
    ``truncated_is_wrong`` makes a response cut off by the generation limit (no EOS) score as wrong even if its
    text happens to state the answer; off by default, since a truncated response rarely states it anyway.
    """

    task: Task = "arithmetic"
    correct: float = 1.0
    wrong: float = 0.0
    max_length: int | None = None
    buffer: int | None = None
    factor: float = 1.0
    truncated_is_wrong: bool = False

    def __post_init__(self) -> None:
        if self.task not in _VERIFIERS:
            raise ValueError(f"RewardFunction: task must be one of {sorted(_VERIFIERS)}, got {self.task!r}")
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

    def is_correct(self, response_text: str, answer: str) -> bool:
        """Whether the verifier of ``task`` accepts the response (logged as accuracy, apart from the reward)."""
        return _VERIFIERS[self.task](response_text, answer)

    def __call__(self, response_text: str, answer: str, *, response_length: int, truncated: bool) -> float:
        """The scalar reward of one response of ``response_length`` tokens (ALGORITHMS.md §1)."""
        accepted = self.is_correct(response_text, answer) and not (truncated and self.truncated_is_wrong)
        reward = float(self.correct if accepted else self.wrong)
        if self.overlong_enabled:
            reward += overlong_penalty(response_length, self.max_length, self.buffer, self.factor)
        return reward
