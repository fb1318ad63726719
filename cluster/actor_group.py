"""The actors of one role (rollout workers, critics, learner ranks), spawned and torn down one way.

Each role reserves one placement group with one bundle per actor up front (docs/architecture.md, "Scaling knobs"),
so a job that does not fit the cluster fails at start with the role named instead of hanging half-placed; each
actor is pinned to its own bundle and named ``<role>-<i>`` in the Ray dashboard. Roles scale independently:
``rollout.num_workers``, ``critics.num_critics``, ``learner.num_gpus``.

A role that may go on without some of its actors — a range of them (``rollout.num_workers: [min, max]``) or a quorum
(``critics.quorum``) — gives every actor a placement group of its own instead, and a range also asks for ``max − min``
spare ones that wait for room (an autoscaler sees them as demand). An actor starts in a spare once it is placed
(:meth:`ActorGroup.add`); one whose node left is let go (:meth:`ActorGroup.remove`) while the role keeps what it
needs, and its slot asks for a new placement group, in which it starts again once room returns (docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from asyppo.common.config import JobConfig
from asyppo.cluster.logs import with_output_to


# What each actor of a role with a node type asks of that custom resource: a sliver, so that a node of the type holds
# as many of the role's actors as its CPUs and GPUs allow (Ray counts resources to 4 decimals).
NODE_TYPE_SHARE = 0.001
# How long a role's start waits for its spare bundles to be placed (on a cluster with room: moments); the ones still
# waiting get their actors at a later step boundary.
SPARE_PLACEMENT_S = 5.0


@dataclass(frozen=True)
class RoleResources:
    count: int  # the actors the role needs (the low end of a range)
    cpus: float
    gpus: float
    node_type: str | None = None  # a custom Ray resource that the role's nodes carry (rollout.node_type, ...)
    spare: int = 0  # actors it may add when room appears (the high end of a range, less ``count``)
    quorum: int | None = None  # the actors it must have placed to go on (critics.quorum); None: all ``count``

    @property
    def elastic(self) -> bool:
        return self.spare > 0

    @property
    def needed(self) -> int:
        return self.count if self.quorum is None else min(self.quorum, self.count)

    def bundle(self) -> dict[str, float]:
        """One actor's placement-group bundle."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {}),
                **({self.node_type: NODE_TYPE_SHARE} if self.node_type else {})}

    def describe(self) -> str:
        sizes = f"CPU {self.cpus:g}, GPU {self.gpus:g}"
        return f"{sizes} on a node of type {self.node_type!r}" if self.node_type else sizes


def role_resources(cfg: JobConfig) -> dict[str, RoleResources]:
    """CPUs, GPUs and node type per actor for each role, from the config's independent knobs."""
    roll, crit, lrn = cfg.rollout, cfg.critics, cfg.learner
    return {
        "rollout": RoleResources(roll.min_workers, roll.cpus_per_worker, roll.gpus_per_worker, roll.node_type,
                                 spare=roll.max_workers - roll.min_workers),
        "critics": RoleResources(crit.num_critics, crit.cpus_per_critic, crit.gpus_per_critic, crit.node_type,
                                 quorum=crit.quorum),
        "learner": RoleResources(cfg.learner_ranks, lrn.cpus, 1 if lrn.num_gpus > 0 else 0, lrn.node_type),
    }


def total_cpus(cfg: JobConfig, *, spares: bool = False) -> float:
    """The CPUs the job needs (``spares``: with room for every actor a range allows)."""
    return sum((r.count + r.spare * spares) * r.cpus for r in role_resources(cfg).values())


def total_gpus(cfg: JobConfig) -> float:
    return sum(r.count * r.gpus for r in role_resources(cfg).values())


class PlacementError(RuntimeError):
    """The cluster cannot hold the job's actors; the message names the role, the sizes and the knobs."""


