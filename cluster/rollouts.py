"""Generations on the rollout workers: launching one over the workers' slices, collecting the answers (with workers
that died brought back), and joining them into one batch (docs/architecture.md, "One training step", 1-2)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asyppo.cluster.errors import ActorLost, JobFailed
from asyppo.cluster.supervisor import Supervisor
from asyppo.common.config import JobConfig
from asyppo.core.batch import RolloutBatch, collate_rollouts, concat_batches


@dataclass
class Rollout:
    """One ``generate`` over the rollout workers: its problems and seed, the learner's weight version when it was
    launched, the pending output of each slice of its prompts (by slice index; as many slices as workers at launch),
    its start time and, once collected, the outputs."""

    problems: list
    n: int
    seed: int
    version: int
    refs: dict[int, Any]
    slices: int
    started: float = field(default_factory=time.perf_counter)
    greedy: bool = False
    outputs: list[dict] | None = None


def generate(workers, cfg: JobConfig, problems, *, n: int, seed: int, slices: int | None = None,
             only: list[int] | None = None, greedy: bool = False) -> dict[int, Any]:
    """``problems`` in ``slices`` (default: one per worker) contiguous slices of whole prompts (a prompt's n samples
    stay together), slice ``k`` to worker ``k`` modulo the workers; every worker gets the generation's ``seed`` and
    the position of its slice's first prompt, from which its prompts' seeds derive (``RolloutWorker.generate``): the
    samples depend neither on the number of workers nor on which worker generates a slice.
    Returns {slice index: ObjectRef}; ``only`` launches just those slices again (on the workers there are now).
    ``greedy`` decodes at temperature 0 (evaluation only)."""
    roll = cfg.rollout
    parts = np.array_split(np.arange(len(problems)), slices or len(workers))
    return {
        index: workers[index % len(workers)].generate.remote(
            [problems[i].to_dict() for i in part], n=n, max_new_tokens=roll.max_new_tokens,
            temperature=0.0 if greedy else roll.temperature, top_p=roll.top_p, seed=seed, first_prompt=int(part[0]),
        )
        for index, part in enumerate(parts)
        if len(part) and (only is None or index in only)
    }


def collect(actors: Supervisor, cfg: JobConfig, rollout: Rollout, what: str, *, version: int) -> list[dict]:
    """Every slice's output, in prompt order (also kept in ``rollout.outputs``); ``version`` is the learner's.

    A worker whose call failed because its process died, or whose output comes from a process that Ray restarted
    before the learner's weights reached it, is brought back (``Supervisor.restore_rollout_workers``; a worker of a
    range whose node left is let go instead) and its slice is generated again with the same seeds: in sync mode the
    same samples as if it had never died.
    """
    outputs: dict[int, dict] = {}
    # Each try after the first follows a worker's restart or its being let go (a range's worker whose node left, maybe
    # in an earlier call while this rollout was out): each worker of the fleet at its largest fails at most
    # actor_restarts + 1 times.
    fleet = actors.rollout_workers.resources
    attempts = 1 + (cfg.trainer.actor_restarts + 1) * (fleet.count + fleet.spare)
    for _ in range(attempts):
        for index, ref in rollout.refs.items():
            if index in outputs:
                continue
            try:
                output = actors.get(ref, what)
            except ActorLost:
                continue
            if output["weight_version"] >= rollout.version:  # else made by a restarted engine's base weights
                outputs[index] = output
        missing = [index for index in rollout.refs if index not in outputs]
        if not missing:
            rollout.outputs = [outputs[index] for index in sorted(outputs)]
            return rollout.outputs
        actors.restore_rollout_workers(what, version)
        rollout.refs.update(generate(actors.rollout_workers, cfg, rollout.problems, n=rollout.n, seed=rollout.seed,
                                     slices=rollout.slices, only=missing, greedy=rollout.greedy))
    raise JobFailed(f"{what}: rollout workers kept failing after {attempts} attempts{actors.resume_hint()}")


def collate(problems: list, outputs: list[dict], samples_per_prompt: int, pad_id: int) -> RolloutBatch:
    """The slices' outputs (in prompt order, each for its slice of ``problems``) as one padded batch."""
    batches, start = [], 0
    for out in outputs:
        count = len(out["prompt_ids"])
        batches.append(collate_rollouts(
            out["prompt_ids"], out["response_ids"], out["response_mask"], out["rollout_logprobs"],
            out["scores"], out["correct"], [p.id for p in problems[start:start + count]],
            samples_per_prompt, pad_id, out["weight_version"],
        ))
        start += count
    return concat_batches(batches, pad_id)
