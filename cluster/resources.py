"""Resources per role: one placement group per role, one bundle per actor (ARCHITECTURE.md, scaling knobs).

Rollout workers, critics and learner ranks scale independently; each role reserves its bundles up front so a job
that does not fit the cluster fails at start with the role named, instead of hanging half-placed.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import JobConfig


@dataclass(frozen=True)
class RoleResources:
    count: int
    cpus: float
    gpus: float


def role_resources(cfg: JobConfig) -> dict[str, RoleResources]:
    """CPUs and GPUs per actor for each role, from the config's independent knobs."""
    return {
        "rollout": RoleResources(cfg.rollout.num_workers, cfg.rollout.cpus_per_worker, cfg.rollout.gpus_per_worker),
        "critics": RoleResources(cfg.critics.num_critics, cfg.critics.cpus_per_critic, cfg.critics.gpus_per_critic),
        "learner": RoleResources(cfg.learner_ranks, cfg.learner.cpus, 1 if cfg.learner.num_gpus > 0 else 0),
    }


def total_cpus(cfg: JobConfig) -> float:
    return sum(r.count * r.cpus for r in role_resources(cfg).values())


class Placement:
    """The placement groups of one job and the actor options that pin each actor to its bundle."""

    def __init__(self, cfg: JobConfig, roles: tuple[str, ...] = ("rollout", "critics", "learner"),
                 timeout_s: float = 120.0):
        self.resources = role_resources(cfg)
        self.groups = {}
        for role, res in self.resources.items():
            if res.count == 0 or role not in roles:
                continue
            bundle = {"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {})}
            # Learner ranks talk to each other every step: keep them on one node when possible.
            strategy = "PACK" if role == "learner" else "SPREAD"
            self.groups[role] = placement_group([dict(bundle) for _ in range(res.count)], strategy=strategy,
                                                name=f"asyppo-{role}")
        for role, group in self.groups.items():
            if not group.wait(timeout_seconds=timeout_s):
                self.remove()
                res = self.resources[role]
                raise RuntimeError(
                    f"the cluster cannot place the {role} role: {res.count} × (CPU {res.cpus}, GPU {res.gpus}) "
                    f"did not fit within {timeout_s:.0f}s; cluster resources: {ray.cluster_resources()}"
                )

    def options_for(self, role: str, index: int) -> dict:
        res = self.resources[role]
        return {
            "num_cpus": res.cpus,
            "num_gpus": res.gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.groups[role], placement_group_bundle_index=index,
                placement_group_capture_child_tasks=True,
            ),
        }

    def remove(self) -> None:
        for group in self.groups.values():
            remove_placement_group(group)
        self.groups = {}
