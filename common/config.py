"""The job configuration: one pydantic model of everything a training job needs.

A config is built in three layers, later ones winning:
  1. the named preset (docs/algorithms.md §6) chosen by the top-level ``preset`` key,
  2. the YAML file given with ``--config``,
  3. dotted ``key=value`` overrides from the command line (values parsed as YAML, so ``3``, ``0.5``, ``null``,
     ``[0.95, 1.05]`` and ``true`` mean what they look like).
Everything is validated before any actor starts. Every problem is reported with the field path and the reason,
e.g. ``critics.num_critics: advantage mask k>0 needs at least 2 critics``.

Sections and who reads them: ``algorithm`` (the math of docs/algorithms.md: estimator, clipping, ERC band, masks,
coefficients; the learner and the critics), ``model``, ``data`` and ``reward`` (the driver and the rollout workers),
``rollout``, ``critics`` and ``learner`` (each role's size and optimisation), ``weight_sync`` (the broadcast),
``trainer`` and ``logging`` (the driver). Each role is handed only the sections it uses.

Names that moved in 0.2 (``learner.estimator`` -> ``algorithm.estimator``, ...) are still read for one release,
with a warning naming the new field: see ``RENAMED``.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from asyppo.tasks.prompts import PromptFormat
from asyppo.tasks.registry import BUILTIN_PREFIX, TASKS

log = logging.getLogger("asyppo")

# model.critic: the critics' backbone is the policy's own model (a critic as large as the policy).
CRITIC_IS_POLICY = "policy"
PresetName = Literal["asyppo", "asyppo-only", "ppo", "ppo-policy-critic", "grpo", "dapo-erc", "gppo-erc"]

# docs/algorithms.md §6. Each preset sets only the algorithm switches (and the critics they need: their number, and for
# ppo-policy-critic their model), written as what it changes from the defaults, which are AsyPPO's; every one stays
# independently overridable.
PRESETS: dict[str, dict[str, Any]] = {
    # AsyPPO: 2 mini-critics, agreement mask and entropy filter, clip-higher, dual clip and ERC (the defaults).
    "asyppo": {},
    # AsyPPO's critics and masks alone: PPO's symmetric clip, no ERC, no dual clip, so that its effect is not
    # confounded with ERC's and clip-higher's.
    "asyppo-only": {
        "algorithm": {"clip_high": 0.2, "dual_clip": None, "erc_band": None},
    },
    # Classic PPO: one critic, GAE, symmetric clip, no masks and no ERC.
    "ppo": {
        "critics": {"num_critics": 1},
        "algorithm": {
            "estimator": "gae", "clip_high": 0.2, "erc_band": None, "adv_mask_fraction": 0.0,
            "entropy_filter_fraction": 0.0,
        },
    },
    # The papers' PPO baseline: one critic as large as the policy (its backbone is the policy's model).
    "ppo-policy-critic": {
        "model": {"critic": CRITIC_IS_POLICY},
        "critics": {"num_critics": 1},
        "algorithm": {
            "estimator": "gae", "clip_high": 0.2, "erc_band": None, "adv_mask_fraction": 0.0,
            "entropy_filter_fraction": 0.0,
        },
    },
    # GRPO: no critics, group-normalised rewards, symmetric clip, no entropy bonus, no masks and no ERC.
    "grpo": {
        "critics": {"num_critics": 0},
        "algorithm": {
            "estimator": "grpo", "clip_high": 0.2, "erc_band": None, "entropy_coef": 0.0, "adv_mask_fraction": 0.0,
            "entropy_filter_fraction": 0.0,
        },
    },
    # DAPO with ERC: GRPO's advantages with dynamic sampling, clip-higher and a dual clip of 10.
    "dapo-erc": {
        "critics": {"num_critics": 0},
        "rollout": {"dynamic_sampling": True},
        "algorithm": {
            "estimator": "grpo", "dual_clip": 10.0, "entropy_coef": 0.0, "adv_mask_fraction": 0.0,
            "entropy_filter_fraction": 0.0,
        },
    },
    # GPPO with ERC: GRPO's advantages with the gradient-preserving clip and a dual clip of 10.
    "gppo-erc": {
        "critics": {"num_critics": 0},
        "algorithm": {
            "estimator": "grpo", "clip_mode": "gppo", "clip_high": 0.2, "dual_clip": 10.0, "entropy_coef": 0.0,
            "adv_mask_fraction": 0.0, "entropy_filter_fraction": 0.0,
        },
    },
}

# Fields that moved to another section in 0.2: old dotted name -> new one. Read for one release, with a warning.
RENAMED: dict[str, str] = {
    **{f"learner.{name}": f"algorithm.{name}" for name in (
        "estimator", "clip_mode", "clip_low", "clip_high", "dual_clip", "erc_band", "entropy_coef",
        "adv_mask_fraction", "entropy_filter_fraction", "agg", "gamma", "lam", "nll_coef",
    )},
    "critics.ensemble": "algorithm.ensemble",
    "critics.value_clip": "algorithm.value_clip",
    "critics.split": "algorithm.critic_split",
    "learner.sync_backend": "weight_sync.backend",
    "learner.sync_timeout_s": "weight_sync.timeout_s",
    "learner.sync_bucket_mb": "weight_sync.bucket_mb",
    "learner.sync_check_tolerance": "weight_sync.check_tolerance",
}

# A run's name is one directory under trainer.run_dir, never a path of its own.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
BUILTIN_POLICY = "builtin:tiny"
BUILTIN_CRITIC = "builtin:tiny-critic"
BUILTIN_DATA = "builtin:arithmetic"
# The tasks of asyppo.tasks.registry: adding one there makes it a valid data.task here.
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]


# Why a submitted job may not use a relative trainer.run_dir (asyppo submit and the driver both say it).
RELATIVE_RUN_DIR = ("{run_dir!r} is relative, and a submitted job runs in Ray's temporary copy of its working "
                    "directory, which Ray deletes: the checkpoints and metrics would be lost. Give an absolute path on "
                    "storage every node keeps, e.g. trainer.run_dir=/mnt/shared/runs")


class ConfigError(ValueError):
    """Invalid job configuration; ``problems`` holds ``(field path, reason)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  {path}: {reason}" for path, reason in problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    policy: str = Field(
        BUILTIN_POLICY, description="local Hugging Face model dir, builtin:tiny (the task's), or a built-in "
                                    "pretrained model: builtin:smollm2-135m-instruct (docs/models.md)"
    )
    critic: str = Field(
        BUILTIN_CRITIC, description="local HF dir for the critics' backbone, builtin:tiny-critic, a built-in "
                                    "pretrained model, or policy (the policy's)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    critic_layers: int | None = Field(
        None, ge=1, description="mini-critics cut from model.critic: its embeddings and first N decoder layers under "
                                "a fresh value head (None: every layer)"
    )


