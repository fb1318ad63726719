"""The tasks this project knows, and where a dataset source resolves to problems.

A task is what ``data.task`` names: a verifier that decides whether a response is correct, and optionally a
built-in dataset (``data.train: builtin:<task>``) and built-in models (``model.policy: builtin:tiny``). The config
takes its allowed task names from ``TASKS``, so adding a task is one new module in this package plus one entry
below (docs/tasks.md walks through it).

No Ray import here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asyppo.tasks import arithmetic, chain, math, word_problems
from asyppo.tasks.problems import DatasetError, Problem, apply_template, load_problem_file

__all__ = ["BUILTIN_PREFIX", "TASKS", "Task", "load_problems"]

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Task:
    """One task.

    ``verify(response_text, answer) -> bool``: whether a response is correct (raise ``ValueError`` when the
    reference answer itself is unusable: that is a data error, not a wrong response).
    ``reward(prompt, response, answer, row) -> bool``: the same verdict as a reward function
    (``asyppo.tasks.rewards``), what ``reward.function`` defaults to.
    ``builtin_problems(count, *, split, seed) -> list[Problem]``: the task's own dataset (``split`` is ``train``
    or ``eval``, disjoint; ``count=None`` gives the whole split), or None when the task has none.
    ``builtin_models(seed, log) -> BuiltinModels``: the task's own small policy and critic, or None.
    """

    name: str
    verify: Callable[[str, str], bool]
    reward: Callable[[str, str, str, dict], bool]
    builtin_problems: Callable[..., list[Problem]] | None = None
    builtin_models: Callable[[int, Callable[[str], None]], Any] | None = None


# The built-in models are bootstrapped by asyppo.tasks.tiny_models, imported on demand: it needs transformers and
# tokenizers, which reading a config or a dataset does not.
def _arithmetic_models(seed: int, log: Callable[[str], None]):
    """The arithmetic task's ``builtin:tiny`` and ``builtin:tiny-critic``, trained once and cached."""
    from asyppo.tasks.tiny_models import ensure_builtin_models

    return ensure_builtin_models(seed=seed, log=log)


def _chain_models(seed: int, log: Callable[[str], None]):
    """The chain task's ``builtin:tiny`` and ``builtin:tiny-critic``, trained once and cached."""
    from asyppo.tasks.tiny_models import CHAIN_RECIPE, ensure_builtin_models

    return ensure_builtin_models(seed=seed, log=log, recipe=CHAIN_RECIPE)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("arithmetic", arithmetic.verify_arithmetic, arithmetic.reward, arithmetic.arithmetic_problems,
             _arithmetic_models),
        Task("chain", chain.verify_chain, chain.reward, chain.chain_problems, _chain_models),
        Task("math", math.verify_math, math.reward),
        # For pretrained instruct models: no built-in models of its own (model.policy: builtin:smollm2-135m-instruct).
        Task("words", math.verify_math, math.reward, word_problems.word_problems),
    )
}


def load_problems(
    source: str, *, split: str = "train", prompt_template: str = "{question}", limit: int | None = None,
    seed: int = 0, **columns: str | None,
) -> list[Problem]:
    """Problems from a task's built-in dataset (``builtin:<task>``) or a local ``.jsonl`` / ``.json`` /
    ``.parquet`` file (``asyppo.tasks.problems.load_problem_file``, which validates every row; ``columns`` are its
    ``prompt_key``, ``answer_key`` and ``id_key``).

    A built-in source has a ``train`` and an ``eval`` split (``limit=None`` gives the whole split); a file is one
    split and ``split`` is not used. ``prompt_template`` must contain ``{question}``, replaced by the question
    text (plain replacement, so LaTeX braces elsewhere in the template are fine).
    """
    if not isinstance(prompt_template, str) or "{question}" not in prompt_template:
        raise ValueError(f"load_problems: prompt_template must contain '{{question}}', got {prompt_template!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"load_problems: limit must be a positive int or None, got {limit!r}")
    if not source.startswith(BUILTIN_PREFIX):
        return load_problem_file(source, prompt_template=prompt_template, limit=limit, seed=seed, **columns)
    task = TASKS.get(source.removeprefix(BUILTIN_PREFIX))
    if task is None or task.builtin_problems is None:
        available = [BUILTIN_PREFIX + name for name, task in TASKS.items() if task.builtin_problems]
        raise DatasetError(f"unknown built-in dataset {source!r}; built-in datasets: {', '.join(available)}")
    if split not in ("train", "eval"):
        raise DatasetError(f"{source}: split must be 'train' or 'eval', got {split!r}")
    return apply_template(task.builtin_problems(limit, split=split, seed=seed), prompt_template)
