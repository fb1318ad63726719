"""Checks that need the data, the tokenizers or the environment, run by the driver before any actor starts
(docs/reliability.md, "Checked before any actor starts"). The config's own rules are in ``asyppo.common.config``.

Each check returns ``(field path, reason)`` problems, so that all of them are reported at once.
"""

from __future__ import annotations

import netrc
import os
import re
from pathlib import Path

from asyppo.common.config import JobConfig
from asyppo.tasks.problems import Problem
from asyppo.tasks.registry import TASKS

# Rows named in one problem; a dataset with thousands of bad rows needs the first few, not all.
ROWS_SHOWN = 3


def preflight_problems(cfg: JobConfig, train: list[Problem], held_out: dict[str, list[Problem]], tokenizer,
                       models, reward) -> list[tuple[str, str]]:
    """Every problem the checks below find, in one list; ``held_out`` maps a set's name to its problems (``""`` for
    data.eval, as ``asyppo.cluster.job_inputs.load_datasets`` returns them), ``tokenizer`` is the policy's, ``models``
    the resolved ``Models`` (policy and critic directories), ``reward`` the job's reward function."""
    from transformers import AutoConfig, AutoTokenizer

    max_model_len = cfg.rollout.max_model_len or AutoConfig.from_pretrained(models.policy).max_position_embeddings
    splits = {"data.train": train, **held_out_splits(held_out)}
    template = chat_template_problems(cfg, tokenizer)
    problems = [
        *batch_size_problems(cfg, train),
        *template,
        *([] if template else prompt_length_problems(cfg, splits, tokenizer, max_model_len)),  # needs the template
        *(answer_problems(cfg, splits) if cfg.reward.function is None
          else reward_function_problems(cfg, reward, splits)),
        *wandb_problems(cfg),
    ]
    if cfg.critics.num_critics:
        problems += tokenizer_problems(tokenizer, AutoTokenizer.from_pretrained(models.critic))
        problems += critic_layers_problems(cfg, AutoConfig.from_pretrained(models.critic))
    return problems


def held_out_splits(held_out: dict[str, list[Problem]]) -> dict[str, list[Problem]]:
    """The held-out sets keyed by the config field that names them (``data.eval``, ``evaluation.sets.<name>``)."""
    return {f"evaluation.sets.{name}" if name else "data.eval": rows for name, rows in held_out.items()}


def batch_size_problems(cfg: JobConfig, train: list[Problem]) -> list[tuple[str, str]]:
    if cfg.rollout.prompts_per_step > len(train):
        return [("rollout.prompts_per_step", f"{cfg.rollout.prompts_per_step} is more than the {len(train)} "
                                             f"training problems of data.train")]
    return []


def chat_template_problems(cfg: JobConfig, tokenizer) -> list[tuple[str, str]]:
    """``data.chat_template`` needs a tokenizer that has one."""
    from asyppo.tasks.prompts import missing_chat_template

    missing = missing_chat_template(tokenizer, cfg.prompt_format)
    return [("data.chat_template", missing)] if missing else []


def prompt_length_problems(cfg: JobConfig, splits: dict[str, list[Problem]], tokenizer,
                           max_model_len: int) -> list[tuple[str, str]]:
    """Prompt tokens + ``rollout.max_new_tokens`` must fit the engine's maximum sequence length."""
    from asyppo.tasks.prompts import encode_prompts

    budget = max_model_len - cfg.rollout.max_new_tokens
    problems = []
    for field, rows in splits.items():
        if not rows:
            continue
        lengths = [len(ids) for ids in encode_prompts(tokenizer, [row.prompt for row in rows], cfg.prompt_format)]
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


def reward_function_problems(cfg: JobConfig, reward, splits: dict[str, list[Problem]]) -> list[tuple[str, str]]:
    """``reward.function`` imports, and on the first row of each split, given the reference answer as the response,
    ``reward`` (the job's ``RewardFunction``) returns something it may return (a verdict, a finite score, or both):
    the rollout workers would fail otherwise, after minutes of starting engines."""
    try:
        reward.scorer
    except ValueError as exc:
        return [("reward.function", str(exc))]
    for field, rows in splits.items():
        if not rows:
            continue
        row = rows[0]
        try:
            reward(row.prompt, row.answer, row.answer, row.row, response_length=1, truncated=False)
        except Exception as exc:  # noqa: BLE001 - the user's function can raise anything; say where and what
            return [("reward.function", f"{cfg.reward.function} on the first row of {field} ({row.id!r}, with its "
                                        f"reference answer as the response): {type(exc).__name__}: {exc}")]
    return []


def tokenizer_problems(policy_tokenizer, critic_tokenizer) -> list[tuple[str, str]]:
    """The critics read the policy's token ids as they are (no re-tokenisation), so the vocabularies must match."""
    if policy_tokenizer.get_vocab() != critic_tokenizer.get_vocab():
        return [("model.critic", f"its tokenizer's vocabulary ({len(critic_tokenizer)} tokens) differs from the "
                                 f"policy's ({len(policy_tokenizer)}); the critics read the policy's token ids, so "
                                 "use a critic from the same model family")]
    return []


def critic_layers_problems(cfg: JobConfig, critic_config) -> list[tuple[str, str]]:
    """A critic cut to N layers needs a model with at least N (a number of layers is what its config calls it)."""
    wanted, available = cfg.model.critic_layers, getattr(critic_config, "num_hidden_layers", None)
    if wanted is None:
        return []
    if available is None:
        return [("model.critic_layers", f"the critic model's config ({type(critic_config).__name__}) has no "
                                        "num_hidden_layers to cut")]
    if wanted > available:
        return [("model.critic_layers", f"{wanted} is more than the {available} decoder layers of the critic model")]
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
