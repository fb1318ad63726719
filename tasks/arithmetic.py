"""The built-in arithmetic task: problems such as ``37+45=`` -> ``82`` and their exact-answer verifier.

* ``arithmetic_problems`` generates word-free problems with operands of up to ``digits`` digits (default: the
  built-in task, ``ARITHMETIC_DIGITS`` and ``ARITHMETIC_OPERATORS``). Every possible problem belongs to exactly
  one split, decided by a stable hash of its text, so the ``eval`` problems are held out from training for any
  seed and count.
* ``verify_arithmetic`` accepts a response that states exactly the answer (docs/algorithms.md §1).

Registered as the task ``arithmetic`` in ``asyppo.tasks.registry``. No Ray import here.
"""

from __future__ import annotations

import random
import re
from decimal import Decimal, InvalidOperation
from typing import Literal

from asyppo.tasks.problems import Problem, is_heldout, problem_id

__all__ = ["ARITHMETIC_DIGITS", "ARITHMETIC_OPERATORS", "HELDOUT_FRACTION", "arithmetic_problems", "reward",
           "verify_arithmetic"]


# The built-in task (what ``builtin:arithmetic`` and the built-in models use): two operands below 100, "+".
# asyppo/tasks/tiny_models.py explains the choice.
ARITHMETIC_DIGITS = 2
ARITHMETIC_OPERATORS = "+"
# One problem in ten of the built-in task's problem space is held out for evaluation.
HELDOUT_FRACTION = 0.1
_OPERATORS = "+-*"
_MAX_DIGITS = 3  # 3 digits with three operators is ~3M problems, the most we enumerate in memory.


def _arithmetic_result(left: int, operator: str, right: int) -> int:
    if operator == "+":
        return left + right
    if operator == "-":
        return left - right
    return left * right


def arithmetic_problems(
    count: int | None,
    *,
    split: Literal["train", "eval"],
    seed: int = 0,
    digits: int = ARITHMETIC_DIGITS,
    operators: str = ARITHMETIC_OPERATORS,
) -> list[Problem]:
    """Deterministic problems of the built-in arithmetic task.

    A problem is ``f"{a}{op}{b}="`` with ``0 <= a, b < 10**digits`` and ``op`` in ``operators`` (a subset of
    ``+-*``); its answer is the exact integer result (negative for some subtractions). The whole problem space
    is enumerated and split by a stable hash of the problem text (``HELDOUT_FRACTION`` goes to ``eval``), so
    the splits never share a problem. ``count`` problems are then drawn without replacement with ``seed``
    (``None``: the whole split, shuffled). Same arguments, same list.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"arithmetic_problems: split must be 'train' or 'eval', got {split!r}")
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= _MAX_DIGITS:
        raise ValueError(f"arithmetic_problems: digits must be an int in [1, {_MAX_DIGITS}], got {digits!r}")
    if (
        not isinstance(operators, str)
        or not operators
        or any(op not in _OPERATORS for op in operators)
        or len(set(operators)) != len(operators)
    ):
        raise ValueError(
            f"arithmetic_problems: operators must be distinct characters from {_OPERATORS!r}, got {operators!r}"
        )
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"arithmetic_problems: count must be a positive int or None, got {count!r}")

    want_heldout = split == "eval"
    pool: list[tuple[str, int]] = []
    for operator in operators:
        for left in range(10**digits):
            for right in range(10**digits):
                prompt = f"{left}{operator}{right}="
                # A salt of its own, so that the split is not correlated with id-based critic shards.
                if is_heldout(prompt, b"asyppo-heldout:", HELDOUT_FRACTION) == want_heldout:
                    pool.append((prompt, _arithmetic_result(left, operator, right)))
    if count is not None and count > len(pool):
        raise ValueError(
            f"arithmetic_problems: asked for {count} {split} problems but the {split} split of "
            f"digits={digits}, operators={operators!r} holds only {len(pool)}"
        )
    rng = random.Random(f"asyppo-arithmetic:{seed}")
    chosen = rng.sample(pool, len(pool) if count is None else count)
    return [Problem(id=problem_id(prompt), prompt=prompt, answer=str(result)) for prompt, result in chosen]


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
    """Exact-answer check for the built-in arithmetic task (docs/algorithms.md §1).

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


def reward(prompt: str, response: str, answer: str, row: dict) -> bool:
    """The arithmetic task's reward function (``reward.function=asyppo.tasks.arithmetic:reward``, the default for
    ``data.task=arithmetic``): the verifier's verdict, scored ``reward.correct`` / ``reward.wrong``."""
    return verify_arithmetic(response, answer)