class DataConfig(_Section):
    train: str = BUILTIN_DATA
    eval: str | None = BUILTIN_DATA
    task: TaskName = "arithmetic"
    prompt_key: str = "question"
    answer_key: str = "answer"
    id_key: str | None = None
    prompt_template: str = Field("{question}", description="the prompt text; {question} is replaced by the prompt_key column")
    chat_template: bool = Field(
        False, description="render each prompt as a user message with the policy tokenizer's chat template (instruct "
                           "and thinking models); false: raw text (base models)"
    )
    system_prompt: str | None = Field(None, description="a system message before each prompt (needs chat_template)")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="passed to the chat template, e.g. {enable_thinking: false} for Qwen3"
    )
    train_limit: int | None = Field(None, ge=1)
    eval_size: int = Field(512, ge=1, description="held-out problems scored at each evaluation")


class RewardConfig(_Section):
    function: str | None = Field(
        None, pattern=r"^.+:[A-Za-z_][A-Za-z0-9_]*$",
        description="your reward, 'package.module:name' or 'path/to/file.py:name', called as fn(prompt, response, "
                    "answer, row) (docs/rewards.md); null: data.task's verifier",
    )
    correct: float = Field(1.0, description="the score of a true verdict")
    wrong: float = Field(0.0, description="the score of a false verdict")
    overlong_buffer: int | None = Field(None, ge=1, description="DAPO overlong shaping L_buf; None disables it")
    overlong_factor: float = Field(1.0, ge=0)


