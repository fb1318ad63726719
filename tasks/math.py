"""The ``math`` task's verifier: answers checked with the ``math-verify`` package (docs/algorithms.md §1).

The task has no built-in data or models: point ``data.train`` / ``data.eval`` at local files of
``{"question": ..., "answer": ...}`` rows and ``model.*`` at local Hugging Face directories.

Registered as the task ``math`` in ``asyppo.tasks.registry``. No Ray import here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["reward", "verify_math"]


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
    """Math answer check with the ``math-verify`` package (docs/algorithms.md §1).

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


def reward(prompt: str, response: str, answer: str, row: dict) -> bool:
    """The math task's reward function (``reward.function=asyppo.tasks.math:reward``, the default for
    ``data.task=math``): the verifier's verdict, scored ``reward.correct`` / ``reward.wrong``."""
    return verify_math(response, answer)