def fit_to_cluster(cfg: JobConfig, cluster: dict[str, float], log) -> JobConfig:
    """``cfg`` made to fit a running cluster's resources (``ray.cluster_resources()``), or :class:`PlacementError`
    at once, instead of a placement that waits and then fails.

    A CPU-only job that asks for more logical CPUs than the cluster has is scaled down: every role's CPU share by the
    same factor (its roles then share cores, as on the embedded cluster; ``log`` says so). GPUs cannot be shared
    that way, so a job needing more GPUs than the cluster has fails, naming the knobs."""
    for role, resources in role_resources(cfg).items():
        if resources.count and resources.node_type and resources.node_type not in cluster:
            log(f"{role}.node_type: no node of the cluster carries the resource "
                f"{resources.node_type!r} now; the {role} role waits for one to join (an autoscaler's)")
    need_gpus, have_gpus = total_gpus(cfg), cluster.get("GPU", 0.0)
    if need_gpus > have_gpus:
        raise PlacementError(
            f"the job needs {need_gpus:g} GPUs ({_sizes(cfg, 'gpus')}) and the cluster has {have_gpus:g}: lower "
            "rollout.gpus_per_worker, critics.gpus_per_critic or learner.num_gpus, or add GPU nodes")
    need_cpus, have_cpus = total_cpus(cfg), cluster.get("CPU", 0.0)
    if need_cpus <= have_cpus:
        return cfg
    if need_gpus or have_cpus <= 0:
        raise PlacementError(
            f"the job needs {need_cpus:g} CPUs ({_sizes(cfg, 'cpus')}) and the cluster has {have_cpus:g}: lower "
            "rollout.cpus_per_worker, critics.cpus_per_critic or learner.cpus, or add nodes")
    # Ray reads CPU requests to 4 decimals; round down so that the scaled job fits for sure.
    factor = have_cpus / need_cpus
    def scaled(cpus: float) -> float:
        return max(1e-4, int(cpus * factor * 1e4) / 1e4)
    fitted = cfg.model_copy(deep=True)
    fitted.rollout.cpus_per_worker = scaled(cfg.rollout.cpus_per_worker)
    fitted.critics.cpus_per_critic = scaled(cfg.critics.cpus_per_critic)
    fitted.learner.cpus = scaled(cfg.learner.cpus)
    log(f"the job asks for {need_cpus:g} CPUs ({_sizes(cfg, 'cpus')}) and the cluster has {have_cpus:g}: every role's "
        f"CPU share is scaled by {factor:.2f} (the roles share cores)")
    return fitted


def _sizes(cfg: JobConfig, what: str) -> str:
    return ", ".join(f"{role} {r.count}×{getattr(r, what):g}" for role, r in role_resources(cfg).items() if r.count)