class RolloutConfig(_Section):
    num_workers: int | tuple[int, int] = Field(
        1, description="rollout workers: a number, or a range [min, max] that grows at a step boundary when a node "
                       "with room joins and shrinks when a worker's node leaves (docs/scaling.md)"
    )
    gpus_per_worker: int = Field(0, ge=0, description="vLLM tensor-parallel size on GPU; 0 = CPU engine")
    cpus_per_worker: float = Field(1.0, gt=0)
    node_type: str | None = Field(
        None, min_length=1, description="a custom Ray resource that marks the nodes for this role (nodes started with "
                                        "--resources='{\"NAME\": 1}'); each actor asks a sliver of it; null = any node"
    )
    prompts_per_step: int = Field(32, ge=1)
    samples_per_prompt: int = Field(8, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    cpu_kv_cache_gib: float = Field(1.0, gt=0)
    max_model_len: int | None = Field(None, ge=8)
    dynamic_sampling: bool = Field(
        False, description="DAPO: drop prompts whose responses all scored alike, refill from new prompts (§3)"
    )
    dynamic_sampling_rounds: int = Field(3, ge=1, description="extra generation rounds per step at most")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _number_or_range(cls, value: Any) -> Any:
        def count(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1
        if count(value) or (isinstance(value, list | tuple) and len(value) == 2 and all(map(count, value))
                            and value[0] <= value[1]):
            return value
        raise ValueError(f"{value!r} must be a number ≥ 1, or a range [min, max] with 1 ≤ min ≤ max")

    @property
    def min_workers(self) -> int:
        """The rollout workers a job needs to run: all of ``num_workers``, or the low end of its range."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """The most rollout workers a job runs: all of ``num_workers``, or the high end of its range."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


class OptimizationConfig(_Section):
    """How a role trains its model (the learner and the critics share the shape; each sets its own values)."""

    lr: float = Field(2e-4, gt=0)
    epochs: int = Field(1, ge=1)
    micro_batch_size: int = Field(64, ge=1, description="responses per forward/backward")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage; bf16 runs at 1 or above (docs/deploy.md)")
    grad_clip: float = Field(1.0, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="after the warm-up (§5b)")
    lr_warmup_steps: int = Field(0, ge=0, description="steps of linear learning-rate warm-up (§5b)")
    lr_min_ratio: float = Field(0.0, ge=0, le=1, description="cosine: the last step's lr as a fraction of lr")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, more time")


class CriticsConfig(OptimizationConfig):
    num_critics: int = Field(2, ge=0)
    gpus_per_critic: float = Field(0.0, ge=0)
    cpus_per_critic: float = Field(0.5, gt=0)
    node_type: str | None = Field(
        None, min_length=1, description="a custom Ray resource that marks the nodes for this role (nodes started with "
                                        "--resources='{\"NAME\": 1}'); each actor asks a sliver of it; null = any node"
    )
    quorum: int = Field(
        1, ge=1, description="the fewest critics a step goes on with: a critic whose node left with no room for it "
                             "sits out until room returns, then starts again from the last checkpoint (docs/scaling.md); "
                             "with fewer the job waits for a node (trainer.node_wait_s)"
    )
    lr: float = Field(1e-3, gt=0)
    head_lr: float | None = Field(
        None, gt=0, description="the zero-initialised value head's rate; null = lr. A pretrained backbone trains at a "
                                "small lr, at which a zero head barely moves (docs/models.md)"
    )


class AlgorithmConfig(_Section):
    """The math of docs/algorithms.md, in one place: what the learner and the critics compute."""

    estimator: Literal["asyppo", "gae", "grpo"] = Field("asyppo", description="advantage estimator (§3)")
    clip_mode: Literal["ppo", "gppo"] = Field("ppo", description="ppo clip, or gradient-preserving gppo (§5)")
    clip_low: float = Field(0.2, ge=0, lt=1, description="ε_low: the ratio is clipped below at 1 − ε_low")
    clip_high: float = Field(0.28, ge=0, description="ε_high: the ratio is clipped above at 1 + ε_high")
    dual_clip: float | None = Field(3.0, gt=1, description="c of the dual clip for A < 0; null = off")
    erc_band: tuple[float, float] | None = Field(
        (0.95, 1.05), description="ERC: [low, high] bounds on H/H_old, tokens outside lose their gradient; null = off"
    )
    entropy_coef: float = Field(1e-3, ge=0, description="β_ent of the entropy bonus")
    adv_mask_fraction: float = Field(0.2, ge=0, lt=1, description="k: agreement mask fraction (§4)")
    entropy_filter_fraction: float = Field(0.2, ge=0, lt=1, description="h: divergence filter fraction (§4)")
    agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(1.0, ge=0, le=1)
    nll_coef: float = Field(0.0, ge=0, description="α_nll of the optional NLL term")
    ensemble: Literal["mean", "min"] = Field("mean", description="how the critics' values combine into V̄ (§3)")
    value_clip: float = Field(0.5, gt=0, description="c_v of the critics' clipped value loss (§2)")
    critic_split: Literal["prompt", "response"] = Field("prompt", description="which rows each critic trains on (§2)")
    off_policy_correction: Literal["token-truncate", "token-mask", "sequence-mask", "none"] = Field(
        "token-truncate", description="weight w correcting the rollout engine's policy μ to the learner's π_prox (§5a)"
    )
    off_policy_cap: float = Field(2.0, gt=1, description="C: the cap (truncate) or the limit (mask) of π_prox/μ (§5a)")
    critic_warmup_steps: int = Field(
        0, ge=0, description="the first W steps train the critics only; the policy starts updating at step W (§4)"
    )
    kl_coef: float = Field(0.0, ge=0, description="β_KL of the KL penalty to the frozen initial policy; 0 = off (§5)")
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="per-token estimator of KL(π_θ ‖ π_ref) (§5)")


class LearnerConfig(OptimizationConfig):
    num_gpus: int = Field(0, ge=0, description="DeepSpeed data-parallel ranks on GPU, one per GPU; 0 = on CPU")
    ranks: int = Field(
        1, ge=1, description="DeepSpeed data-parallel ranks of a CPU learner (num_gpus=0), one Ray actor each over gloo; "
                             "with GPUs there is one rank per GPU"
    )
    cpus: float = Field(1.0, gt=0)
    node_type: str | None = Field(
        None, min_length=1, description="a custom Ray resource that marks the nodes for this role (nodes started with "
                                        "--resources='{\"NAME\": 1}'); each actor asks a sliver of it; null = any node"
    )
    weight_decay: float = Field(0.0, ge=0)
    mini_batch_size: int = Field(64, ge=1, description="responses per optimizer step")
    logprob_chunk: int = Field(256, ge=1, description="sequence positions per chunk of the vocab projection")


class WeightSyncConfig(_Section):
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl when both sides have GPUs")
    timeout_s: float = Field(120.0, gt=0)
    bucket_mb: float = Field(64.0, gt=0)
    check_tolerance: float | None = Field(
        None, gt=0, description="max mean |logp diff| rollout vs learner after a broadcast; null = per model.dtype"
    )


# What the post-broadcast weight check allows by default (mean |Δ logπ| between the learner and an engine holding the
# same weights): float32 kernels agree to ~1e-6; bf16 engines are expected ~0.01 off the learner's bf16 forward at 4B
# scale, so their default leaves a 5× margin (the learner's bf16 log-probs measured 0.0018 off float32's on an H200;
# a bf16 vLLM engine against the learner is not measured yet).
CHECK_TOLERANCE_BY_DTYPE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


class TrainerConfig(_Section):
    name: str = Field("asyppo-arithmetic", min_length=1)
    run_dir: str = "runs"
    steps: int = Field(100, ge=1)
    max_staleness: int = Field(0, ge=0, le=4)
    seed: int = Field(0, ge=0, lt=2**32, description="every random draw derives from it (docs/architecture.md, Seeds)")
    eval_every: int = Field(25, ge=0, description="steps between held-out evaluations; 0 = only at start and end")
    checkpoint_every: int = Field(50, ge=0, description="0 = only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    actor_restarts: int = Field(1, ge=0, description="times Ray restarts a dead actor before the job fails")
    call_timeout_s: float = Field(900.0, gt=0, description="longest wait on any actor call; then a clear error")
    start_timeout_s: float = Field(
        1800.0, gt=0, description="longest wait for an actor to start (load its model, build its engine), also when "
                                  "Ray restarts it; then a clear error"
    )
    node_wait_s: float = Field(
        600.0, gt=0, description="how long a role that lost its node waits for a node with room to join (an "
                                 "autoscaler's replacement); then a clear error (docs/scaling.md)"
    )
    max_skipped_steps: int = Field(
        3, ge=1, description="consecutive steps without a policy update (bad loss, diverged critics) before the job stops"
    )


class EvaluationConfig(_Section):
    """Held-out evaluation (docs/monitoring.md, "Evaluation"): every trainer.eval_every steps, at the start and at the
    end, each set is scored greedily and with ``k`` sampled responses per problem at the training temperature."""

    k: int = Field(1, ge=1, description="sampled responses per problem: avg@k (eval_accuracy) and pass@k")
    sets: dict[str, str] = Field(
        default_factory=dict,
        description="more held-out sets beside data.eval, name: source (a file, or builtin:<task>), each cut to "
                    "data.eval_size problems",
    )


class LoggingConfig(_Section):
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: $WANDB_MODE if set, else online with WANDB_API_KEY, else offline"
    )
    wandb_project: str = "asyppo"
    wandb_entity: str | None = None
    wandb_group: str | None = Field(None, description="W&B run group; null: trainer.name")
    wandb_tags: list[str] = Field(default_factory=list)
    console: bool = Field(True, description="the progress bar and the job's own lines on the console")
    verbose: bool = Field(
        False, description="also show Ray's, vLLM's and the other libraries' output on the console; otherwise it goes "
                           "to <run>/logs/"
    )
    ray_metrics: bool = True
    samples_every: int = Field(10, ge=0, description="steps between logged generations (samples.jsonl, W&B); 0 = never")
    samples_per_log: int = Field(8, ge=1, description="responses logged each time")


class JobConfig(_Section):
    preset: PresetName = "asyppo"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    reward: RewardConfig = RewardConfig()
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    critics: CriticsConfig = CriticsConfig()
    learner: LearnerConfig = LearnerConfig()
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    trainer: TrainerConfig = TrainerConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "JobConfig":
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("; ".join(f"{path}: {reason}" for path, reason in problems))
        if self.weight_sync.check_tolerance is None:
            self.weight_sync.check_tolerance = CHECK_TOLERANCE_BY_DTYPE[self.model.dtype]
        return self

    @property
    def batch_size(self) -> int:
        """Responses per rollout batch (N = P × n)."""
        return self.rollout.prompts_per_step * self.rollout.samples_per_prompt

    @property
    def learner_ranks(self) -> int:
        """The learner's data-parallel ranks: one per GPU, else ``learner.ranks`` on CPU."""
        return self.learner.num_gpus or self.learner.ranks

    @property
    def prompt_format(self) -> PromptFormat:
        """How prompts become token ids (``data.chat_template`` and its companions)."""
        return PromptFormat(self.data.chat_template, self.data.system_prompt, dict(self.data.chat_template_kwargs))

    @property
    def run_path(self) -> Path:
        return Path(self.trainer.run_dir) / self.trainer.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _critics_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """The critics the estimator, the masks, the critic warm-up and the critic split need."""
    alg, m, n = cfg.algorithm, cfg.critics.num_critics, cfg.rollout.samples_per_prompt
    problems = []
    if m and cfg.critics.quorum > m:
        problems.append(("critics.quorum", f"{cfg.critics.quorum} exceeds critics.num_critics={m}"))
    if alg.estimator == "grpo" and m > 0:
        problems.append(("critics.num_critics", f"estimator grpo uses no critics, got {m}"))
    if alg.estimator == "gae" and m != 1:
        problems.append(("critics.num_critics", f"estimator gae is classic PPO with exactly 1 critic, got {m}"))
    if alg.estimator == "asyppo" and m < 1:
        problems.append(("critics.num_critics", "estimator asyppo needs at least 1 critic"))
    if alg.adv_mask_fraction > 0 and m < 2:
        problems.append(("critics.num_critics", f"advantage mask k>0 needs at least 2 critics, got {m}"))
    if alg.entropy_filter_fraction > 0 and m < 2:
        problems.append(("critics.num_critics", f"entropy filter h>0 needs at least 2 critics, got {m}"))
    if alg.critic_warmup_steps > 0 and m < 1:
        problems.append(("algorithm.critic_warmup_steps", f"{alg.critic_warmup_steps} warms up critics, but there are none"))
    if alg.critic_split == "response" and m > 0 and n % m:
        problems.append((
            "algorithm.critic_split",
            f"response split needs samples_per_prompt ({n}) divisible by num_critics ({m})",
        ))
    return problems


def _loss_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """The ERC band's bounds, and sampling that the off-policy weight cannot correct."""
    alg, roll = cfg.algorithm, cfg.rollout
    problems = []
    if alg.erc_band is not None:
        low, high = alg.erc_band
        if not (0 <= low < 1 < high):
            problems.append(("algorithm.erc_band", f"needs 0 <= low < 1 < high, got [{low}, {high}]"))
    if alg.off_policy_correction != "none" and roll.top_p < 1:
        problems.append((
            "rollout.top_p",
            f"{roll.top_p} < 1: the engine's log-probs are then renormalised over the nucleus, not the full "
            "vocabulary the learner computes, so the off-policy weight would be wrong; use top_p=1 or set "
            "algorithm.off_policy_correction=none",
        ))
    return problems


def _sampling_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """Samples per prompt, dynamic sampling and the overlong shaping against the rollout's length."""
    roll, problems = cfg.rollout, []
    if roll.dynamic_sampling and cfg.trainer.max_staleness > 0:
        problems.append((
            "rollout.dynamic_sampling",
            f"needs trainer.max_staleness=0 (got {cfg.trainer.max_staleness}): its refills draw prompts in the "
            "step, which must not overtake a rollout already in flight",
        ))
    if roll.dynamic_sampling and roll.samples_per_prompt < 2:
        problems.append(("rollout.dynamic_sampling", "needs at least 2 samples per prompt to tell groups apart"))
    if cfg.algorithm.estimator == "grpo" and roll.samples_per_prompt < 2:
        problems.append(("rollout.samples_per_prompt", "grpo needs at least 2 samples per prompt for a group std"))
    if cfg.reward.overlong_buffer is not None and cfg.reward.overlong_buffer >= roll.max_new_tokens:
        problems.append(("reward.overlong_buffer", "must be smaller than rollout.max_new_tokens"))
    return problems


def _data_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """The chat template's companions, and the training, held-out and evaluation sets against data.task."""
    data, problems = cfg.data, []
    if not data.chat_template:
        for name in ("system_prompt", "chat_template_kwargs"):
            if getattr(data, name):
                problems.append((f"data.{name}", "is used by the chat template only: set data.chat_template=true"))
    for name in cfg.evaluation.sets:
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) is None:
            problems.append((f"evaluation.sets.{name}", "a set's name must be letters, digits and '_' (it names "
                                                        "metrics: eval_<name>_accuracy)"))
    if cfg.evaluation.sets and not data.eval:
        problems.append(("evaluation.sets", "needs data.eval, the main held-out set, as well"))
    sources = {f"data.{field}": getattr(data, field) for field in ("train", "eval")}
    sources.update({f"evaluation.sets.{name}": source for name, source in cfg.evaluation.sets.items()})
    own = BUILTIN_PREFIX + data.task
    for field, source in sources.items():
        if source and source.startswith(BUILTIN_PREFIX) and source != own:
            instead = f"{own} or a file)" if TASKS[data.task].builtin_problems else \
                "a dataset file: the task has no built-in data)"
            problems.append((field, f"{source} is another task's dataset than data.task={data.task} (use {instead}"))
    return problems


