"""The job's actors and what happens when one fails (docs/reliability.md).

:class:`Supervisor` starts the three actor groups (rollout workers, learner ranks, critics), waits on every call
with the job's timeout, and turns each failure into one line that names the actor and the phase and says how to
resume. When Ray restarts a dead actor (``trainer.actor_restarts``), the supervisor brings it back to the job's
state: a rollout worker gets the learner's current weights and rejoins the weight-sync group, a critic is restored
from the run's latest checkpoint (the driver looks for restarted critics before every scoring, training and checkpoint,
and a critic whose process was replaced between scoring and training says so: :class:`CriticStateLost`). It also owns
the connection to Ray and the stop signals.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch

from asyppo.actors.rollout_worker import RolloutWorker
from asyppo.cluster.actor_group import ActorGroup, role_resources, total_cpus
from asyppo.cluster.checkpoint import CheckpointDir
from asyppo.cluster.errors import ActorLost, JobFailed
from asyppo.cluster.logs import route_library_loggers, route_raylet_messages
from asyppo.common.config import JobConfig
from asyppo.common.network import (
    LOOPBACK, is_loopback_address, keep_loopback_node_address, loopback_interface, node_address_and_free_port,
)
from asyppo.core.seeds import derive_seed
from asyppo.critics.mini_critic import CriticStateLost, MiniCritic, checkpoint_parts
from asyppo.learner.learner import Learner

log = logging.getLogger("asyppo")

NODE_CHECK_S = 5.0  # how often a long wait looks whether a role lost its node (Supervisor.waiting_for_node)


class Supervisor:
    """The actor groups of one job, their calls, and their restarts."""

    def __init__(self, cfg: JobConfig, run_path: Path, checkpoints: CheckpointDir, last_checkpoint: Path | None):
        self.cfg = cfg
        self.run_path = run_path
        self.checkpoints = checkpoints
        self.last_checkpoint = last_checkpoint  # what a restarted critic is restored from
        self.restarts: dict[str, int] = {}  # actor name → times Ray restarted it
        self.rollout_workers: ActorGroup | None = None
        self.learners: ActorGroup | None = None
        self.critics: ActorGroup | None = None
        self.engine_max_len = 0  # the longest sequence every rollout engine takes (max_model_len)
        self._node_wait_started: float | None = None  # when a role began to wait for a node (waiting_for_node)
        self._nodes: dict[str, dict] | None = None  # node id → ray.nodes() entry, at the last note_nodes
        self._placement: dict | None = None
        self._sync_members: list[str] = []  # the rollout workers in the weight-sync group, when it was formed

    # ---- starting ------------------------------------------------------------------------------------------------

    def spawn(self, models, reward_fn, *, policy_dir: str, resume_dir: str | None, version: int) -> None:
        """Every actor of the job, ready for step one: rollout engines and critics start from the base models, so
        that Ray can restart them at any time (their constructors run again) even after the checkpoint a run
        resumed from has been rotated away; the resumed state reaches them here (the weight broadcast,
        ``MiniCritic.restore``)."""
        cfg = self.cfg
        restarts = cfg.trainer.actor_restarts
        log_dir = None if cfg.logging.verbose else self.run_path / "logs"
        self.rollout_workers = spawn_rollout_workers(cfg, models.policy, reward_fn, max_restarts=restarts,
                                                     log_dir=log_dir)
        self.learners = ActorGroup("learner", role_resources(cfg)["learner"], pack=True)
        address, port = self.get(_learner_address.options(**self.learners.bundle_options(0)).remote(),
                                 "placing the learner", starting=True)
        state_dir = str(Path(resume_dir) / "policy_state") if resume_dir else None
        self.learners.spawn(
            Learner,
            lambda rank: learner_arguments(cfg, policy_dir, rank=rank, world_size=cfg.learner_ranks,
                                           master_addr=address, master_port=port, resume_state_dir=state_dir,
                                           reference_path=models.policy),
            name=lambda rank: "learner" if rank == 0 else f"learner-rank{rank}", log_dir=log_dir,
        )
        if cfg.critics.num_critics:
            self.critics = ActorGroup("critics", role_resources(cfg)["critics"])
            self.critics.spawn(MiniCritic, lambda m: critic_arguments(cfg, models.critic, m),
                               name=lambda m: f"critic-{m}", max_restarts=restarts, log_dir=log_dir)
        self._wait_until_ready(resume_dir, version)

    def _wait_until_ready(self, resume_dir: str | None, version: int) -> None:
        self.get(self.learners.call("ping"), "starting the learner", starting=True)
        if self.critics:
            self.critics.note_pids(self.get(self.critics.call("pid"), "starting the critics", starting=True))
            if resume_dir:
                self._restore_critics_from(Path(resume_dir), self.critics.slots, "restoring the critics")
        healths = self.get(self.rollout_workers.call("health"), "starting the rollout engines", starting=True)
        self.rollout_workers.note_pids([health["pid"] for health in healths])
        self.engine_max_len = min(health["max_model_len"] for health in healths)
        self.get(self.learners.call("set_version", version), "setting the version")
        self.form_weight_sync_group("creating the learner → rollout weight-sync group")
        if version:
            # Resumed: the rollout engines hold the base model; send them the checkpoint's policy and version.
            self.get(self.learners.call("broadcast_weights"), "initial weight broadcast")

    def form_weight_sync_group(self, what: str) -> None:
        roll = self.cfg.rollout
        self.get(self.learners[0].setup_weight_sync.remote(
            list(self.rollout_workers), max(1, roll.gpus_per_worker), self.cfg.weight_sync, roll.gpus_per_worker > 0,
        ), what)
        self._sync_members = list(self.rollout_workers.names)

    # ---- nodes that leave and join: a range of rollout workers, the critics' quorum --------------------------------

    def resize_rollout_workers(self, what: str, version: int) -> None:
        """At a step boundary, with every rollout worker idle (rollout.num_workers a range, docs/scaling.md):
        :meth:`rescale` the workers, then the new ones load the learner's weights ``version`` and the weight-sync
        group is formed again over the workers there are now."""
        if any(self.rescale(self.rollout_workers, what)):
            self.restore_rollout_workers(what, version)

    def rescale_critics(self, what: str) -> None:
        """Before a step's scoring (critics.quorum, docs/scaling.md): :meth:`rescale` the critics; one that starts
        again in its bundle, placed anew, resumes from the run's latest checkpoint (the initial critic without one),
        having missed the steps since."""
        _, joined = self.rescale(self.critics, what)
        if joined:
            self.restore_critics(f"{what}: starting {', '.join(joined)}", starting=True)  # a first pid: no restart
            self._restore_critics_from(self.last_checkpoint,
                                       [self.critics.slots[self.critics.names.index(name)] for name in joined], what)
            source = (f"the checkpoint {self.last_checkpoint.name}" if self.last_checkpoint is not None else
                      "the initial critic (no checkpoint yet)")
            for name in joined:
                log.warning("%s: %s resumed from %s and takes part again; its training since then is lost", what,
                            name, source)

    def rescale(self, group: ActorGroup, what: str, *, join: bool = True) -> tuple[list[str], list[str]]:
        """The actors of ``group`` whose node left the cluster are let go (the job goes on with fewer, their bundles
        wait for room) as long as the role keeps what it needs (``RoleResources.needed``: the low end of a range of
        rollout workers, the critics' quorum), counting the placed bundles its actors could start in; with ``join``,
        an actor starts in every bundle of the role that a joining node made room for. Each logged; returns the names
        gone and joined (both empty for a role of fixed size). A new actor is as its constructor leaves it: the
        caller brings it up to date."""
        gone, joined = [], []
        room = len(group.ready_slots())
        for name in group.unplaced():
            if len(group) - 1 + room < group.resources.needed:
                break  # the rest are needed: waiting_for_node waits for a node for them
            group.remove(name)
            gone.append(name)
            log.warning("%s: %s left with its node: %s", what, name, self._count(group))
        for slot in group.ready_slots() if join else []:
            group.add(slot)
            joined.append(group.names[-1])
            log.warning("%s: %s joined on node %s: %s", what, joined[-1], group.nodes()[joined[-1]][:8],
                        self._count(group))
        return gone, joined

    def _count(self, group: ActorGroup) -> str:
        if group is self.critics:
            return (f"critics taking part now {len(group)} of {self.cfg.critics.num_critics} "
                    f"(critics.quorum={self.cfg.critics.quorum})")
        return f"rollout workers now {len(group)} (rollout.num_workers={list(self.cfg.rollout.num_workers)})"

    # ---- waiting -------------------------------------------------------------------------------------------------

    def get(self, refs, what: str, *, starting: bool = False):
        """ray.get with the job's timeout: trainer.call_timeout_s, or trainer.start_timeout_s for calls that wait for
        an actor to start (``starting``). Every failure becomes one line naming the actor and the phase (``what``)
        and saying how to resume: a hung actor (no answer in time), a dead one (:class:`ActorLost`,
        which the phases that can bring a restarted actor back catch; also a critic that Ray restarted between its
        scoring and its training, :class:`CriticStateLost`), an exception raised inside an actor (its remote
        traceback goes to ``<run>/error.log``)."""
        field, timeout = self.timeout(starting)
        try:
            return self._get_within(refs, timeout)
        except ray.exceptions.GetTimeoutError:
            waiting = ", ".join(self._unanswered(refs)) or "a task"
            raise JobFailed(
                f"{what}: no answer from {waiting} within trainer.{field}={timeout:g}s (the process is alive but "
                f"not answering: stopped, deadlocked or far slower than expected; `ray stack` on its node shows where "
                f"it waits){self.resume_hint()}"
            ) from None
        except ray.exceptions.RayActorError as exc:  # before RayTaskError: a task that depended on a dead actor is both
            name = self._actor_name(getattr(exc, "actor_id", None))
            cause = ("its node left the cluster" if self._node_lost(name) else
                     "its process exited: killed, out of memory or crashed; its log is in the Ray dashboard")
            raise ActorLost(f"{what}: {name} died ({cause}){self.resume_hint()}", name,
                            unavailable=isinstance(exc, ray.exceptions.ActorUnavailableError)) from None
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, CriticStateLost):  # its process died after scoring: like a critic lost in a call
                name = self._failed_actor(refs)
                raise ActorLost(f"{what}: {name} was restarted after it scored the batch and lost its scores "
                                f"({exc.cause}){self.resume_hint()}", name) from None
            details = self.run_path / "error.log"
            with details.open("a") as file:
                file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n{exc}\n")
            cause = exc.cause
            raise JobFailed(f"{what}: {self._failed_actor(refs)} raised {type(cause).__name__}: {cause} "
                            f"(traceback in {details}){self.resume_hint()}") from None

    def _get_within(self, refs, timeout: float):
        """``ray.get(refs)`` within ``timeout`` seconds, looking every NODE_CHECK_S whether a role waits for a node
        (:meth:`waiting_for_node`): meanwhile the clock stands still, and it starts again once the role is placed."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                return ray.get(refs, timeout=max(0.0, min(NODE_CHECK_S, remaining)))
            except ray.exceptions.GetTimeoutError:
                if self.waiting_for_node():
                    deadline = time.monotonic() + timeout
                elif remaining <= NODE_CHECK_S:
                    raise

    def waiting_for_node(self) -> bool:
        """Whether a role's placement lost a node and waits for one with room (Ray re-places the bundle, and restarts
        the actor in it, as soon as one joins). The wait's start and end are logged; one longer than
        trainer.node_wait_s ends the job, naming what it waits for."""
        needs = {group: group.needs_node() for group in self._groups()}
        unplaced = [group for group, names in needs.items() if names]
        now = time.monotonic()
        if not unplaced:
            if self._node_wait_started is not None:
                log.warning("a node with room joined after %.0fs: every role is placed again",
                            now - self._node_wait_started)
                self._node_wait_started = None
            return False
        if self.learners in unplaced:  # the learner is never restarted (docs/reliability.md): nothing to wait for
            raise JobFailed(f"the node holding the learner was lost, and the learner with it{self.resume_hint()}")
        needs = "; ".join(f"the {group.role} role needs {group.resources.describe()} for {', '.join(needs[group])}"
                          for group in unplaced)
        limit = self.cfg.trainer.node_wait_s
        if self._node_wait_started is None:
            self._node_wait_started = now
            log.warning("a node was lost and no other has room (%s): waiting up to trainer.node_wait_s=%gs for a "
                        "node to join", needs, limit)
        elif now - self._node_wait_started > limit:
            raise JobFailed(f"a node was lost and none with room joined within trainer.node_wait_s={limit:g}s ({needs}): "
                            f"add such a node{self.resume_hint() or ' and start the run again'}")
        return True

    def note_nodes(self) -> int:
        """The cluster's live nodes now, each one that joined or left since the last look logged on one line;
        returns how many are alive. Where each actor runs goes to ``<run>/placement.json`` when it changed."""
        alive = {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}
        if self._nodes is not None:
            for node_id in alive.keys() - self._nodes.keys():
                log.warning("node %s joined the cluster (%s)", node_id[:8], _node_kind(alive[node_id]))
            for node_id in self._nodes.keys() - alive.keys():
                log.warning("node %s left the cluster (%s)", node_id[:8], _node_kind(self._nodes[node_id]))
        self._nodes = alive
        placement = {name: {"node": node, "node_type": group.resources.node_type}
                     for group in self._groups() for name, node in group.nodes().items()}
        if placement != self._placement:
            self._placement = placement
            (self.run_path / "placement.json").write_text(json.dumps(placement, indent=1))
        return len(alive)

    def timeout(self, starting: bool) -> tuple[str, float]:
        """The trainer field that bounds a wait, and its value: start_timeout_s for an actor that is starting (or
        restarting), call_timeout_s for a call."""
        field = "start_timeout_s" if starting else "call_timeout_s"
        return field, getattr(self.cfg.trainer, field)

    def wait_finished(self, refs: list, what: str) -> None:
        """Wait until every call of ``refs`` has finished, well or not (a failure surfaces where its result is
        read), up to trainer.call_timeout_s; then a one-line failure naming the actors still busy."""
        if not refs:
            return
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.trainer.call_timeout_s)
        if waiting:
            raise JobFailed(
                f"{what}: {', '.join(self._unanswered(waiting))} still busy after trainer.call_timeout_s="
                f"{self.cfg.trainer.call_timeout_s:g}s{self.resume_hint()}")

    def resume_hint(self) -> str:
        """How to continue this run from its latest checkpoint (appended to every fatal error)."""
        if self.checkpoints.latest() is None:
            return ""
        return f"; resume with: asyppo train --config {self.run_path / 'config.yaml'} --resume"

    def _groups(self) -> list[ActorGroup]:
        return [group for group in (self.rollout_workers, self.learners, self.critics) if group is not None]

    def _actor_name(self, actor_id: str | None) -> str:
        for group in self._groups():
            if actor_id in group.actor_names():
                return group.actor_names()[actor_id]
        return "an actor"

    def _node_lost(self, name: str) -> bool:
        """Whether the bundle of actor ``name`` lost its node (it waits for another)."""
        return any(group.nodes().get(name, "") is None for group in self._groups())

    def _failed_actor(self, refs) -> str:
        """The name of the actor whose call among ``refs`` (all answered) raised first."""
        for ref in refs if isinstance(refs, list) else [refs]:
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.GetTimeoutError:
                continue
            except Exception:  # noqa: BLE001 - any other error marks the call that failed
                return self._actor_name(ref.task_id().actor_id().hex())
        return "an actor"

    def _unanswered(self, refs) -> list[str]:
        """Names of the actors whose calls among ``refs`` have not answered yet (each once, in call order)."""
        refs = refs if isinstance(refs, list) else [refs]
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=0)
        names = [self._actor_name(ref.task_id().actor_id().hex()) for ref in waiting]
        return list(dict.fromkeys(names))

    def answers(self, group: ActorGroup, method: str, what: str, *, starting: bool = False) -> list:
        """Every actor's answer to ``method``, waiting while Ray restarts one: right after a death Ray reports the
        actor unavailable, then queues calls until its constructor has run again. ``starting``: a restart is
        expected (a call to the group just failed), so the wait is trainer.start_timeout_s, not call_timeout_s."""
        deadline = time.monotonic() + self.timeout(starting)[1]
        while True:
            try:
                return self.get(group.call(method), f"{what}: waiting for the {group.role}", starting=starting)
            except ActorLost as lost:
                # A rollout worker of a range, or a critic within the quorum, whose node left: the job goes on without.
                # (Critics join again at a step's start only: rescale_critics.)
                if any(self.rescale(group, what, join=group is self.rollout_workers)):
                    continue
                if lost.unavailable and self.waiting_for_node():  # its restart waits for a node to join
                    deadline = time.monotonic() + self.timeout(starting)[1]
                if lost.unavailable and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                if lost.unavailable:
                    raise
                raise ActorLost(f"{what}: {lost.actor} died and Ray could not bring it back (trainer.actor_restarts="
                                f"{self.cfg.trainer.actor_restarts}){self.resume_hint()}", lost.actor) from None

    # ---- restarted actors ----------------------------------------------------------------------------------------

    def restore_rollout_workers(self, what: str, version: int) -> bool:
        """Bring every rollout worker to the learner's weights ``version`` after some were restarted by Ray, joined
        or left (a range of them), or left a transfer half-done: wait for them to answer (letting go of those of a
        range whose node left), load the weights through the object store where they are missing, and re-form the
        weight-sync group when a member is new or gone.

        Returns whether the workers changed since the last look: one was restarted (each logged), joined or left. A
        worker whose restarts are used up (trainer.actor_restarts) ends the job with :class:`ActorLost`.
        """
        workers = self.rollout_workers
        healths = self.answers(workers, "health", what, starting=True)
        restarted = workers.note_pids([health["pid"] for health in healths])
        behind = [i for i, health in enumerate(healths)
                  if health["weight_version"] != version or not health["weights_valid"]]
        if behind:
            weights = self.learners.call("weights_for_rollout")  # every rank joins the gather; rank 0 answers
            loads = [workers[i].receive_weights_from_object_store.remote(weights[0], version) for i in behind]
            self.get(loads + weights[1:], f"{what}: sending weights v{version} to restarted rollout workers")
        members_changed = self._sync_members != workers.names
        if restarted or members_changed or not all(health["in_sync_group"] for health in healths):
            self.form_weight_sync_group(f"{what}: re-forming the weight-sync group")
        self._note_restarts([workers.names[i] for i in restarted], f"holds the learner's weights v{version} and "
                                                                   "rejoined the weight-sync group")
        return bool(restarted) or members_changed

    def restore_critics(self, what: str, pids: list[int] | None = None, *, starting: bool = False) -> list[int]:
        """Critics that Ray restarted since the last look (their constructor ran again: the initial critic) get
        their state from the run's latest checkpoint. Returns their slots (critic indices). ``pids``: the critics'
        process ids (in actor order) as some call just returned them (:meth:`MiniCritic.save`), instead of asking
        each critic; ``starting``: a critic's call just failed, so one may be starting again (:meth:`answers`)."""
        critics = self.critics
        if pids is None:
            pids = self.answers(critics, "pid", what, starting=starting)
        positions = critics.note_pids(pids)
        restarted = [critics.slots[i] for i in positions]
        self._restore_critics_from(self.last_checkpoint, restarted, what)
        source = (f"was restored from the checkpoint {self.last_checkpoint.name}; its training since then is lost"
                  if self.last_checkpoint is not None else
                  "starts again from the initial critic (no checkpoint yet): its training so far is lost")
        self._note_restarts([critics.names[i] for i in positions], source)
        return restarted

    def _restore_critics_from(self, checkpoint: Path | None, slots: list[int], what: str) -> None:
        """Critics ``slots`` to their state in ``checkpoint``; without a checkpoint, or one written while a critic sat
        out before any checkpoint held it, that critic stays the initial critic (said in the log)."""
        if checkpoint is None or not slots:
            return
        saved = [m for m in slots if checkpoint_parts(checkpoint, m)[1].is_dir()]
        for m in sorted(set(slots) - set(saved)):
            log.warning("%s: critic-%d starts from the initial critic: the checkpoint %s holds no state of it (it sat "
                        "out since before the run's first checkpoint)", what, m, checkpoint.name)
        self.get([self.critics.actor(m).restore.remote(str(checkpoint)) for m in saved],
                 f"{what}: restoring {', '.join(f'critic-{m}' for m in saved)} from {checkpoint}")

    def critic_calls(self, what: str, launch, relaunch=None) -> dict[int, Any]:
        """``launch(m)`` on every critic taking part (m: the critic's index), then their results by index. A critic
        whose process died (during the call, or before it and lost its scores: :class:`CriticStateLost`) is restored
        (:meth:`restore_critics`) and ``relaunch(m)`` (default ``launch``) runs on it; one whose node left with no
        room for it sits out while critics.quorum remain (:meth:`rescale`): it has no result."""
        refs = {m: launch(m) for m in self.critics.slots}
        for _ in range((self.cfg.trainer.actor_restarts + 1) * len(refs)):
            try:
                return dict(zip(refs, self.get(list(refs.values()), what)))
            except ActorLost as lost:
                if lost.actor not in self.critics.names:
                    raise
                failed = self.critics.slots[self.critics.names.index(lost.actor)]
                self.rescale(self.critics, what, join=False)
                # The critic whose call failed runs again even when its restart was noted before (and restored).
                again = {*self.restore_critics(what, starting=True), failed}
                refs = {m: (relaunch or launch)(m) if m in again else refs[m] for m in self.critics.slots}
        return dict(zip(refs, self.get(list(refs.values()), what)))

    def save_critics(self, directory: str, what: str) -> None:
        """Every critic's state into ``directory``. A critic that Ray restarted since its training (an initial
        critic) is never saved as the run's: it is restored from the last checkpoint first (its training since then
        is lost, and the log says so), whether found before the save or by a save that a process newer than the
        last look made; each round is a restart, so trainer.actor_restarts bounds the rounds. A critic sitting out
        (critics.quorum) keeps the state the last checkpoint holds of it, copied over."""
        def save(m: int):
            return self.critics.actor(m).save.remote(directory)

        self.restore_critics(what)
        pids = self.critic_calls(what, save)
        while self.restore_critics(what, [pids[m] for m in self.critics.slots]):
            pids = self.critic_calls(what, save)
        for m in sorted(set(range(self.cfg.critics.num_critics)) - set(self.critics.slots)):
            if self.last_checkpoint is not None and checkpoint_parts(self.last_checkpoint, m)[1].is_dir():
                for kept, copy in zip(checkpoint_parts(self.last_checkpoint, m), checkpoint_parts(directory, m)):
                    shutil.copytree(kept, copy)

    def _note_restarts(self, names: list[str], outcome: str) -> None:
        for name in names:
            self.restarts[name] = self.restarts.get(name, 0) + 1
            log.warning("%s died and Ray restarted it (restart %d of trainer.actor_restarts=%d); it %s",
                        name, self.restarts[name], self.cfg.trainer.actor_restarts, outcome)

    def close(self) -> None:
        """Kill every actor and release its placement group; safe to call more than once."""
        for group in self._groups():
            group.close()
        self.rollout_workers = self.learners = self.critics = None


