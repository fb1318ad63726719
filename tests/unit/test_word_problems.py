"""The built-in ``words`` task (tasks/word_problems.py): problems, splits and the verdicts of its verifier."""

from __future__ import annotations

import re

import pytest

from asyppo.tasks.registry import TASKS, load_problems
from asyppo.tasks.word_problems import INSTRUCTION, word_problems

QUESTION = re.compile(r"(?:What is (\d+) (plus|minus|\+|-) (\d+)\?|Sam has (\d+) apples and (gets|gives) (\d+) .*)")


def solve(prompt: str) -> int:
    """The answer read back from the English question (independent of the generator's arithmetic)."""
    assert prompt.endswith(" " + INSTRUCTION)
    match = QUESTION.fullmatch(prompt.removesuffix(" " + INSTRUCTION))
    assert match, prompt
    a, word, b = (match.group(1), match.group(2), match.group(3)) if match.group(1) else match.group(4, 5, 6)
    return int(a) + int(b) if word in ("plus", "+", "gets") else int(a) - int(b)


def test_every_problem_is_answered_by_its_question_and_the_splits_are_disjoint():
    train, held_out = word_problems(None, split="train"), word_problems(None, split="eval")
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    # 2 phrasings × (100 sums + 55 differences with a ≥ b): every problem in exactly one split.
    assert len(train) + len(held_out) == 2 * (10 * 10 + 10 * 11 // 2)
    assert 0.18 < len(held_out) / (len(train) + len(held_out)) < 0.32
    for problem in train + held_out:
        assert int(problem.answer) == solve(problem.prompt) >= 0
    stories = word_problems(None, split="eval", max_operand=20, phrasings=("story",))
    assert all(int(p.answer) == solve(p.prompt) >= 0 for p in stories) and max(int(p.answer) for p in stories) <= 40


def test_draws_are_deterministic_and_the_knobs_shape_the_space():
    assert word_problems(16, split="train", seed=3) == word_problems(16, split="train", seed=3)
    assert word_problems(16, split="train", seed=3) != word_problems(16, split="train", seed=4)
    small = word_problems(None, split="train", max_operand=5, operators="+", phrasings=("words",))
    assert all(p.prompt.startswith("What is ") and " plus " in p.prompt and int(p.answer) <= 10 for p in small)
    assert load_problems("builtin:words", split="eval", limit=8) == word_problems(8, split="eval")
    with pytest.raises(ValueError, match="operators"):
        word_problems(4, split="train", operators="*")
    with pytest.raises(ValueError, match="holds only"):
        word_problems(10_000, split="eval")


@pytest.mark.parametrize("response, correct", [
    ("14", True), ("The answer is 14.", True), ("9 + 5 = 14", True), ("Sam has 14 apples now.", True),
    ("9 + 5", False),  # the question restated: its last number is 5
    ("13", False), ("To find 9 plus 5, we", False), ("", False),
])
def test_the_verifier_judges_the_answer_the_response_gives(response, correct):
    assert TASKS["words"].verify(response, "14") is correct