def _schedule_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """Warm-ups (the critics' head start, each role's learning rate) that must end before trainer.steps."""
    steps, warmup, problems = cfg.trainer.steps, cfg.algorithm.critic_warmup_steps, []
    if warmup >= steps:
        problems.append((
            "algorithm.critic_warmup_steps", f"{warmup} >= trainer.steps ({steps}): the policy would never be updated",
        ))
    # The critics' schedule runs over every step, the policy's over the steps after the critics' warm-up.
    for section, updates in (("learner", steps - warmup), ("critics", steps)):
        lr_warmup = getattr(cfg, section).lr_warmup_steps
        if lr_warmup >= updates:
            problems.append((f"{section}.lr_warmup_steps", f"{lr_warmup} >= the {updates} steps it updates in "
                                                           "(trainer.steps after algorithm.critic_warmup_steps): the "
                                                           "learning rate would never reach its value"))
    return problems


def _batch_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """The learner's mini-batches against the rollout batch, and its micro-batches over its ranks."""
    lrn, n, ranks, problems = cfg.learner, cfg.batch_size, cfg.learner_ranks, []
    if lrn.mini_batch_size > n:
        problems.append(("learner.mini_batch_size", f"{lrn.mini_batch_size} exceeds the rollout batch of {n}"))
    elif n % lrn.mini_batch_size:
        problems.append(("learner.mini_batch_size", f"must divide the rollout batch of {n} responses"))
    per_step = lrn.micro_batch_size * ranks
    if per_step > lrn.mini_batch_size or lrn.mini_batch_size % per_step:
        problems.append((
            "learner.micro_batch_size",
            f"micro_batch_size × learner ranks ({lrn.micro_batch_size}×{ranks}) must divide mini_batch_size "
            f"({lrn.mini_batch_size})",
        ))
    return problems


