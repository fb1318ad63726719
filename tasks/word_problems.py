"""The built-in ``words`` task: small sums and differences asked in English, answered with a number. It is made for
pretrained instruct models used with their chat template (``builtin:smollm2-135m-instruct``, examples/smollm2.yaml):
the tiny built-in models cannot read it.

* ``word_problems`` generates the problems: ``"What is 9 plus 5? Answer with just the number."`` -> ``14``, the same
  with symbols (``"What is 9 + 5? ..."``), or told as a story (``"Sam has 9 apples and gets 5 more. ..."``). The
  knobs set the difficulty: operands from 0 to ``max_operand``, the ``operators`` (``+``, ``-``; a difference is
  never negative) and the ``phrasings``. Every possible problem belongs to one split, by a stable hash of its text,
  so the ``eval`` problems are held out from training for any seed and count.
* The verifier is the ``math`` task's: the answer the response gives (a lone number, "The answer is 14.",
  "9 + 5 = 14", the last number otherwise), never a number restated from the question (docs/rewards.md).

Registered as the task ``words`` in ``asyppo.tasks.registry``. No Ray import here.
"""

from __future__ import annotations

import random
from typing import Literal

from asyppo.tasks.problems import Problem, is_heldout, problem_id

__all__ = ["PHRASINGS", "WORDS_MAX_OPERAND", "WORDS_OPERATORS", "WORDS_PHRASINGS", "word_problems"]

# The built-in task (builtin:words): single-digit operands, both operators, asked in words and with symbols.
# SmolLM2-135M-Instruct (measured on 48 such problems × 4 samples) answers 0.54-0.71 greedily and 0.25-0.28 when
# sampling at temperature 0.7, 0.15-0.19 at temperature 1: room to learn. Operands up to 20 fall to 0.05-0.10
# sampled; the story phrasing is harder still.
WORDS_MAX_OPERAND = 9
WORDS_OPERATORS = "+-"
WORDS_PHRASINGS = ("words", "symbols")
INSTRUCTION = "Answer with just the number."
# A quarter held out: the default space is small (310 problems), and the held-out set should still hold ~75.
HELDOUT_FRACTION = 0.25

# Per operator: how a question can ask it. {a} and {b} are the operands.
PHRASINGS: dict[str, dict[str, str]] = {
    "words": {"+": "What is {a} plus {b}?", "-": "What is {a} minus {b}?"},
    "symbols": {"+": "What is {a} + {b}?", "-": "What is {a} - {b}?"},
    "story": {"+": "Sam has {a} apples and gets {b} more. How many apples does Sam have now?",
              "-": "Sam has {a} apples and gives {b} away. How many apples does Sam have left?"},
}


def word_problems(
    count: int | None,
    *,
    split: Literal["train", "eval"],
    seed: int = 0,
    max_operand: int = WORDS_MAX_OPERAND,
    operators: str = WORDS_OPERATORS,
    phrasings: tuple[str, ...] = WORDS_PHRASINGS,
) -> list[Problem]:
    """Deterministic problems of the ``words`` task: for ``0 <= a, b <= max_operand``, each operator in
    ``operators`` (``a - b`` only when ``a >= b``) and each phrasing, the question and `INSTRUCTION`; the answer is
    the exact result. The whole space is split by a stable hash of the prompt (a quarter held out), then ``count``
    problems are drawn without replacement with ``seed`` (``None``: the whole split, shuffled)."""
    if split not in ("train", "eval"):
        raise ValueError(f"word_problems: split must be 'train' or 'eval', got {split!r}")
    if isinstance(max_operand, bool) or not isinstance(max_operand, int) or not 1 <= max_operand <= 999:
        raise ValueError(f"word_problems: max_operand must be an int in [1, 999], got {max_operand!r}")
    if not operators or any(op not in "+-" for op in operators) or len(set(operators)) != len(operators):
        raise ValueError(f"word_problems: operators must be distinct characters from '+-', got {operators!r}")
    if not phrasings or any(name not in PHRASINGS for name in phrasings):
        raise ValueError(f"word_problems: phrasings must be names from {sorted(PHRASINGS)}, got {phrasings!r}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"word_problems: count must be a positive int or None, got {count!r}")

    pool: list[tuple[str, int]] = []
    for name in phrasings:
        for operator in operators:
            for a in range(max_operand + 1):
                for b in range(max_operand + 1):
                    if operator == "-" and b > a:
                        continue
                    prompt = f"{PHRASINGS[name][operator].format(a=a, b=b)} {INSTRUCTION}"
                    if is_heldout(prompt, b"asyppo-words-heldout:", HELDOUT_FRACTION) == (split == "eval"):
                        pool.append((prompt, a + b if operator == "+" else a - b))
    if count is not None and count > len(pool):
        raise ValueError(f"word_problems: asked for {count} {split} problems but the {split} split holds only "
                         f"{len(pool)}")
    rng = random.Random(f"asyppo-words:{seed}")
    chosen = rng.sample(pool, len(pool) if count is None else count)
    return [Problem(id=problem_id(prompt), prompt=prompt, answer=str(result)) for prompt, result in chosen]
