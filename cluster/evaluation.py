"""Held-out evaluation (docs/monitoring.md, "Evaluation"): during training, and for a saved policy (``asyppo eval``).

Every evaluation samples with the same seed, so successive numbers differ by the weights, not the dice, and a run's
checkpoint scored by ``asyppo eval`` reproduces the run's own evaluation of it.
"""

from __future__ import annotations

import ray
import torch

from asyppo.cluster.errors import JobFailed
from asyppo.cluster.job_inputs import load_datasets, reward_function
from asyppo.cluster.preflight import held_out_splits, reward_function_problems
from asyppo.cluster.rollouts import generate
from asyppo.cluster.supervisor import connect_ray, spawn_rollout_workers
from asyppo.common.config import ConfigError, JobConfig
from asyppo.core.seeds import derive_seed
from asyppo.tasks.problems import Problem


def evaluation_seed(cfg: JobConfig) -> int:
    return derive_seed(cfg.trainer.seed, "evaluation")


def eval_prefix(name: str) -> str:
    """Metric prefix of a held-out set: ``eval_`` for data.eval, ``eval_<name>_`` for an evaluation.sets entry."""
    return f"eval_{name}_" if name else "eval_"


def evaluation_metrics(name: str, sampled: list[dict], greedy: list[dict], k: int) -> dict[str, float]:
    """One held-out set's numbers from the rollout outputs of its k sampled responses per problem (prompt-major rows)
    and its greedy ones: ``accuracy`` is avg@k (the mean verdict over all k·P responses), ``pass_at_k`` the
    fraction of problems with at least one of its k responses correct."""
    correct = torch.cat([torch.as_tensor(out["correct"]) for out in sampled]).view(-1, k).float()
    greedy_correct = torch.cat([torch.as_tensor(out["correct"]) for out in greedy]).float()
    prefix = eval_prefix(name)
    return {f"{prefix}accuracy": float(correct.mean()), f"{prefix}accuracy_greedy": float(greedy_correct.mean()),
            f"{prefix}pass_at_k": float(correct.amax(1).mean()), f"{prefix}problems": float(correct.shape[0]),
            f"{prefix}k": float(k)}


def evaluate_sets(held_out: dict[str, list[Problem]], k: int, launch, collect) -> dict[str, float]:
    """Every held-out set scored with ``k`` sampled responses per problem and one greedy (:func:`evaluation_metrics`).
    ``launch(problems, n, greedy)`` starts a generation and ``collect(launched, name)`` waits for its outputs;
    every set is launched before any is collected, so the engines see them all."""
    launched = {name: (launch(problems, k, False), launch(problems, 1, True)) for name, problems in held_out.items()}
    metrics: dict[str, float] = {}
    for name, (sampled, greedy) in launched.items():
        metrics.update(evaluation_metrics(name, collect(sampled, name), collect(greedy, name), k))
    return metrics


def evaluate_policy(cfg: JobConfig, policy_dir: str) -> dict[str, float]:
    """``asyppo eval``: a saved policy scored on the job's held-out sets as a training run scores them (the same
    seeds), on rollout workers only."""
    _, held_out = load_datasets(cfg)
    if not held_out:
        raise JobFailed("data.eval: no held-out data configured")
    reward = reward_function(cfg)
    # The check training runs before any actor starts: a reward.function that does not import, or fails on a
    # row, is one line here rather than a traceback from inside the rollout workers.
    problems = reward_function_problems(cfg, reward, held_out_splits(held_out))
    if problems:
        raise ConfigError(problems)
    owns_ray = connect_ray(cfg)
    workers = None
    try:
        workers = spawn_rollout_workers(cfg, policy_dir, reward)
        return evaluate_sets(
            held_out, cfg.evaluation.k,
            lambda problems, n, greedy: generate(workers, cfg, problems, n=n, seed=evaluation_seed(cfg),
                                                 greedy=greedy),
            lambda refs, name: ray.get(list(refs.values()), timeout=cfg.trainer.call_timeout_s),
        )
    finally:
        if workers is not None:
            workers.close()
        if owns_ray:
            ray.shutdown()