def _resource_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """GPU counts, the broadcast backend and the dtype against where each role runs."""
    roll, problems = cfg.rollout, []
    gpus_per_critic = cfg.critics.gpus_per_critic
    if gpus_per_critic > 1 and not float(gpus_per_critic).is_integer():
        problems.append(("critics.gpus_per_critic", "above 1 it must be a whole number of GPUs"))
    if cfg.learner.num_gpus and cfg.learner.ranks not in (1, cfg.learner.num_gpus):
        problems.append(("learner.ranks", f"with learner.num_gpus={cfg.learner.num_gpus} the learner runs one rank per "
                                          "GPU; learner.ranks sets the ranks of a CPU learner (num_gpus=0)"))
    if cfg.weight_sync.backend == "nccl" and (roll.gpus_per_worker == 0 or cfg.learner.num_gpus == 0):
        problems.append(("weight_sync.backend", "nccl needs GPUs on both the learner and the rollout workers"))
    if cfg.model.dtype != "float32" and roll.gpus_per_worker == 0:
        problems.append(("model.dtype", "the CPU vLLM engine in this project runs float32 only"))
    return problems


def _name_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """The run's name: one directory under trainer.run_dir."""
    if PLAIN_NAME.fullmatch(cfg.trainer.name) is None:
        return [("trainer.name", f"{cfg.trainer.name!r} must be a plain name (letters, digits, '.', '_', '-'), not a "
                                 "path; trainer.run_dir says where runs go")]
    return []