def _node_kind(node: dict) -> str:
    """A ``ray.nodes()`` entry in words: its CPUs, GPUs and custom resources (its node type)."""
    resources = node.get("Resources", {})
    custom = [name for name in resources if name not in ("CPU", "GPU", "memory", "object_store_memory")
              and not name.startswith(("node:", "accelerator_type:"))]
    kind = f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
    return kind + (f", type {', '.join(custom)}" if custom else "")


def learner_arguments(cfg: JobConfig, policy_dir: str, **rank: Any) -> tuple[tuple, dict]:
    """``Learner(*args, **kwargs)`` for this job: the sections it uses, the few settings it needs from others, and
    ``rank`` (rank, world_size, master_addr, master_port, resume_state_dir)."""
    return (policy_dir, cfg.algorithm, cfg.learner), dict(
        temperature=cfg.rollout.temperature, dtype=cfg.model.dtype, seed=cfg.trainer.seed,
        timeout_s=cfg.trainer.call_timeout_s, total_steps=cfg.trainer.steps, **rank,
    )


def critic_arguments(cfg: JobConfig, critic_dir: str, index: int) -> tuple[tuple, dict]:
    """``MiniCritic(*args, **kwargs)`` for critic ``index`` of this job."""
    return (critic_dir, index, cfg.critics, cfg.algorithm), dict(
        dtype=cfg.model.dtype, seed=cfg.trainer.seed, timeout_s=cfg.trainer.call_timeout_s,
        total_steps=cfg.trainer.steps, num_layers=cfg.model.critic_layers,
    )


