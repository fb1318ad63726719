"""The built-in ``chain`` task: sums of several numbers, answered by writing out every partial sum.

``23+58+17+6=`` is answered ``23+58=81;81+17=98;98+6=104``: one step per ``+``, each step starting from the
previous step's result. Only the last result decides the reward, and it is right only if every partial sum before
it was, so a response of 25-45 tokens succeeds or fails on a few of them: the task where token-level credit
assignment has something to act on (the ``arithmetic`` task's answers are ~3.5 tokens long).

* ``chain_problems`` draws the problems: 4 or 5 operands below 100 (``CHAIN_OPERANDS``, ``CHAIN_DIGITS``). The
  problem space is too large to enumerate, so a fixed stream of problems (independent of the seed) is split by a
  stable hash of the problem text into ``CHAIN_POOL`` train and eval problems; ``seed`` then picks from a split.
  The two splits never share a problem.
* ``chain_solution`` writes the canonical response of a problem (what the built-in policy is warmed up on).
* ``verify_chain`` accepts a response that is a well-formed chain ending in the reference answer.

Registered as the task ``chain`` in ``asyppo.tasks.registry``. No Ray import here.
"""

from __future__ import annotations

import random
import re
from typing import Literal

from asyppo.tasks.problems import Problem, is_heldout, problem_id

__all__ = ["CHAIN_DIGITS", "CHAIN_OPERANDS", "CHAIN_POOL", "chain_problems", "chain_solution", "reward", "verify_chain"]


CHAIN_DIGITS = 2  # operands 0-99
CHAIN_OPERANDS = (4, 5)  # operands per problem: 3 or 4 steps, 25-45 response tokens
CHAIN_POOL = {"train": 50_000, "eval": 5_000}  # problems in each split
_HELDOUT_FRACTION = 0.1

# One step ``a+b=c``; a response is steps joined by ``;``.
_STEP = re.compile(r"(\d+)\+(\d+)=(\d+)")


def _operands(prompt: str) -> list[int]:
    if not re.fullmatch(r"\d+(?:\+\d+)+=", prompt):
        raise ValueError(f"chain: {prompt!r} is not a sum such as '23+58+17+6='")
    return [int(part) for part in prompt[:-1].split("+")]


def chain_solution(prompt: str) -> str:
    """The canonical response: ``a+b=s1;s1+c=s2;...`` for the prompt ``a+b+c+...=``."""
    operands = _operands(prompt)
    steps, total = [], operands[0]
    for operand in operands[1:]:
        steps.append(f"{total}+{operand}={total + operand}")
        total += operand
    return ";".join(steps)


def _pools() -> dict[str, list[tuple[str, int]]]:
    """Both splits, drawn once from a fixed stream (not from the seed), so every seed shares one held-out set."""
    rng = random.Random("asyppo-chain-pool")
    pools: dict[str, list[tuple[str, int]]] = {"train": [], "eval": []}
    seen: set[str] = set()
    while any(len(pools[split]) < size for split, size in CHAIN_POOL.items()):
        operands = [rng.randrange(10**CHAIN_DIGITS) for _ in range(rng.choice(CHAIN_OPERANDS))]
        prompt = "+".join(map(str, operands)) + "="
        if prompt in seen:
            continue
        seen.add(prompt)
        split = "eval" if is_heldout(prompt, b"asyppo-chain-heldout:", _HELDOUT_FRACTION) else "train"
        if len(pools[split]) < CHAIN_POOL[split]:
            pools[split].append((prompt, sum(operands)))
    return pools


_POOLS: dict[str, list[tuple[str, int]]] | None = None


def chain_problems(count: int | None, *, split: Literal["train", "eval"], seed: int = 0) -> list[Problem]:
    """``count`` problems of the ``split`` (``None``: the whole split), drawn without replacement with ``seed``.

    The answer is the sum of the operands. Same arguments, same list.
    """
    global _POOLS
    if split not in CHAIN_POOL:
        raise ValueError(f"chain_problems: split must be 'train' or 'eval', got {split!r}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"chain_problems: count must be a positive int or None, got {count!r}")
    if _POOLS is None:
        _POOLS = _pools()
    pool = _POOLS[split]
    if count is not None and count > len(pool):
        raise ValueError(f"chain_problems: asked for {count} {split} problems but the split holds {len(pool)}")
    rng = random.Random(f"asyppo-chain:{seed}")
    chosen = rng.sample(pool, len(pool) if count is None else count)
    return [Problem(id=problem_id(prompt), prompt=prompt, answer=str(total)) for prompt, total in chosen]


def verify_chain(response: str, answer: str) -> bool:
    """Correct when the response is a chain of steps ``a+b=c`` joined by ``;`` and its last ``c`` is the answer.

    Only the final result is compared with the reference, so the response is judged on its outcome, as a reward
    on a real reasoning task would be; the partial sums decide it because each step starts from the previous
    result. Whitespace around the response is ignored; anything else (words, a trailing ``;``, a missing step
    separator) makes it wrong. Raises ``ValueError`` when ``answer`` is not a non-negative integer.
    """
    if not isinstance(response, str) or not isinstance(answer, str):
        raise TypeError("verify_chain: response and answer must be str")
    if not answer.strip().isdigit():
        raise ValueError(f"verify_chain: reference answer {answer!r} is not a non-negative integer")
    steps = response.strip().split(";")
    matches = [_STEP.fullmatch(step) for step in steps]
    if not all(matches):
        return False
    return int(matches[-1].group(3)) == int(answer.strip())


def reward(prompt: str, response: str, answer: str, row: dict) -> bool:
    """The chain task's reward function (``reward.function=asyppo.tasks.chain:reward``, the default for
    ``data.task=chain``): the verifier's verdict, scored ``reward.correct`` / ``reward.wrong``."""
    return verify_chain(response, answer)
