"""The built-in chain task: problems, canonical chains, the verifier and the response lengths it promises."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyppo.tasks.chain import CHAIN_OPERANDS, CHAIN_POOL, chain_problems, chain_solution, verify_chain
from asyppo.tasks.registry import TASKS, load_problems
from asyppo.tasks.tiny_models import CHAIN_ALPHABET, CHAIN_RECIPE, char_tokenizer


def test_splits_are_disjoint_full_and_the_same_for_every_seed() -> None:
    train = chain_problems(None, split="train", seed=0)
    heldout = chain_problems(None, split="eval", seed=0)
    assert (len(train), len(heldout)) == (CHAIN_POOL["train"], CHAIN_POOL["eval"])
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    assert len({p.prompt for p in train}) == len(train)
    other_seed = chain_problems(None, split="eval", seed=7)
    assert {p.prompt for p in other_seed} == {p.prompt for p in heldout}
    assert [p.prompt for p in other_seed] != [p.prompt for p in heldout]  # the seed orders the split
    assert chain_problems(20, split="train", seed=3) == chain_problems(20, split="train", seed=3)


def test_problems_have_4_or_5_operands_below_100_and_their_sum_as_answer() -> None:
    for problem in chain_problems(2000, split="train", seed=1):
        operands = [int(x) for x in problem.prompt.removesuffix("=").split("+")]
        assert len(operands) in CHAIN_OPERANDS and all(0 <= x < 100 for x in operands)
        assert int(problem.answer) == sum(operands)


@given(st.lists(st.integers(0, 99), min_size=2, max_size=6))
def test_the_canonical_chain_adds_one_operand_per_step(operands: list[int]) -> None:
    chain = chain_solution("+".join(map(str, operands)) + "=")
    steps = [tuple(map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", step).groups())) for step in chain.split(";")]
    assert len(steps) == len(operands) - 1
    running = operands[0]
    for (left, right, result), operand in zip(steps, operands[1:]):
        assert (left, right, result) == (running, operand, running + operand)
        running = result
    assert verify_chain(chain, str(sum(operands)))


@pytest.mark.parametrize("response, correct", [
    ("12+30=42;42+5=47", True),
    ("  12+30=42;42+5=47\n", True),
    ("12+30=40;40+7=47", True),   # judged on the outcome: a slip corrected later still ends at the answer
    ("12+30=42;42+5=48", False),  # one wrong digit in the last step
    ("47", False),                # the answer alone is not a chain
    ("12+30=42;42+5=47;", False),
    ("12+30=42 42+5=47", False),
    ("12+30=42;;42+5=47", False),
    ("", False),
])
def test_verifier_accepts_a_well_formed_chain_ending_in_the_answer(response: str, correct: bool) -> None:
    assert verify_chain(response, "47") is correct


def test_verifier_refuses_an_unusable_reference() -> None:
    with pytest.raises(ValueError, match="not a non-negative integer"):
        verify_chain("1+2=3", "three")


def test_responses_are_20_to_60_tokens_and_fit_the_recipe_limit() -> None:
    tokenizer = char_tokenizer(CHAIN_ALPHABET)
    lengths = [len(tokenizer.encode(chain_solution(p.prompt), add_special_tokens=False)) + 1  # + EOS
               for p in chain_problems(None, split="eval", seed=0)]
    assert 20 <= min(lengths) and max(lengths) <= CHAIN_RECIPE.max_response_tokens <= 60
    assert 30 <= sum(lengths) / len(lengths) <= 40


def test_registered_with_its_dataset_and_models() -> None:
    task = TASKS["chain"]
    assert task.verify is verify_chain and task.builtin_models is not None
    problems = load_problems("builtin:chain", split="eval", limit=8, seed=0)
    assert problems == chain_problems(8, split="eval", seed=0)
