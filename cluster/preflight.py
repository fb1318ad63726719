"""Checks that need the data, the tokenizers or the environment, run by the driver before any actor starts
(docs/reliability.md, "Checked before any actor starts"). The config's own rules are in ``asyppo.cluster.config``.

Each check returns ``(field path, reason)`` problems, so that all of them are reported at once.
"""

from __future__ import annotations

import netrc
import os
import re
from pathlib import Path

from asyppo.cluster.config import JobConfig
from asyppo.tasks.problems import Problem
from asyppo.tasks.registry import TASKS

# Rows named in one problem; a dataset with thousands of bad rows needs the first few, not all.
ROWS_SHOWN = 3


def preflight_problems(cfg: JobConfig, train: list[Problem], held_out: list[Problem], tokenizer,
                       models) -> list[tuple[str, str]]:
    """Every problem the checks below find, in one list; ``tokenizer`` is the policy's, ``models`` the resolved
    ``Models`` (policy and critic directories)."""
    from transformers import AutoConfig, AutoTokenizer

    max_model_len = cfg.rollout.max_model_len or AutoConfig.from_pretrained(models.policy).max_position_embeddings
    problems = [
        *batch_size_problems(cfg, train),
        *prompt_length_problems(cfg, {"data.train": train, "data.eval": held_out}, tokenizer, max_model_len),
        *answer_problems(cfg, {"data.train": train, "data.eval": held_out}),
        *wandb_problems(cfg),
    ]
    if cfg.critics.num_critics:
        problems += tokenizer_problems(tokenizer, AutoTokenizer.from_pretrained(models.critic))
    return problems


def batch_size_problems(cfg: JobConfig, train: list[Problem]) -> list[tuple[str, str]]:
    if cfg.rollout.prompts_per_step > len(train):
        return [("rollout.prompts_per_step", f"{cfg.rollout.prompts_per_step} is more than the {len(train)} "
                                             f"training problems of data.train")]
    return []


def prompt_length_problems(cfg: JobConfig, splits: dict[str, list[Problem]], tokenizer,
                           max_model_len: int) -> list[tuple[str, str]]:
    """Prompt tokens + ``rollout.max_new_tokens`` must fit the engine's maximum sequence length."""
    budget = max_model_len - cfg.rollout.max_new_tokens
    problems = []
    for field, rows in splits.items():
        if not rows:
            continue
        lengths = [len(ids) for ids in tokenizer([row.prompt for row in rows])["input_ids"]]
        too_long = [(row.id, length) for row, length in zip(rows, lengths) if length > budget]
        if too_long:
            shown = ", ".join(f"{row_id!r} ({length} tokens)" for row_id, length in too_long[:ROWS_SHOWN])
            problems.append((field, f"{len(too_long)} prompts leave no room for rollout.max_new_tokens="
                                    f"{cfg.rollout.max_new_tokens} within the engine's {max_model_len} tokens, "
                                    f"e.g. {shown}; shorten them, or raise rollout.max_model_len"))
    return problems


def answer_problems(cfg: JobConfig, splits: dict[str, list[Problem]]) -> list[tuple[str, str]]:
    """Every reference answer must be usable by the task's verifier (it raises ValueError on one that is not)."""
    verify = TASKS[cfg.data.task].verify
    problems = []
    for field, rows in splits.items():
        bad = []
        for row in rows:
            try:
                verify("", row.answer)
            except ValueError as exc:
                bad.append(f"{row.id!r}: {exc}")
        if bad:
            problems.append((field, f"{len(bad)} reference answers the {cfg.data.task} verifier cannot use, e.g. "
                                    + "; ".join(bad[:ROWS_SHOWN])))
    return problems


def tokenizer_problems(policy_tokenizer, critic_tokenizer) -> list[tuple[str, str]]:
    """The critics read the policy's token ids as they are (no re-tokenisation), so the vocabularies must match."""
    if policy_tokenizer.get_vocab() != critic_tokenizer.get_vocab():
        return [("model.critic", f"its tokenizer's vocabulary ({len(critic_tokenizer)} tokens) differs from the "
                                 f"policy's ({len(policy_tokenizer)}); the critics read the policy's token ids, so "
                                 "use a critic from the same model family")]
    return []


def wandb_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """W&B online needs credentials: WANDB_API_KEY or a `wandb login` entry in ~/.netrc."""
    if cfg.logging.wandb_mode != "online" or os.environ.get("WANDB_API_KEY"):
        return []
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).rstrip("/")
    try:
        if netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc")).authenticators(host):
            return []
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return [("logging.wandb_mode", "online needs W&B credentials: set WANDB_API_KEY (or run `wandb login`), or use "
                                   "auto/offline")]
