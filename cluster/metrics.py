"""Where the numbers of every step go: metrics.jsonl, W&B, Ray's metrics (dashboard) and the console; and every
``logging.samples_every`` steps some of the generations themselves (samples.jsonl and a W&B table).

docs/algorithms.md §7 lists what is logged each step; :func:`required_metric_keys` is that list as it applies to a
given config (no σ without two critics, no value loss without critics).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from asyppo.common.config import JobConfig
from asyppo.common.files import atomic_write_text
from asyppo.core.batch import RolloutBatch, uniform_groups

log = logging.getLogger("asyppo")

PHASES = ("rollout", "old_logprobs", "values", "update", "critic_train", "weight_sync", "step")


def required_metric_keys(cfg: JobConfig) -> list[str]:
    keys = [
        "reward_mean", "accuracy", "response_length", "policy_loss", "clip_frac", "erc_kept_frac",
        "adv_mask_frac", "entropy_filter_frac", "entropy_mean", "approx_kl", "grad_norm",
        "rollout_tokens_per_s", "learner_tokens_per_s", "weight_sync_seconds", "weight_sync_logp_diff",
        "weight_sync_check_tolerance", "skipped_steps", *(f"time_{phase}" for phase in PHASES),
        "offpolicy_logp_abs_diff", "offpolicy_kl", "offpolicy_capped_frac", "offpolicy_ratio_p01",
        "offpolicy_ratio_p50", "offpolicy_ratio_p99", "offpolicy_ratio_max",
        "actor_restarts", "cluster_nodes", "rollout_workers",
    ]
    num_critics = cfg.critics.num_critics
    if num_critics:
        keys += ["critic_tokens_per_s", "critics_taking_part", *(f"value_loss_critic_{m}" for m in range(num_critics))]
    if num_critics >= 2:
        keys += ["sigma_p10", "sigma_p50", "sigma_p90"]
    return keys


class PhaseTimes(dict):
    """``time_<phase>`` → seconds, for the step's metrics."""

    @contextmanager
    def phase(self, key: str, since: float | None = None) -> Iterator[float]:
        """Times the block as ``key``, from ``since`` when given (a phase that began before the block); yields its
        start."""
        start = time.perf_counter() if since is None else since
        yield start
        self[key] = time.perf_counter() - start


@dataclass
class StepRecord:
    """What one step's phases returned, and how long each took: the input of :func:`step_metrics`."""

    batch: RolloutBatch
    outputs: list[dict]  # every rollout worker's output, refills included
    old_logprobs: dict[str, float]  # learner rank 0's compute_old_logprobs stats
    advantages: dict[str, float]  # learner rank 0's compute_advantages stats
    update: dict[str, float]  # learner rank 0's update stats
    critics: dict[int, dict[str, float]]  # each critic's update stats, by critic index (those that took part)
    weight_sync: dict[str, float] = field(default_factory=dict)  # empty when no new weights were sent
    logp_diff: float = 0.0  # the post-broadcast weight check
    sampling: dict[str, float] = field(default_factory=dict)  # dynamic sampling's stats
    times: dict[str, float] = field(default_factory=dict)  # time_<phase> in seconds


def step_metrics(record: StepRecord) -> dict[str, float]:
    """Every number of one step (docs/algorithms.md §7), from the phases' own stats and the driver's timings."""
    batch, outputs, times = record.batch, record.outputs, record.times
    mask = batch.response_mask
    generated = sum(out["num_generated_tokens"] for out in outputs)
    metrics = {
        "reward_mean": float(batch.scores.mean()),
        "accuracy": float(batch.correct.float().mean()),
        # Prompts whose responses all scored alike: no GRPO gradient (what dynamic sampling drops).
        "uniform_groups_frac": float(uniform_groups(batch.scores, batch.group_size).float().mean()),
        "response_length": float(mask.sum(1).mean()),
        "truncated_frac": float(np.mean([float(t) for out in outputs for t in out["truncated"]])),
        "rollout_responses": float(sum(len(out["truncated"]) for out in outputs)),  # refills included
        "rollout_tokens_per_s": generated / max(times["time_rollout"], 1e-9),
        "rollout_weight_version": float(batch.weight_version),
        **record.old_logprobs, **record.advantages, **record.update, **record.weight_sync, **record.sampling,
        "weight_sync_seconds": record.weight_sync.get("weight_sync_seconds", times["time_weight_sync"]),
        "weight_sync_logp_diff": record.logp_diff,
        **{f"time_{phase}": times[f"time_{phase}"] for phase in PHASES},
    }
    for m, stats in record.critics.items():
        metrics[f"value_loss_critic_{m}"] = stats["value_loss"]
        metrics[f"value_clip_frac_critic_{m}"] = stats["value_clip_frac"]
        metrics[f"time_train_critic_{m}"] = stats["time_train"]  # its own training time, beside the policy update
        metrics["skipped_steps"] += stats["skipped_steps"]
    if record.critics:
        metrics["critic_tokens_per_s"] = sum(s["tokens_per_s"] for s in record.critics.values())
    return metrics