_CROSS_FIELD_CHECKS = (
    _critics_problems, _loss_problems, _sampling_problems, _data_problems, _schedule_problems, _batch_problems,
    _resource_problems, _name_problems,
)


def cross_field_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """Rules that involve more than one field; each problem names the field a user should change."""
    return [problem for check in _CROSS_FIELD_CHECKS for problem in check(cfg)]


# What a resumed run may change (docs/reliability.md): how long it runs and how often it evaluates and saves, what
# it logs, its timeouts, the weight broadcast, its resources and the memory-only micro-batch sizes. Anything else
# (model, data, reward, algorithm, sampling, optimisation, seed) would make it a different run.
RESUME_SAFE_FIELDS = (
    "trainer.name", "trainer.run_dir", "trainer.steps", "trainer.eval_every", "trainer.checkpoint_every",
    "trainer.keep_checkpoints", "trainer.actor_restarts", "trainer.call_timeout_s", "trainer.start_timeout_s",
    "trainer.node_wait_s",
    "trainer.max_skipped_steps", "logging.", "weight_sync.",
    "rollout.num_workers", "rollout.gpus_per_worker", "rollout.cpus_per_worker", "rollout.gpu_memory_utilization",
    "rollout.cpu_kv_cache_gib", "rollout.node_type", "critics.gpus_per_critic", "critics.cpus_per_critic",
    "critics.quorum",
    "critics.micro_batch_size", "critics.node_type", "learner.num_gpus", "learner.ranks", "learner.cpus",
    "learner.micro_batch_size", "learner.logprob_chunk", "learner.node_type",
)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_changes(previous: JobConfig, current: JobConfig) -> list[tuple[str, str]]:
    """The fields ``current`` changes from the run being resumed that would make it a different run."""
    before, after = _flatten(previous.model_dump(mode="json")), _flatten(current.model_dump(mode="json"))
    changes = [
        (path, f"was {before.get(path)!r} in the run being resumed, now {after.get(path)!r}: a different run. "
               f"Set it back, or start a new run (without --resume)")
        for path in sorted(set(before) | set(after))
        if before.get(path) != after.get(path) and not path.startswith(RESUME_SAFE_FIELDS)
    ]
    # A cosine schedule is laid over trainer.steps: running longer would change every later step's learning rate.
    cosine = [section for section in ("learner", "critics") if getattr(current, section).lr_schedule == "cosine"]
    if cosine and previous.trainer.steps != current.trainer.steps:
        changes.append(("trainer.steps", f"was {previous.trainer.steps} in the run being resumed, now "
                                         f"{current.trainer.steps}: {cosine[0]}.lr_schedule=cosine decays over "
                                         "trainer.steps, so this would be a different run"))
    # At ZeRO ≥ 1 the learner's optimizer state is saved partitioned over its ranks, and DeepSpeed loads it only
    # into as many ranks: refused here, before any actor starts, rather than in the learner's constructor.
    if previous.learner_ranks != current.learner_ranks and current.learner.zero_stage >= 1:
        field = "learner.num_gpus" if previous.learner.num_gpus or current.learner.num_gpus else "learner.ranks"
        changes.append((field, f"the run being resumed had {previous.learner_ranks} learner rank(s), this one "
                               f"{current.learner_ranks}: at learner.zero_stage={current.learner.zero_stage} the "
                               "checkpoint's optimizer state is split over its ranks and loads only into as many; "
                               "set it back, or start a new run"))
    return changes