class ActorGroup:
    """The actors of one role, each on its own bundle ("slot") of the role's placement groups.

    Create the group (this reserves and waits for the ``count`` bundles the role needs), optionally run tasks on a
    slot (:meth:`bundle_options`), then :meth:`spawn` the actors. :meth:`call` runs one method on every actor;
    :meth:`close` kills the actors and frees the bundles (safe to call twice). Slots ``count`` and up are the
    role's spares (``RoleResources.spare``): :meth:`ready_slots` says which have room, :meth:`add` starts an actor in
    one, :meth:`remove` lets one go.

    Ray restarts a dead actor (``max_restarts``) in its bundle under the same handle and name, running its
    constructor again; :meth:`note_pids` tells which actors have a new process since the driver last looked, so the
    driver can bring them up to date (docs/reliability.md, "Lost and hung actors").
    """

    def __init__(self, role: str, resources: RoleResources, *, pack: bool = False, placement_timeout_s: float = 120.0):
        self.role = role
        self.resources = resources
        self.actors: list = []
        self.names: list[str] = []
        self.slots: list[int] = []  # the slot of each actor, in actor order
        self._pids: list[int | None] = []
        self._start = None  # (remote class, arguments, name, max_restarts), kept by spawn for add
        # A role that goes on without an actor whose node left (a range, a quorum) gives each actor a placement group
        # of its own, so that a lost one's group can be replaced by a new one that waits for room: Ray re-places a
        # group that lost a node with no backoff, and one that cannot be re-placed keeps the GCS busy (ray#65007).
        self._own_groups = resources.elastic or resources.needed < resources.count
        bundle = resources.bundle()
        if self._own_groups:
            self._bundles = [(self._new_group(slot), 0) for slot in range(resources.count)]
        else:
            # PACK keeps ranks that talk to each other every step (the learner's) on one node when possible.
            group = placement_group([bundle] * resources.count, strategy="PACK" if pack else "SPREAD",
                                    name=f"asyppo-{role}")
            self._bundles = [(group, index) for index in range(resources.count)]
        needed = self._groups()
        ready, _ = ray.wait([group.ready() for group in needed], num_returns=len(needed), timeout=placement_timeout_s)
        if len(ready) < len(needed):
            self.close()
            raise PlacementError(
                f"the cluster cannot place the {role} role: {resources.count} × ({resources.describe()}) did not fit "
                f"within {placement_timeout_s:.0f}s (other jobs may hold the resources); cluster resources: "
                f"{ray.cluster_resources()}"
            )
        # The spares ask for room only once the role's own actors have theirs.
        self._bundles += [(self._new_group(slot), 0) for slot in range(resources.count, resources.count + resources.spare)]

    def _new_group(self, slot: int):
        return placement_group([self.resources.bundle()], name=f"asyppo-{self.role}-{slot}")

    def _groups(self) -> list:
        """Every placement group of the role, once each."""
        return list({group.id: group for group, _ in self._bundles}.values())

    def _slot_nodes(self) -> list[str | None]:
        """The id of the node holding each slot's bundle; None while it waits for a node with room.

        A bundle on a node that left counts as waiting at once: Ray reports the actors of a lost node dead before the
        placement-group table lets go of the node (with trainer.actor_restarts=0 that report is the only one), and a
        role that may go on without the actor must see it unplaced when the call fails."""
        tables = {group.id: placement_group_table(group) for group in self._groups()}
        alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        where = [tables[group.id]["bundles_to_node_id"].get(index) for group, index in self._bundles]
        return [node if node in alive else None for node in where]

    def nodes(self) -> dict[str, str | None]:
        """Actor name → the id of the node holding its bundle, None while the bundle waits for a node (its node was
        lost and no other has room)."""
        if not self._bundles:
            return {}
        where = self._slot_nodes()
        return {name: where[slot] for name, slot in zip(self.names, self.slots)}

    def _placement(self) -> tuple[list[str], list[int]]:
        """One look at the role's bundles: :meth:`unplaced` and :meth:`ready_slots`."""
        if not self._bundles:
            return [], []
        where = self._slot_nodes()
        unplaced = [name for name, slot in zip(self.names, self.slots) if where[slot] is None]
        ready = [slot for slot, node in enumerate(where) if node is not None and slot not in self.slots]
        return unplaced, ready

    def unplaced(self) -> list[str]:
        """The actors whose node was lost and that wait for a node with room (Ray re-places their bundles)."""
        return self._placement()[0]

    def needs_node(self) -> list[str]:
        """The unplaced actors without which the role cannot go on: every one while fewer than the role needs
        (``RoleResources.needed``) are placed or could start in a placed bundle of their own, none otherwise (a role
        of a range, or with a quorum, lets the others go: :meth:`remove`)."""
        unplaced, ready = self._placement()  # one look: the driver asks every few seconds while it waits
        return unplaced if len(self) - len(unplaced) + len(ready) < self.resources.needed else []

    def actor(self, slot: int):
        """The actor in ``slot``."""
        return self.actors[self.slots.index(slot)]

    def ready_slots(self) -> list[int]:
        """Slots without an actor whose bundle is placed: room for one more actor."""
        return self._placement()[1]

    def bundle_options(self, slot: int) -> dict[str, Any]:
        """Ray options that pin an actor or task to slot ``slot``'s bundle with that bundle's CPUs and GPUs."""
        group, index = self._bundles[slot]
        return {
            "num_cpus": self.resources.cpus,
            "num_gpus": self.resources.gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=index,
                placement_group_capture_child_tasks=True,
            ),
        }

    def spawn(
        self, actor_class: type, arguments: Callable[[int], tuple[tuple, dict]], *,
        name: Callable[[int], str] | None = None, max_restarts: int = 0, log_dir: Path | None = None,
    ) -> list:
        """One ``actor_class`` in each of the ``count`` slots the role needs; the actor of slot ``i`` gets
        ``*args, **kwargs = arguments(i)`` and the Ray name ``name(i)`` (default ``<role>-<i>``). With ``log_dir``
        each actor's output goes to ``log_dir/<name>.log`` instead of the console (asyppo.cluster.logs). Returns the
        actor handles (also kept in ``self.actors``)."""
        remote_class = ray.remote(with_output_to(actor_class, log_dir) if log_dir else actor_class)
        self._start = (remote_class, arguments, name or (lambda slot: f"{self.role}-{slot}"), max_restarts)
        for slot in range(self.resources.count):
            self.add(slot)
        # Spare bundles that fit the cluster now are placed within moments of the role's own: start those too.
        spares = [group for group, _ in self._bundles[self.resources.count:]]
        if spares:
            ray.wait([group.ready() for group in spares], num_returns=len(spares), timeout=SPARE_PLACEMENT_S)
        for slot in self.ready_slots():
            self.add(slot)
        return self.actors

    def add(self, slot: int):
        """Start the role's actor in ``slot`` (after :meth:`spawn`); returns its handle, last in ``self.actors``."""
        remote_class, arguments, name, max_restarts = self._start
        args, kwargs = arguments(slot)
        self.names.append(name(slot))
        self.slots.append(slot)
        self._pids.append(None)
        self.actors.append(remote_class.options(
            name=self.names[-1], max_restarts=max_restarts, **self.bundle_options(slot),
        ).remote(*args, **kwargs))
        return self.actors[-1]

    def remove(self, name: str) -> None:
        """Let actor ``name`` go (killed, never restarted); its slot asks for a bundle again, placed when room
        returns."""
        index = self.names.index(name)
        ray.kill(self.actors[index], no_restart=True)
        slot = self.slots[index]
        for column in (self.actors, self.names, self.slots, self._pids):
            del column[index]
        if self._own_groups:
            remove_placement_group(self._bundles[slot][0])
            self._bundles[slot] = (self._new_group(slot), 0)

    def note_pids(self, pids: list[int]) -> list[int]:
        """Record each actor's process id (in actor order); returns the indices whose process changed since the
        last call, i.e. the actors Ray restarted meanwhile."""
        restarted = [i for i, (old, new) in enumerate(zip(self._pids, pids)) if old is not None and old != new]
        self._pids = list(pids)
        return restarted

    def actor_names(self) -> dict[str, str]:
        """Ray actor id (hex) → the actor's name, to say which actor an error or a missing answer came from."""
        return {actor._actor_id.hex(): name for actor, name in zip(self.actors, self.names)}

    def call(self, method: str, *args, **kwargs) -> list:
        """``actor.method.remote(*args, **kwargs)`` on every actor; the ObjectRefs in actor order."""
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def __len__(self) -> int:
        return len(self.actors)

    def __iter__(self):
        return iter(self.actors)

    def __getitem__(self, index: int):
        return self.actors[index]

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors, self.names, self.slots, self._pids = [], [], [], []
        groups, self._bundles = self._groups(), []
        for group in groups:
            remove_placement_group(group)