def spawn_rollout_workers(cfg: JobConfig, policy_dir: str, reward_fn, *, max_restarts: int = 0,
                          log_dir: Path | None = None) -> ActorGroup:
    """``rollout-0`` … : one vLLM engine per actor, tensor-parallel over its bundle's GPUs; their output goes to
    ``log_dir`` when given (asyppo.cluster.logs)."""
    roll = cfg.rollout
    group = ActorGroup("rollout", role_resources(cfg)["rollout"])
    try:
        group.spawn(RolloutWorker, lambda i: ((policy_dir,), dict(
            reward_fn=reward_fn, worker_index=i, tensor_parallel_size=max(1, roll.gpus_per_worker),
            dtype=cfg.model.dtype, seed=derive_seed(cfg.trainer.seed, "engine", i), max_model_len=roll.max_model_len,
            gpu_memory_utilization=roll.gpu_memory_utilization, cpu_kv_cache_gib=roll.cpu_kv_cache_gib,
            prompt_format=cfg.prompt_format,
        )), max_restarts=max_restarts, log_dir=log_dir)
    except BaseException:
        group.close()
        raise
    return group


# A task that imports only asyppo.common.network: it answers before the roles' heavy imports would have loaded.
_learner_address = ray.remote(num_cpus=0)(node_address_and_free_port)