def _deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(overrides: list[str]) -> dict:
    """``["learner.lr=1e-5", "preset=ppo"]`` → nested dict; values are parsed as YAML scalars/lists."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([(item, "an override must look like dotted.key=value")])
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([(key, "conflicts with another override of its parent")])
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError([(key, f"cannot parse value {raw!r}: {exc}")]) from None
    return nested


def _format_validation_error(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        path = ".".join(str(part) for part in err["loc"])
        message = err["msg"]
        if err["type"] == "value_error" and not path:
            # Cross-field rules already carry their own field paths ("a.b: reason; c.d: reason").
            for chunk in message.removeprefix("Value error, ").split("; "):
                field, _, reason = chunk.partition(": ")
                problems.append((field, reason))
            continue
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "value_error":  # a field's own rule (a validator's ValueError): its words alone
            message = message.removeprefix("Value error, ")
        problems.append((path or "<root>", message))
    return problems


def apply_renames(user: dict) -> dict:
    """Move fields written under their pre-0.2 names (``RENAMED``) to their new place, warning once per field.

    Giving both the old and the new name of one field is an error, since it is unclear which one was meant.
    """
    user = copy.deepcopy(user)
    problems = []
    for old, new in RENAMED.items():
        old_section, old_name = old.split(".")
        section = user.get(old_section)
        if not isinstance(section, dict) or old_name not in section:
            continue
        value = section.pop(old_name)
        new_section, new_name = new.split(".")
        target = user.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # the section itself is malformed; validation reports it
        if new_name in target:
            problems.append((old, f"renamed to {new}, which is also set; keep only {new}"))
            continue
        target[new_name] = value
        log.warning("config: %s is now %s; the old name is read until the next release", old, new)
    if problems:
        raise ConfigError(problems)
    return user


def build_config(raw: dict | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Preset defaults ← ``raw`` (a YAML mapping) ← dotted ``overrides``; raises ConfigError."""
    # Each layer is renamed on its own, so that a new-name override still wins over an old-name YAML field.
    user = _deep_merge(apply_renames(raw or {}), apply_renames(parse_overrides(overrides or [])))
    preset = user.get("preset", "asyppo")
    if preset not in PRESETS:
        raise ConfigError([("preset", f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")])
    merged = _deep_merge(PRESETS[preset], user)
    try:
        return JobConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML job file (optional) and apply dotted overrides; raises ConfigError on any problem."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([("--config", f"no such file: {path}")])
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([("--config", f"{path} is not valid YAML: {exc}")]) from None
        if not isinstance(raw, dict):
            raise ConfigError([("--config", f"{path} must hold a mapping at the top level")])
    return build_config(raw, overrides)
