"""The ``math`` task's verifier: the answer a response gives (``final_answer``) checked against the reference with
the ``math-verify`` package (docs/algorithms.md §1, docs/rewards.md "The math verifier").

The task has no built-in data or models: point ``data.train`` / ``data.eval`` at local files of
``{"question": ..., "answer": ...}`` rows and ``model.*`` at local Hugging Face directories.

Registered as the task ``math`` in ``asyppo.tasks.registry``. No Ray import here.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["final_answer", "reward", "verify_math"]


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


# ---------------------------------------------------------------------------------------------------------------
# Which part of the response is its answer (pure text rules; the equivalence is math-verify's).

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "#### 72" (GSM8K), "the answer is 72", "Answer: 72", "**Final answer:** 72", "answer = 72". "The answer to 9+5 is"
# is not one: "answer" must be followed by "is", ":" or "=" (markdown bold allowed in between).
_STATEMENT = re.compile(r"####|\banswer\b\s*\**\s*(?:is\b\s*:?|[:=])", re.IGNORECASE)
_INTEGER = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"  # 1,234 or 1234
_DECIMAL = rf"(?:{_INTEGER}(?:\.\d+)?|\.\d+)"
# A number as a response writes it: sign (not a minus between two operands: 48-24 holds 24), digits with optional
# thousands separators, decimals, a fraction a/b, or a LaTeX fraction \frac{a}{b} (\dfrac, \tfrac). Not an
# exponent or subscript (x^2, a_1).
_NUMBER = re.compile(
    rf"(?P<sign>(?<![\w)\]}}])[-\u2212])?"
    rf"(?:(?<![\w.^_])(?P<plain>{_DECIMAL}(?:/\d+(?:\.\d+)?(?!\d|\.\d))?)"
    rf"|\\[dt]?frac\s*\{{\s*(?P<numerator>{_DECIMAL})\s*\}}\s*\{{\s*(?P<denominator>{_DECIMAL})\s*\}})"
)
_PROSE_WORDS = re.compile(r"(?:[A-Za-z]{2,}\b:?\s*)*")  # whole words: one way to match, no backtracking
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_MATH_DELIMITERS = re.compile(r"\$|\\[()\[\]]")


def _number_text(match: re.Match[str]) -> str:
    sign = "-" if match.group("sign") else ""
    if match.group("plain") is not None:
        return sign + match.group("plain").replace(",", "")
    numerator, denominator = (match.group(g).replace(",", "") for g in ("numerator", "denominator"))
    return f"{sign}\\frac{{{numerator}}}{{{denominator}}}"


def _closing_braces(text: str) -> dict[int, int]:
    """Index of each ``{`` in ``text`` -> index of the ``}`` that closes it (escaped ``\\{`` / ``\\}`` are not
    braces). One linear pass, so many unclosed boxes cost no more than one."""
    closing: dict[int, int] = {}
    stack: list[int] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            stack.append(index)
        elif char == "}" and stack:
            closing[stack.pop()] = index
        index += 1
    return closing


def _last_box(response: str) -> str | None:
    openings = list(_BOX_OPEN.finditer(response))
    if not openings:
        return None
    closing = _closing_braces(response)
    for match in reversed(openings):
        brace = match.end() - 1
        if brace in closing:
            content = response[brace + 1 : closing[brace]].strip()
            if content:
                return content
    return None


def _stated_answer(statement: str) -> str | None:
    """The answer in the text after "the answer is" / "Answer:" / "####" (to the end of its line)."""
    text = statement.lstrip(" \t*_:")
    text = text[_PROSE_WORDS.match(text).end() :]  # "the answer is therefore 14", "... is: indeed 14"
    if not text or text[0] in ",;.!?":  # only prose: "the answer is correct, since ..." states no answer
        return None
    span = _MATH_SPAN.match(text)
    if span is not None:
        content = next(group for group in span.groups() if group is not None).strip()
        return content or None
    number = _NUMBER.match(text)
    if number is not None:
        rest = text[number.end() :]
        # 14 / 14. / 14 apples / 14, not 3 / $14$ -- but not 2 + 3i or 2\sqrt{2}, which are read whole.
        if not rest or rest[0] in ".,;:!?)$%" or (rest[0].isspace() and not re.match(r"\s*[-+*/^=<>]", rest)):
            return _number_text(number)
    sentence = re.split(r"\.(?:\s|$)|;", text, maxsplit=1)[0]
    sentence = _MATH_DELIMITERS.sub("", sentence).strip().rstrip(".,:!?").strip()
    return sentence or None


def final_answer(response: str) -> str | None:
    """The answer ``response`` gives, as text for math-verify to parse; None when it gives none.

    Rules, first that applies:

    1. the last ``\\boxed{...}`` or ``\\fbox{...}`` with balanced braces and non-empty content: its content, even
       when numbers follow it (``"\\boxed{5} (not 6)"`` -> ``"5"``, ``"\\boxed{70}. Check: 48+24=72"`` -> ``"70"``);
    2. the last explicit statement -- GSM8K's ``#### N``, ``the answer is N``, ``Answer: N``,
       ``final answer: N`` (any case; ``**Answer:**`` too): from the rest of its line, after leading prose words
       (``"the answer is therefore 14"``), a math span's content (``"$\\frac{1}{2}$"`` -> ``"\\frac{1}{2}"``), else
       a number standing on its own (``"14 apples"`` -> ``"14"``, ``"1,234."`` -> ``"1234"``), else the text to the
       end of the sentence (``"x = 4"``, ``"2\\sqrt{2}"``, ``"(1, 2]"``). A statement that is only prose
       (``"the answer is correct, since ..."``) is skipped;
    3. the last number anywhere: integers, decimals, negatives (a minus between operands is not a sign: ``48-24``
       gives ``24``), fractions ``3/4``, LaTeX fractions ``\\frac{3}{4}``, thousands separators (``1,234`` ->
       ``"1234"``); a trailing ``.``, a ``$`` before or a ``%`` after is not part of it, and an exponent or
       subscript is not a number (``x^2``, ``a_1``).

    Never an expression elsewhere in the text: ``"The answer to 9+5 is 12"`` gives ``"12"`` (not ``9+5``), and
    ``"I think 3 or 14"`` gives ``"14"`` (the last number; a hedge is judged by its last candidate).

    >>> final_answer("#### 72"), final_answer("So the answer is 0.5."), final_answer("The total is 1,234 dollars.")
    ('72', '0.5', '1234')
    """
    box = _last_box(response)
    if box is not None:
        return box
    statements = list(_STATEMENT.finditer(response))
    for index in reversed(range(len(statements))):
        # A statement's text runs to the end of its line or to the next statement, so each character is read once.
        end = statements[index + 1].start() if index + 1 < len(statements) else len(response)
        newline = response.find("\n", statements[index].end(), end)
        stated = _stated_answer(response[statements[index].end() : end if newline < 0 else newline])
        if stated is not None:
            return stated
    numbers = list(_NUMBER.finditer(response))
    return _number_text(numbers[-1]) if numbers else None


def _math_verify_gold_text(answer: str) -> str:
    """Reference answers are usually bare LaTeX (``\\frac{1}{2}``); math-verify extracts LaTeX reliably only
    from a math environment or ``\\boxed{}``, so a bare answer is wrapped in ``$...$``."""
    if "$" in answer or "\\boxed" in answer or "\\(" in answer or "\\[" in answer:
        return answer
    return f"${answer}$"


def _verify_math_untimed(response: str, answer: str, signal_timeout: int | None) -> bool:
    from math_verify import LatexExtractionConfig, parse, verify

    gold = parse(_math_verify_gold_text(answer), parsing_timeout=signal_timeout)
    if not gold:
        raise ValueError(f"verify_math: math-verify could not parse the reference answer {answer!r}")
    given = final_answer(response)
    if given is None:
        return False
    # Only the given answer is parsed, as one LaTeX expression: math-verify's own extraction, which picks any
    # expression out of free text, never sees the rest of the response.
    predicted = parse(
        f"\\boxed{{{given}}}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
        parsing_timeout=signal_timeout,
    )
    if not predicted:
        return False
    return bool(verify(gold, predicted, timeout_seconds=signal_timeout))


def verify_math(response: str, answer: str, *, timeout_seconds: int = 5) -> bool:
    """Math answer check with the ``math-verify`` package (docs/algorithms.md §1).

    The reference ``answer`` is parsed as LaTeX (wrapped in ``$...$`` when bare). Of the response only the answer
    it gives is judged: ``final_answer`` (the last ``\\boxed{}``, else the last "the answer is" / "Answer:" /
    ``####`` statement, else the last number), parsed as LaTeX; no answer found is wrong. The two are compared
    with ``math_verify.verify`` (numeric, symbolic, set/interval equivalence), so ``\\frac{1}{2}`` and ``0.5``
    match, while "The answer to 9+5 is 12" is wrong for 14 (its answer is 12, not the restated ``9+5``).

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