def _wandb_mode(requested: str) -> str:
    """``logging.wandb_mode``; ``auto`` follows ``WANDB_MODE`` when it is set, else goes online with a key."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


SAMPLE_COLUMNS = ("step", "id", "prompt", "response", "reference", "reward", "correct", "response_tokens",
                  "sigma_mean")


def generation_samples(step: int, batch, rows: list[int], problems: dict, tokenizer,
                       sigma: list[float] | None) -> list[dict[str, Any]]:
    """One record per row of ``batch`` in ``rows``: the prompt, the decoded response, the reference answer, the
    reward and verdict, the response's length and its mean σ (None without an ensemble). ``problems`` maps a
    problem id to its ``Problem``."""
    records = []
    prompt_length = batch.prompt_length
    for position, row in enumerate(rows):
        problem = problems[batch.prompt_ids[row // batch.group_size]]
        valid = batch.response_mask[row] > 0
        response = batch.input_ids[row, prompt_length:][valid].tolist()
        records.append({
            "step": step, "id": problem.id, "prompt": problem.prompt,
            "response": tokenizer.decode(response, skip_special_tokens=True), "reference": problem.answer,
            "reward": float(batch.scores[row]), "correct": bool(batch.correct[row]), "response_tokens": len(response),
            "sigma_mean": None if sigma is None else float(sigma[position]),
        })
    return records


def sample_rows(num_rows: int, count: int) -> list[int]:
    """``count`` rows spread evenly over a batch of ``num_rows`` (prompt-major rows: different prompts)."""
    return sorted({(i * num_rows) // count for i in range(min(count, num_rows))})


class MetricsSink:
    """Writes each step's metrics to every configured destination; JSONL is always on.

    A resumed run (``start_step`` > 0) continues from its checkpoint: ``metrics.jsonl`` and ``eval.jsonl`` are first
    cut back to the lines before ``start_step`` (the steps after the checkpoint are run again), and W&B gets a new
    run in the same group (``trainer.name``), since a W&B run's steps may only go forward.
    """

    def __init__(self, cfg: JobConfig, run_path: Path, *, resumed: bool, total_steps: int, start_step: int):
        self.cfg = cfg
        self.jsonl_path = run_path / "metrics.jsonl"
        self.eval_path = run_path / "eval.jsonl"
        self.samples_path = run_path / "samples.jsonl"
        if resumed:
            for path in (self.jsonl_path, self.eval_path, self.samples_path):
                keep_steps_before(path, start_step)
        self._jsonl = self.jsonl_path.open("a" if resumed else "w", encoding="utf-8")
        self._eval_jsonl = self.eval_path.open("a" if resumed else "w", encoding="utf-8")
        self._samples_jsonl = self.samples_path.open("a" if resumed else "w", encoding="utf-8")
        self._wandb = None
        self._gauges: dict[str, Any] = {}
        self._progress = None
        mode = _wandb_mode(cfg.logging.wandb_mode)
        if mode != "disabled":
            import wandb

            name = cfg.trainer.name if not resumed else f"{cfg.trainer.name}-from-step-{start_step}"
            self._wandb = wandb.init(
                project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity, name=name,
                group=cfg.logging.wandb_group or cfg.trainer.name, tags=cfg.logging.wandb_tags or None,
                id=_new_wandb_run_id(run_path), dir=str(run_path), mode=mode, config=cfg.model_dump(mode="json"),
                settings=wandb.Settings(silent=not cfg.logging.verbose),
            )
            if mode == "online":
                log.info("W&B run: %s", self._wandb.url)
            else:
                sync_dir = Path(self._wandb.settings.sync_dir).resolve()
                log.info("W&B run (offline): %s; upload it with `wandb sync %s`", sync_dir, sync_dir)
        if cfg.logging.console:
            from tqdm.auto import tqdm

            self._progress = tqdm(total=total_steps, initial=start_step, desc=cfg.trainer.name, unit="step",
                                  dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **metrics}
        self._jsonl.write(json_line(record))
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self.cfg.logging.ray_metrics:
            self._export_to_ray(metrics)
        if self._progress is not None:
            self._progress.set_postfix(
                reward=f"{metrics.get('reward_mean', math.nan):.3f}", acc=f"{metrics.get('accuracy', math.nan):.3f}",
                step_s=f"{metrics.get('time_step', math.nan):.1f}", refresh=False,
            )
            self._progress.update(1)

    def log_event(self, step: int, metrics: dict[str, float]) -> None:
        """Held-out evaluations: eval.jsonl and W&B, no progress tick (metrics.jsonl stays one line a step)."""
        self._eval_jsonl.write(json_line({"step": step, **metrics}))
        self._eval_jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._progress is not None:
            for line in describe_evaluation(step, metrics):
                self._progress.write(line)

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        """Generations (:func:`generation_samples`): samples.jsonl, and a W&B table ``samples`` at this step."""
        for record in records:
            self._samples_jsonl.write(json_line(record))
        self._samples_jsonl.flush()
        if self._wandb is not None:
            import wandb

            table = wandb.Table(columns=list(SAMPLE_COLUMNS),
                                data=[[record[column] for column in SAMPLE_COLUMNS] for record in records])
            self._wandb.log({"samples": table}, step=step)

    def _export_to_ray(self, metrics: dict[str, float]) -> None:
        from ray.util.metrics import Gauge

        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            name = "asyppo_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
            gauge = self._gauges.get(name)
            if gauge is None:
                gauge = self._gauges[name] = Gauge(name, description=f"asyppo step metric {key}",
                                                   tag_keys=("run",))
            gauge.set(float(value), tags={"run": self.cfg.trainer.name})

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl.close()
        self._eval_jsonl.close()
        self._samples_jsonl.close()


def _new_wandb_run_id(run_path: Path) -> str:
    """A fresh W&B run id, appended to ``wandb_runs`` in the run directory (one line per start of the run)."""
    run_id = uuid.uuid4().hex[:12]
    with (run_path / "wandb_runs").open("a", encoding="utf-8") as handle:
        handle.write(run_id + "\n")
    return run_id


def describe_evaluation(step: int, metrics: dict[str, float]) -> list[str]:
    """One console line per held-out set of an evaluation (keys of ``asyppo.cluster.driver.evaluation_metrics``)."""
    lines = []
    for key in sorted(key for key in metrics if key.endswith("accuracy_greedy")):
        prefix = key.removesuffix("accuracy_greedy")
        name = prefix.removeprefix("eval_").rstrip("_") or "held-out"
        k = int(metrics[f"{prefix}k"])
        sampled = f"{metrics[f'{prefix}accuracy']:.3f} sampled" + (
            f" (avg@{k}, pass@{k} {metrics[f'{prefix}pass_at_k']:.3f})" if k > 1 else "")
        lines.append(f"step {step}: {name} accuracy {sampled}, {metrics[key]:.3f} greedy "
                     f"({metrics[f'{prefix}problems']:.0f} problems)")
    return lines


def keep_steps_before(path: Path, step: int) -> None:
    """Rewrite the JSONL file ``path`` (if any) without its lines of ``step`` and later; atomic (tmp + rename)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] < step:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            continue  # a line torn by the crash that the resume recovers from
    atomic_write_text(path, "".join(kept))


def json_line(record: dict[str, Any]) -> str:
    """One line of strict JSON, which jq and JavaScript read too: a number that is not finite (NaN: a diagnostic with
    nothing to measure, e.g. σ flat at step 0) is written as ``null``. :func:`read_metrics` reads it back as NaN."""
    finite = {key: None if isinstance(value, float) and not math.isfinite(value) else value
              for key, value in record.items()}
    return json.dumps(finite, ensure_ascii=False, allow_nan=False) + "\n"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of metrics.jsonl or eval.jsonl, with NaN where a number was not finite (``null`` in the file)."""
    with Path(path).open(encoding="utf-8") as handle:
        return [{key: math.nan if value is None else value for key, value in json.loads(line).items()}
                for line in handle if line.strip()]
