"""A job's inputs, resolved and checked before any actor starts: the run directory, the checkpoint a resume starts
from, the models, the datasets, the tokenizer and the reward function, in one frozen value (:class:`JobInputs`).

Everything that can be wrong with a job's inputs is found here (docs/reliability.md, "Bad input"): a config
problem names its field (:class:`ConfigError`), a dataset row its row, a missing model its path.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyppo.cluster.checkpoint import CheckpointDir, read_trainer_state
from asyppo.cluster.errors import JobFailed
from asyppo.cluster.preflight import preflight_problems
from asyppo.common.config import (
    BUILTIN_CRITIC, BUILTIN_POLICY, CRITIC_IS_POLICY, RELATIVE_RUN_DIR, ConfigError, JobConfig, load_config,
    resume_changes,
)
from asyppo.tasks.problems import Problem
from asyppo.tasks.registry import BUILTIN_PREFIX, TASKS, load_problems
from asyppo.tasks.rewards import RewardFunction

log = logging.getLogger("asyppo")


@dataclass(frozen=True)
class Models:
    policy: str
    critic: str


@dataclass(frozen=True)
class JobInputs:
    """What a job reads, resolved: ``cfg`` (with the run's final name), the checkpoint a resume starts from and its
    trainer state (None for a new run), the model directories, the problems, the policy's tokenizer and the
    reward function."""

    cfg: JobConfig
    checkpoints: CheckpointDir
    checkpoint: Path | None
    trainer_state: dict[str, Any] | None
    models: Models
    train_problems: list[Problem]
    eval_sets: dict[str, list[Problem]]
    tokenizer: Any
    reward_fn: RewardFunction

    @property
    def run_path(self) -> Path:
        return self.cfg.run_path

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


def prepare_job(cfg: JobConfig, *, resume: bool = False) -> JobInputs:
    """Resolve and check every input of a job, then create its run directory and save its config there."""
    from transformers import AutoTokenizer

    problems = submitted_run_dir_problems(cfg)
    if problems:
        raise ConfigError(problems)
    cfg = unique_run_path(cfg, resume)
    checkpoints = CheckpointDir(cfg.run_path, cfg.trainer.keep_checkpoints)
    checkpoint = resume_point(cfg, checkpoints) if resume else None
    train_problems, eval_sets = load_datasets(cfg)
    models = resolve_models(cfg)
    tokenizer = AutoTokenizer.from_pretrained(models.policy)
    reward_fn = reward_function(cfg)
    problems = preflight_problems(cfg, train_problems, eval_sets, tokenizer, models, reward_fn)
    if problems:
        raise ConfigError(problems)
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    (cfg.run_path / "config.yaml").write_text(cfg.to_yaml())
    return JobInputs(cfg, checkpoints, checkpoint, read_trainer_state(checkpoint) if checkpoint else None, models,
                     train_problems, eval_sets, tokenizer, reward_fn)


def resolve_models(cfg: JobConfig) -> Models:
    """Local model directories for the policy and the critics: the built-in tiny ones are bootstrapped, the built-in
    pretrained ones converted from their package (both cached). A job without critics (``grpo``) does not read
    ``model.critic``: its critic directory is the policy's, unused."""
    critic = cfg.model.critic if cfg.critics.num_critics > 0 else CRITIC_IS_POLICY
    paths = {"model.policy": cfg.model.policy, "model.critic": critic}
    for field, path in paths.items():
        if path.startswith(BUILTIN_PREFIX) and path not in (BUILTIN_POLICY, BUILTIN_CRITIC):
            paths[field] = pretrained_model(field, path.removeprefix(BUILTIN_PREFIX))
    if {BUILTIN_POLICY, BUILTIN_CRITIC} & set(paths.values()):
        task = TASKS[cfg.data.task]
        if task.builtin_models is None:
            field = "model.policy" if paths["model.policy"] == BUILTIN_POLICY else "model.critic"
            raise JobFailed(f"{field}: the task {task.name!r} has no built-in tiny models; point model.policy and "
                            f"model.critic at local Hugging Face directories or a built-in pretrained model "
                            f"(builtin:smollm2-135m-instruct)")
        builtin = task.builtin_models(cfg.trainer.seed, log.info)
        pick = {BUILTIN_POLICY: str(builtin.policy_dir), BUILTIN_CRITIC: str(builtin.critic_dir)}
        paths = {field: pick.get(path, path) for field, path in paths.items()}
    if paths["model.critic"] == CRITIC_IS_POLICY:
        paths["model.critic"] = paths["model.policy"]
    for field, path in paths.items():
        if not (Path(path) / "config.json").is_file():
            raise JobFailed(f"{field}: {path} is not a local Hugging Face model directory (no config.json)")
    return Models(paths["model.policy"], paths["model.critic"])


def pretrained_model(field: str, name: str) -> str:
    """The directory of the built-in pretrained model ``name`` (asyppo.tasks.pretrained), or one line saying why
    there is none."""
    from asyppo.tasks.pretrained import PRETRAINED, PretrainedUnavailable, ensure_pretrained
    from asyppo.tasks.model_cache import default_cache_dir

    if name not in PRETRAINED:
        known = ", ".join((BUILTIN_POLICY, BUILTIN_CRITIC, *(f"{BUILTIN_PREFIX}{known}" for known in PRETRAINED)))
        raise JobFailed(f"{field}: no built-in model {BUILTIN_PREFIX}{name}; the built-in models are {known}")
    try:
        return str(ensure_pretrained(name, default_cache_dir(), log.info))
    except PretrainedUnavailable as exc:
        raise JobFailed(f"{field}: {exc}") from None


def load_datasets(cfg: JobConfig) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """Training problems and the held-out sets, every row validated before any actor starts. The held-out sets map a
    name to problems: ``""`` is ``data.eval``, the others are ``evaluation.sets`` (each cut to data.eval_size)."""
    data = cfg.data
    common = dict(prompt_key=data.prompt_key, answer_key=data.answer_key, id_key=data.id_key,
                  prompt_template=data.prompt_template, seed=cfg.trainer.seed)
    train = load_problems(data.train, split="train", limit=data.train_limit, **common)
    sources = {"": data.eval, **cfg.evaluation.sets} if data.eval else {}
    held_out = {name: load_problems(source, split="eval", limit=data.eval_size, **common)
                for name, source in sources.items()}
    return train, held_out


def reward_function(cfg: JobConfig) -> RewardFunction:
    """The job's reward (``reward.*``, docs/rewards.md), picklable for the rollout workers."""
    overlong = {}
    if cfg.reward.overlong_buffer:
        overlong = {"max_length": cfg.rollout.max_new_tokens, "buffer": cfg.reward.overlong_buffer,
                    "factor": cfg.reward.overlong_factor}
    return RewardFunction(task=cfg.data.task, function=cfg.reward.function, correct=cfg.reward.correct,
                          wrong=cfg.reward.wrong, **overlong)


def submitted_run_dir_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """Inside a Ray job (``ray job submit``, deploy/submit.sh; Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR for its driver)
    with a working directory, the driver runs in Ray's temporary copy of it: a relative trainer.run_dir would land
    there and vanish with the session, so it is refused before anything starts."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job or Path(cfg.trainer.run_dir).is_absolute():
        return []
    try:
        working_dir = json.loads(job).get("runtime_env", {}).get("working_dir")
    except (ValueError, AttributeError):
        working_dir = None
    if not working_dir:
        return []
    return [("trainer.run_dir", RELATIVE_RUN_DIR.format(run_dir=cfg.trainer.run_dir) + f" (here: {Path.cwd()})")]


def unique_run_path(cfg: JobConfig, resume: bool) -> JobConfig:
    """A new run never writes into an existing run's directory: it takes the next free ``name-K``."""
    if resume:
        return cfg
    base, k = cfg.trainer.name, 1
    while cfg.run_path.exists() and any(cfg.run_path.iterdir()):
        cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"name": f"{base}-{k}"})})
        k += 1
    return cfg


def resume_point(cfg: JobConfig, checkpoints: CheckpointDir) -> Path:
    """The newest checkpoint whose every file matches its manifest (older ones are the fallback, logged), once
    the config is known to describe the same run."""
    search = checkpoints.find_resume_point(log.warning)
    if search.checkpoint is None:
        rejected = f": {search.describe_rejected()}" if search.rejected else ""
        raise JobFailed(f"--resume: no usable checkpoint under {checkpoints.root}{rejected}")
    saved = cfg.run_path / "config.yaml"
    if saved.is_file():
        changes = resume_changes(load_config(saved), cfg)
        if changes:
            raise ConfigError(changes)
    return search.checkpoint