def connect_ray(cfg: JobConfig) -> bool:
    """Join ``RAY_ADDRESS`` if set, else start an embedded local cluster sized for the job (never a cluster that
    Ray's address file names: that one is joined only through ``RAY_ADDRESS``). True if we started it.

    Actors' output reaches the console only with ``logging.verbose``; otherwise it is in ``<run>/logs/``."""
    if ray.is_initialized():
        return False
    verbose = cfg.logging.verbose
    if not verbose:
        route_library_loggers()
    quiet = {"log_to_driver": verbose, "configure_logging": verbose}
    started = not os.environ.get("RAY_ADDRESS")
    if not started:
        # No runtime_env here: inside `ray job submit` the job's own runtime env applies, and a second one that
        # sets the same variables makes Ray refuse the job. A cluster addressed on 127.0.0.1 is on this machine
        # (`asyppo local-cluster`): the driver keeps that address too, which Ray would replace by the machine's
        # network address, where the cluster's nodes do not listen.
        address = os.environ["RAY_ADDRESS"]
        with keep_loopback_node_address() if is_loopback_address(address) else contextlib.nullcontext():
            ray.init(address=address, **quiet)
    else:
        # Logical CPUs: fractional roles share this machine's cores (docs/architecture.md, "Scaling knobs").
        needed = math.ceil(total_cpus(cfg, spares=True)) + 1
        # address="local": a cluster of the job's own, even when Ray's address file (left by `ray start`, perhaps by
        # a cluster that has since died) names another; without it ray.init would try to join that one.
        # Every process of a cluster of the job's own listens on 127.0.0.1 only (docs/deploy.md, "Network"): Ray
        # binds its servers to the node's address, the job's process groups serve their stores there, and gloo
        # takes the loopback interface (else the one the host name resolves to).
        with keep_loopback_node_address():
            context = ray.init(address="local", num_cpus=max(needed, os.cpu_count() or 1),
                               num_gpus=torch.cuda.device_count(), object_store_memory=512 * 1024**2,
                               _node_ip_address=LOOPBACK, runtime_env={"env_vars": _gloo_on_loopback()}, **quiet)
        if context.dashboard_url:
            log.info("Ray dashboard: http://%s", context.dashboard_url)
    if not verbose:
        route_raylet_messages()
    return started


def _gloo_on_loopback() -> dict[str, str]:
    interface = loopback_interface()
    return {"GLOO_SOCKET_IFNAME": interface} if interface else {}


class StopSignals:
    """SIGTERM or SIGINT (a user stopping the run, a cluster preempting a node): the first one lets the current step
    finish, then the driver saves a checkpoint and stops; a second one exits at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        # Signal handlers belong to the main thread; elsewhere (a notebook's worker thread) the defaults stay.
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise SystemExit(128 + signum)
        self.received = signum
        log.warning("%s received: finishing this step, then saving a checkpoint and stopping (send it again to "
                    "stop at once, losing the steps since the last checkpoint)", signal.Signals(signum).name)
