"""The driver loop: one AsyPPO training step after another on a Ray cluster (docs/architecture.md, "One training step").

Per step: rollout workers generate and score → the learner recomputes logπ_old/H_old while every critic scores
every token → the learner computes σ, masks and advantages → critics train on their shards while the learner runs
its PPO + ERC update → the learner broadcasts its weights → the driver checks that the rollout engines now assign
the learner's log-probs. With ``trainer.max_staleness = K ≥ 1`` the rollouts of the next K steps are already in
flight while a step trains.

Batches travel through Ray's object store: the rollout batch is ``ray.put`` once and every actor receives the same
reference; critic values go from the critics straight to the learner, and the learner's returns straight to the
critics, without passing through the driver.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from asyppo.cluster.actor_group import ActorGroup, fit_to_cluster, role_resources, total_cpus
from asyppo.cluster.checkpoint import CheckpointDir, read_trainer_state
from asyppo.common.config import (
    BUILTIN_CRITIC, BUILTIN_POLICY, CRITIC_IS_POLICY, RELATIVE_RUN_DIR, ConfigError, JobConfig, load_config,
    resume_changes,
)
from asyppo.cluster.logs import RunLog, route_library_loggers
from asyppo.cluster.metrics import MetricsSink, generation_samples, sample_rows
from asyppo.cluster.preflight import preflight_problems
from asyppo.core.batch import collate_rollouts, concat_batches, select_groups, uniform_groups
from asyppo.tasks.problems import Problem
from asyppo.tasks.registry import TASKS, load_problems
from asyppo.weight_sync.protocol import WeightSyncError, probe_mismatch

log = logging.getLogger("asyppo")


class JobFailed(RuntimeError):
    """The job cannot go on (a dead actor, a timeout, stale weights); the message says which and what to do."""

    exit_code = 1


class ActorLost(JobFailed):
    """An actor's process died during a call; ``actor`` is its name (``rollout-0``, ``critic-1``, ``learner``).
    ``unavailable``: Ray reported it temporarily unreachable (it may be restarting), not dead for good."""

    def __init__(self, message: str, actor: str, unavailable: bool = False):
        super().__init__(message)
        self.actor = actor
        self.unavailable = unavailable


class JobStopped(JobFailed):
    """The job was stopped on purpose (SIGTERM, Ctrl-C) after saving a checkpoint; exits with 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


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


@dataclass
class Models:
    policy: str
    critic: str


def resolve_models(cfg: JobConfig) -> Models:
    """Local model directories for the policy and the critics; the built-in ones are bootstrapped (cached)."""
    paths = {"model.policy": cfg.model.policy, "model.critic": cfg.model.critic}
    if {BUILTIN_POLICY, BUILTIN_CRITIC} & set(paths.values()):
        task = TASKS[cfg.data.task]
        if task.builtin_models is None:
            field = "model.policy" if paths["model.policy"] == BUILTIN_POLICY else "model.critic"
            raise JobFailed(f"{field}: the task {task.name!r} has no built-in models; point model.policy and "
                            f"model.critic at local Hugging Face directories")
        builtin = task.builtin_models(cfg.trainer.seed, log.info)
        pick = {BUILTIN_POLICY: str(builtin.policy_dir), BUILTIN_CRITIC: str(builtin.critic_dir)}
        paths = {field: pick.get(path, path) for field, path in paths.items()}
    if paths["model.critic"] == CRITIC_IS_POLICY:
        paths["model.critic"] = paths["model.policy"]
    for field, path in paths.items():
        if not (Path(path) / "config.json").is_file():
            raise JobFailed(f"{field}: {path} is not a local Hugging Face model directory (no config.json)")
    return Models(paths["model.policy"], paths["model.critic"])


def load_datasets(cfg: JobConfig):
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


def eval_prefix(name: str) -> str:
    """Metric prefix of a held-out set: ``eval_`` for data.eval, ``eval_<name>_`` for an evaluation.sets entry."""
    return f"eval_{name}_" if name else "eval_"


def evaluation_metrics(name: str, sampled: list[dict], greedy: list[dict], k: int) -> dict[str, float]:
    """One held-out set's numbers (docs/monitoring.md, "Evaluation") from the rollout outputs of its k sampled
    responses per problem (prompt-major rows) and its greedy ones: ``accuracy`` is avg@k (the mean verdict over
    all k·P responses), ``pass_at_k`` the fraction of problems with at least one of its k responses correct."""
    correct = torch.cat([torch.as_tensor(out["correct"]) for out in sampled]).view(-1, k).float()
    greedy_correct = torch.cat([torch.as_tensor(out["correct"]) for out in greedy]).float()
    prefix = eval_prefix(name)
    return {f"{prefix}accuracy": float(correct.mean()), f"{prefix}accuracy_greedy": float(greedy_correct.mean()),
            f"{prefix}pass_at_k": float(correct.amax(1).mean()), f"{prefix}problems": float(correct.shape[0]),
            f"{prefix}k": float(k)}


def evaluate_sets(held_out: dict[str, list[Problem]], k: int, launch, collect) -> dict[str, float]:
    """Every held-out set scored with ``k`` sampled responses per problem and one greedy, at the fixed evaluation
    seed (:func:`evaluation_metrics`). ``launch(problems, n, greedy)`` starts a generation and ``collect(launched,
    name)`` waits for its outputs; every set is launched before any is collected, so the engines see them all."""
    launched = {name: (launch(problems, k, False), launch(problems, 1, True)) for name, problems in held_out.items()}
    metrics: dict[str, float] = {}
    for name, (sampled, greedy) in launched.items():
        metrics.update(evaluation_metrics(name, collect(sampled, name), collect(greedy, name), k))
    return metrics


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


class Trainer:
    """Owns the actors of one job and runs its steps."""

    def __init__(self, cfg: JobConfig, *, resume: bool = False):
        from transformers import AutoTokenizer

        from asyppo.tasks.problems import PromptSampler

        problems = submitted_run_dir_problems(cfg)
        if problems:
            raise ConfigError(problems)
        self.cfg = cfg = unique_run_path(cfg, resume)
        self.run_path = cfg.run_path
        self.checkpoints = CheckpointDir(self.run_path, cfg.trainer.keep_checkpoints)
        checkpoint = self._resume_point(cfg) if resume else None

        # Everything that can be wrong with the inputs is found before a single actor starts.
        self.train_problems, self.eval_sets = load_datasets(cfg)
        self.models = resolve_models(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(self.models.policy)
        problems = preflight_problems(cfg, self.train_problems, self.eval_sets, self.tokenizer, self.models)
        if problems:
            raise ConfigError(problems)
        self.reward_fn = reward_function(cfg)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.sampler = PromptSampler(self.train_problems, seed=cfg.trainer.seed)
        self._problems_by_id = {problem.id: problem for problem in self.train_problems}

        self.run_path.mkdir(parents=True, exist_ok=True)
        self.run_log = RunLog(self.run_path / "logs")
        log.info("run directory: %s", self.run_path.resolve())
        (self.run_path / "config.yaml").write_text(cfg.to_yaml())
        self.start_step, self.version, self.base_accuracy = 0, 0, None
        # The sampler's state after drawing each launched step's prompts: a checkpoint at step s saves the one of
        # step s, so rollouts already in flight for later steps (max_staleness ≥ 1) are drawn again on resume.
        self._sampler_after_launch: dict[int, dict] = {}
        self._skipped_in_a_row = 0
        policy_dir, resume_dir = self.models.policy, None
        self._last_checkpoint: Path | None = checkpoint  # what a restarted critic is restored from
        self._restarts: dict[str, int] = {}  # actor name → times Ray restarted it
        if checkpoint is not None:
            state = read_trainer_state(checkpoint)
            self.start_step, self.version = state["step"] + 1, state["version"]
            self.base_accuracy = state.get("base_accuracy")
            self.sampler.load_state_dict(state["sampler"])
            policy_dir, resume_dir = str(checkpoint / "policy"), str(checkpoint)
            log.info("resuming %s from %s (step %d)", cfg.trainer.name, checkpoint, self.start_step)

        self.rollout_workers: ActorGroup | None = None
        self.learners: ActorGroup | None = None
        self.critics: ActorGroup | None = None
        self.owns_ray = _connect_ray(cfg)
        # Installed after ray.init, which sets a SIGTERM handler of its own in the driver.
        self.stop_signals = StopSignals()
        self.stop_signals.install()
        try:
            if not self.owns_ray:  # a running cluster: fit it now, or fail now
                self.cfg = cfg = fit_to_cluster(cfg, ray.cluster_resources(), log.warning)
            self._spawn(policy_dir, resume_dir)
            self.sink = MetricsSink(cfg, self.run_path, resumed=checkpoint is not None,
                                    total_steps=cfg.trainer.steps, start_step=self.start_step)
        except BaseException:
            self.close()  # never leave actors, placement groups or an embedded cluster behind
            raise

    # ---- actors -------------------------------------------------------------------------------------------------

    def _spawn(self, policy_dir: str, resume_dir: str | None) -> None:
        from asyppo.critics.mini_critic import MiniCritic
        from asyppo.learner.learner import Learner

        cfg = self.cfg
        resources = role_resources(cfg)
        restarts = cfg.trainer.actor_restarts
        # Rollout engines and critics start from the base models, so that Ray can restart them at any time (their
        # constructors run again) even after the checkpoint a run resumed from has been rotated away; the resumed
        # state reaches them below (the weight broadcast, MiniCritic.restore).
        log_dir = None if cfg.logging.verbose else self.run_path / "logs"
        self.rollout_workers = spawn_rollout_workers(cfg, self.models.policy, self.reward_fn, max_restarts=restarts,
                                                     log_dir=log_dir)
        self.learners = ActorGroup("learner", resources["learner"], pack=True)
        address, port = ray.get(
            _learner_address.options(**self.learners.bundle_options(0)).remote(), timeout=cfg.trainer.call_timeout_s,
        )
        state_dir = str(Path(resume_dir) / "policy_state") if resume_dir else None
        self.learners.spawn(
            Learner,
            lambda rank: learner_arguments(cfg, policy_dir, rank=rank, world_size=cfg.learner_ranks,
                                           master_addr=address, master_port=port, resume_state_dir=state_dir,
                                           reference_path=self.models.policy),
            name=lambda rank: "learner" if rank == 0 else f"learner-rank{rank}", log_dir=log_dir,
        )
        if cfg.critics.num_critics:
            self.critics = ActorGroup("critics", resources["critics"])
            self.critics.spawn(MiniCritic, lambda m: critic_arguments(cfg, self.models.critic, m),
                               name=lambda m: f"critic-{m}", max_restarts=restarts, log_dir=log_dir)
        self._get(self.learners.call("ping"), "starting the learner")
        if self.critics:
            self.critics.note_pids(self._get(self.critics.call("pid"), "starting the critics"))
            if resume_dir:
                self._get(self.critics.call("restore", resume_dir), "restoring the critics")
        healths = self._get(self.rollout_workers.call("health"), "starting the rollout engines")
        self.rollout_workers.note_pids([health["pid"] for health in healths])
        self._get(self.learners.call("set_version", self.version), "setting the version")
        self._form_weight_sync_group("creating the learner → rollout weight-sync group")
        if self.version:
            # Resumed: the rollout engines hold the base model; send them the checkpoint's policy and version.
            self._get(self.learners.call("broadcast_weights"), "initial weight broadcast")

    def _form_weight_sync_group(self, what: str) -> None:
        cfg = self.cfg
        self._get(
            self.learners[0].setup_weight_sync.remote(
                list(self.rollout_workers), max(1, cfg.rollout.gpus_per_worker), cfg.weight_sync,
                cfg.rollout.gpus_per_worker > 0,
            ),
            what,
        )

    def _get(self, refs, what: str):
        """ray.get with the job's timeout. Every failure becomes one line naming the actor and the phase (``what``)
        and saying how to resume: a hung actor (no answer in trainer.call_timeout_s), a dead one (:class:`ActorLost`,
        which the phases that can bring a restarted actor back catch), an exception raised inside an actor (its
        remote traceback goes to ``<run>/error.log``)."""
        try:
            return ray.get(refs, timeout=self.cfg.trainer.call_timeout_s)
        except ray.exceptions.GetTimeoutError:
            waiting = ", ".join(self._unanswered(refs)) or "a task"
            raise JobFailed(
                f"{what}: no answer from {waiting} within trainer.call_timeout_s="
                f"{self.cfg.trainer.call_timeout_s:.0f}s (the process is alive but not answering: stopped, deadlocked "
                f"or far slower than expected; `ray stack` on its node shows where it waits){self._resume_hint()}"
            ) from None
        except ray.exceptions.RayActorError as exc:  # before RayTaskError: a task that depended on a dead actor is both
            name = self._actor_name(getattr(exc, "actor_id", None))
            raise ActorLost(f"{what}: {name} died (its process exited: killed, out of memory or crashed; its log is "
                            f"in the Ray dashboard){self._resume_hint()}", name,
                            unavailable=isinstance(exc, ray.exceptions.ActorUnavailableError)) from None
        except ray.exceptions.RayTaskError as exc:
            details = self.run_path / "error.log"
            with details.open("a") as file:
                file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n{exc}\n")
            cause = exc.cause
            raise JobFailed(f"{what}: {self._failed_actor(refs)} raised {type(cause).__name__}: {cause} "
                            f"(traceback in {details}){self._resume_hint()}") from None

    def _actor_name(self, actor_id: str | None) -> str:
        for group in (self.rollout_workers, self.learners, self.critics):
            if group is not None and actor_id in group.actor_names():
                return group.actor_names()[actor_id]
        return "an actor"

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

    def _resume_point(self, cfg: JobConfig) -> Path:
        """The newest checkpoint whose every file matches its manifest (older ones are the fallback, logged), once
        the config is known to describe the same run."""
        search = self.checkpoints.find_resume_point(log.warning)
        if search.checkpoint is None:
            rejected = f": {search.describe_rejected()}" if search.rejected else ""
            raise JobFailed(f"--resume: no usable checkpoint under {self.checkpoints.root}{rejected}")
        checkpoint = search.checkpoint
        saved = self.run_path / "config.yaml"
        if saved.is_file():
            previous = load_config(saved)
            changes = resume_changes(previous, cfg)
            if changes:
                raise ConfigError(changes)
        return checkpoint

    def _resume_hint(self) -> str:
        """How to continue this run from its latest checkpoint (appended to every fatal error)."""
        if self.checkpoints.latest() is None:
            return ""
        return f"; resume with: asyppo train --config {self.run_path / 'config.yaml'} --resume"

    # ---- one step -------------------------------------------------------------------------------------------

    def _launch_rollout(self, step: int) -> Rollout:
        roll = self.cfg.rollout
        problems = self.sampler.next_batch(roll.prompts_per_step)
        self._sampler_after_launch[step] = self.sampler.state_dict()
        return self._launch(problems, n=roll.samples_per_prompt, seed=self.cfg.trainer.seed * 100_003 + step)

    def _launch(self, problems: list, *, n: int, seed: int, greedy: bool = False) -> Rollout:
        rollout = Rollout(problems, n, seed, version=self.version, refs={}, started=time.perf_counter(), greedy=greedy)
        rollout.refs = generate(self.rollout_workers, self.cfg, problems, n=n, seed=seed, greedy=greedy)
        return rollout

    def _collect(self, rollout: Rollout, what: str) -> list[dict]:
        """Every worker's output, in worker order.

        A worker whose call failed because its process died, or whose output comes from a process that Ray restarted
        before the learner's weights reached it, is brought back (:meth:`_restore_rollout_workers`) and generates
        its slice again with the same seeds: in sync mode the same samples as if it had never died.
        """
        outputs: dict[int, dict] = {}
        attempts = 1 + self.cfg.trainer.actor_restarts * len(self.rollout_workers)
        for _ in range(attempts):
            for index, ref in rollout.refs.items():
                if index in outputs:
                    continue
                try:
                    output = self._get(ref, what)
                except ActorLost:
                    continue
                if output["weight_version"] >= rollout.version:  # else made by a restarted engine's base weights
                    outputs[index] = output
            missing = [index for index in rollout.refs if index not in outputs]
            if not missing:
                return [outputs[index] for index in sorted(outputs)]
            self._restore_rollout_workers(what)
            rollout.refs.update(generate(self.rollout_workers, self.cfg, rollout.problems, n=rollout.n,
                                         seed=rollout.seed, only=missing, greedy=rollout.greedy))
        raise JobFailed(f"{what}: rollout workers kept failing after {attempts} attempts{self._resume_hint()}")

    def _dynamic_sampling(self, step: int, batch, outputs: list[dict]):
        """DAPO's dynamic sampling (docs/algorithms.md §3): prompts whose responses all scored alike carry no GRPO
        gradient, so they are dropped and replaced by prompts drawn afresh, generated in up to
        ``rollout.dynamic_sampling_rounds`` extra rounds of ``prompts_per_step`` prompts each. Surplus informative
        prompts of the last round are discarded; when the rounds run out, dropped prompts fill the batch back to
        its size (counted in ``dynamic_sampling_filled``). Returns (batch, every output generated, stats)."""
        roll = self.cfg.rollout
        wanted, n = roll.prompts_per_step, roll.samples_per_prompt
        informative, uniform = [], []  # sub-batches of whole prompt groups
        first_informative_frac = 1 - float(uniform_groups(batch.scores, n).float().mean())
        rounds = 0
        while True:
            flat = uniform_groups(batch.scores, n).tolist()
            have = sum(len(sub.prompt_ids) for sub in informative)
            take = [group for group, same in enumerate(flat) if not same][:wanted - have]
            informative.append(select_groups(batch, take))
            uniform.append(select_groups(batch, [group for group, same in enumerate(flat) if same]))
            if have + len(take) == wanted or rounds == roll.dynamic_sampling_rounds:
                break
            rounds += 1
            problems = self.sampler.next_batch(wanted)
            refill = self._launch(problems, n=n, seed=self.cfg.trainer.seed * 100_003 + step + 1_000_000_007 * rounds)
            more = self._collect(refill, f"step {step}: dynamic sampling, round {rounds}")
            outputs = outputs + more
            batch = self._collate(problems, more)
        # A checkpoint at this step resumes the sampler after the refills' prompts too.
        self._sampler_after_launch[step] = self.sampler.state_dict()
        missing = wanted - sum(len(sub.prompt_ids) for sub in informative)
        if missing:
            spare = concat_batches([sub for sub in uniform if sub.prompt_ids], self.pad_id)
            informative.append(select_groups(spare, list(range(missing))))
        batch = concat_batches([sub for sub in informative if sub.prompt_ids], self.pad_id)
        stats = {"dynamic_sampling_rounds": float(rounds),
                 "dynamic_sampling_informative_frac": first_informative_frac,
                 "dynamic_sampling_filled": float(missing)}
        return batch, outputs, stats

    def _restore_rollout_workers(self, what: str, version: int | None = None) -> list[int]:
        """Bring every rollout worker to the learner's weights ``version`` (default: the current one) after some
        were restarted by Ray or left a transfer half-done: wait for them to answer, load the weights through the
        object store where they are missing, and re-form the weight-sync group when a member is new or gone.

        Returns the indices of the workers Ray restarted since the last look (each logged). A worker whose restarts
        are used up (trainer.actor_restarts) ends the job with :class:`ActorLost`.
        """
        version = self.version if version is None else version
        workers = self.rollout_workers
        healths = self._answers(workers, "health", what)
        restarted = workers.note_pids([health["pid"] for health in healths])
        behind = [i for i, health in enumerate(healths)
                  if health["weight_version"] != version or not health["weights_valid"]]
        if behind:
            weights = self.learners.call("weights_for_rollout")  # every rank joins the gather; rank 0 answers
            loads = [workers[i].receive_weights_from_object_store.remote(weights[0], version) for i in behind]
            self._get(loads + weights[1:], f"{what}: sending weights v{version} to restarted rollout workers")
        if restarted or not all(health["in_sync_group"] for health in healths):
            self._form_weight_sync_group(f"{what}: re-forming the weight-sync group")
        self._note_restarts(workers, restarted, f"holds the learner's weights v{version} and rejoined the weight-sync "
                                                f"group")
        return restarted

    def _answers(self, group: ActorGroup, method: str, what: str) -> list:
        """Every actor's answer to ``method``, waiting (up to trainer.call_timeout_s) while Ray restarts one: right
        after a death Ray reports the actor unavailable, then queues calls until its constructor has run again."""
        deadline = time.monotonic() + self.cfg.trainer.call_timeout_s
        while True:
            try:
                return self._get(group.call(method), f"{what}: waiting for the {group.role}")
            except ActorLost as lost:
                if lost.unavailable and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                if lost.unavailable:
                    raise
                raise ActorLost(f"{what}: {lost.actor} died and Ray could not bring it back (trainer.actor_restarts="
                                f"{self.cfg.trainer.actor_restarts}){self._resume_hint()}", lost.actor) from None

    def _note_restarts(self, group: ActorGroup, restarted: list[int], outcome: str) -> None:
        for index in restarted:
            name = group.names[index]
            self._restarts[name] = self._restarts.get(name, 0) + 1
            log.warning("%s died and Ray restarted it (restart %d of trainer.actor_restarts=%d); it %s",
                        name, self._restarts[name], self.cfg.trainer.actor_restarts, outcome)

    def _restore_critics(self, what: str) -> list[int]:
        """Critics that Ray restarted since the last look (their constructor ran again: the initial critic) get
        their state from the run's latest checkpoint. Returns their indices."""
        restarted = self.critics.note_pids(self._answers(self.critics, "pid", what))
        if restarted and self._last_checkpoint is not None:
            self._get([self.critics[m].restore.remote(str(self._last_checkpoint)) for m in restarted],
                      f"{what}: restoring restarted critics from {self._last_checkpoint}")
        source = (f"was restored from the checkpoint {self._last_checkpoint.name}; its training since then is lost"
                  if self._last_checkpoint is not None else
                  "starts again from the initial critic (no checkpoint yet): its training so far is lost")
        self._note_restarts(self.critics, restarted, source)
        return restarted

    def _critic_calls(self, what: str, launch, relaunch=None) -> list:
        """``launch(m)`` on every critic, then their results; a critic whose process died is restored
        (:meth:`_restore_critics`) and ``relaunch(m)`` (default ``launch``) runs on it."""
        refs = [launch(m) for m in range(len(self.critics))]
        for _ in range(self.cfg.trainer.actor_restarts * len(self.critics)):
            try:
                return self._get(refs, what)
            except ActorLost as lost:
                if lost.actor not in self.critics.names:
                    raise
                for m in self._restore_critics(what):
                    refs[m] = (relaunch or launch)(m)
        return self._get(refs, what)

    def _collate(self, problems, outputs):
        batches, start = [], 0
        for out in outputs:
            count = len(out["prompt_ids"])
            batches.append(collate_rollouts(
                out["prompt_ids"], out["response_ids"], out["response_mask"], out["rollout_logprobs"],
                out["scores"], out["correct"], [p.id for p in problems[start:start + count]],
                self.cfg.rollout.samples_per_prompt, self.pad_id, out["weight_version"],
            ))
            start += count
        return concat_batches(batches, self.pad_id)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        steps, staleness = cfg.trainer.steps, cfg.trainer.max_staleness
        summary: dict[str, Any] = {"run_dir": str(self.run_path)}
        try:
            if self.eval_sets:
                # A resumed run keeps the accuracy its first start measured.
                if self.base_accuracy is None:
                    self.base_accuracy = self.evaluate(self.start_step)
                summary["base_accuracy"] = self.base_accuracy
            pending: deque = deque()
            launched = self.start_step
            for step in range(self.start_step, steps):
                while launched < steps and len(pending) <= staleness:
                    pending.append(self._launch_rollout(launched))
                    launched += 1
                metrics = self.train_step(step, pending.popleft())
                self.sink.log(step, metrics)
                self._check_progress(step, metrics)
                last = step == steps - 1
                if self.eval_sets and cfg.trainer.eval_every and (step + 1) % cfg.trainer.eval_every == 0 and not last:
                    self.evaluate(step)
                stopping = self.stop_signals.received
                if last or stopping or (cfg.trainer.checkpoint_every and (step + 1) % cfg.trainer.checkpoint_every == 0):
                    self.save_checkpoint(step)
                if stopping and not last:
                    raise JobStopped(f"stopped by {signal.Signals(stopping).name} after step {step}; checkpoint "
                                     f"saved{self._resume_hint()}", stopping)
            if self.eval_sets:
                summary["final_accuracy"] = self.evaluate(steps - 1)
            summary["steps"] = steps
            return summary
        finally:
            self.close()

    def _check_progress(self, step: int, metrics: dict[str, float]) -> None:
        """Stop after ``trainer.max_skipped_steps`` consecutive steps without a policy update, naming why.

        Critic warm-up steps hold the policy back on purpose, so they are not counted."""
        if metrics["optimizer_steps"] > 0 or metrics["critic_warmup"]:
            self._skipped_in_a_row = 0
            return
        self._skipped_in_a_row += 1
        diverged = [f"critic-{m} (|V| up to {metrics[f'value_absmax_critic_{m}']:.3g})"
                    for m in range(self.cfg.critics.num_critics) if metrics.get(f"diverged_critic_{m}")]
        reason = (f"{', '.join(diverged)} diverged (values far beyond the rewards' range); lower critics.lr"
                  if diverged else "the policy loss or gradient was not finite")
        log.warning("step %d: no policy update (%s)", step, reason)
        limit = self.cfg.trainer.max_skipped_steps
        if self._skipped_in_a_row >= limit:
            raise JobFailed(f"step {step}: no policy update for {limit} steps in a row (trainer.max_skipped_steps): "
                            f"{reason}{self._resume_hint()}")

    def train_step(self, step: int, rollout: Rollout) -> dict[str, float]:
        """One step (docs/architecture.md, "One training step"): collect the rollout, score it, train, sync."""
        step_start = time.perf_counter()
        outputs = self._collect(rollout, f"step {step}: rollout")
        timings = {"time_rollout": time.perf_counter() - rollout.started}
        batch = self._collate(rollout.problems, outputs)
        sampling_stats = {}
        if self.cfg.rollout.dynamic_sampling:
            batch, outputs, sampling_stats = self._dynamic_sampling(step, batch, outputs)
            timings["time_rollout"] = time.perf_counter() - rollout.started
        if self.version - batch.weight_version > self.cfg.trainer.max_staleness:
            raise JobFailed(
                f"step {step}: the rollout batch was generated with weights v{batch.weight_version} while the "
                f"learner is at v{self.version} (trainer.max_staleness={self.cfg.trainer.max_staleness})"
            )
        batch_ref = ray.put(batch)
        old_stats, prepared, old_refs = self._score(step, batch_ref, timings)
        returns_ref, adv_stats_ref = prepared[0]
        update_stats, critic_stats = self._train(step, batch, batch_ref, returns_ref, timings)
        adv_stats = self._get(adv_stats_ref, f"step {step}: advantages")
        every = self.cfg.logging.samples_every
        if every and step % every == 0:
            self._log_samples(step, batch)
        self._get([ref for ref, _ in prepared[1:]], f"step {step}: advantages on learner ranks")
        self._get(old_refs[1:], f"step {step}: old log-probs on learner ranks")
        sync_stats, logp_diff = self._sync_weights(step, batch, update_stats, timings)
        metrics = step_metrics(batch, outputs, old_stats, adv_stats, update_stats, sync_stats, critic_stats,
                               logp_diff, timings)
        metrics.update(sampling_stats)
        metrics["weight_sync_check_tolerance"] = self.cfg.weight_sync.check_tolerance
        metrics["actor_restarts"] = float(sum(self._restarts.values()))
        metrics["time_step"] = time.perf_counter() - step_start
        return metrics

    def _score(self, step: int, batch_ref, timings: dict[str, float]):
        """logπ_old and H_old on every learner rank while every critic scores every token; the critics' values go
        straight to the learner, which turns them into advantages and critic targets (``prepare``).

        Returns rank 0's old-log-prob stats, each rank's ``prepare`` refs (targets, stats) and the
        ``compute_old_logprobs`` refs."""
        phase = time.perf_counter()
        old_refs = self.learners.call("compute_old_logprobs", batch_ref)
        if self.critics:  # a critic Ray restarted while idle would score with its initial weights
            self._restore_critics(f"step {step}: critic values")
        value_refs = self.critics.call("values", batch_ref) if self.critics else []
        prepared = [learner.compute_advantages.options(num_returns=2).remote(step, *value_refs) for learner in self.learners]
        old_stats = self._get(old_refs[0], f"step {step}: old log-probs")
        timings["time_old_logprobs"] = time.perf_counter() - phase
        if self.critics:
            try:
                self._get(value_refs, f"step {step}: critic values")
            except ActorLost as lost:
                if lost.actor not in self.critics.names:
                    raise
                # The learner's prepare never ran (one of its inputs failed): score again, then prepare again.
                values = self._critic_calls(f"step {step}: critic values",
                                            lambda m: self.critics[m].values.remote(batch_ref))
                prepared = [learner.compute_advantages.options(num_returns=2).remote(step, *values) for learner in self.learners]
        timings["time_values"] = time.perf_counter() - phase
        return old_stats, prepared, old_refs

    def _train(self, step: int, batch, batch_ref, returns_ref, timings: dict[str, float]):
        """Each critic on its own shard (the targets go straight from the learner to the critics) while every
        learner rank runs its PPO + ERC epochs. Returns rank 0's update stats and each critic's stats.

        A critic that dies meanwhile is restored and trains on its shard again, scoring the batch first (its value
        clip is relative to its own values)."""
        from asyppo.critics.sharding import assign_shards

        phase = time.perf_counter()
        shards = []
        if self.critics:
            shards = assign_shards(batch.prompt_ids, batch.group_size, len(self.critics),
                                   self.cfg.algorithm.critic_split, seed=self.cfg.trainer.seed + step)
            critic_refs = [critic.update.remote(returns_ref, rows, step) for critic, rows in zip(self.critics, shards)]
        update_refs = self.learners.call("update", step)
        update_stats = self._get(update_refs, f"step {step}: learner update")[0]
        timings["time_update"] = time.perf_counter() - phase
        critic_stats = []
        if self.critics:
            def score_then_train(m):
                self.critics[m].values.remote(batch_ref)  # an actor runs its calls in order: values, then train
                return self.critics[m].update.remote(returns_ref, shards[m], step)

            critic_stats = self._critic_calls(f"step {step}: critic training", critic_refs.__getitem__,
                                              relaunch=score_then_train)
        timings["time_critic_train"] = time.perf_counter() - phase
        return update_stats, critic_stats

    def _log_samples(self, step: int, batch) -> None:
        """Some of this step's generations with their rewards and σ, for people to read (logging.samples_every)."""
        rows = sample_rows(batch.num_sequences, self.cfg.logging.samples_per_log)
        sigma = None
        if self.cfg.critics.num_critics >= 2:
            sigma = self._get(self.learners[0].response_sigma.remote(rows), f"step {step}: σ of the logged samples")
        self.sink.log_samples(step, generation_samples(step, batch, rows, self._problems_by_id, self.tokenizer, sigma))

    def _sync_weights(self, step: int, batch, update_stats: dict[str, float], timings: dict[str, float]):
        """Broadcast the new weights, then check that every rollout engine now assigns the learner's log-probs."""
        phase = time.perf_counter()
        sync_stats = {}
        version = int(update_stats["policy_version"])
        if version != self.version:  # a skipped update leaves nothing new to send
            what = f"step {step}: weight broadcast"
            try:
                sync_stats = self._get(self.learners.call("broadcast_weights"), what)[0]
            except JobFailed as failure:
                # A rollout worker that died before or during the broadcast fails it; once Ray has restarted it,
                # every worker gets the new weights through the object store instead.
                if isinstance(failure, ActorLost) and failure.actor not in self.rollout_workers.names:
                    raise
                if not self._restore_rollout_workers(what, version):
                    raise
            self.version = version
        logp_diff = self.check_rollout_weights(batch, f"step {step}: weight check")
        timings["time_weight_sync"] = time.perf_counter() - phase
        return sync_stats, logp_diff

    def check_rollout_weights(self, batch, what: str) -> float:
        """After a broadcast every rollout engine must assign the learner's log-probs (stale weights fail loudly)."""
        probe = []
        for row in range(min(4, batch.num_sequences)):
            ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
            probe.append(ids)
        learner_logps = self._get(self.learners[0].probe_logprobs.remote(probe), f"{what} on the learner")
        try:
            worker_logps = self._get(self.rollout_workers.call("prompt_logprobs", probe), what)
        except ActorLost:  # a rollout worker died after the broadcast: bring it back, check again
            self._restore_rollout_workers(what)
            worker_logps = self._get(self.rollout_workers.call("prompt_logprobs", probe), what)
        try:
            return probe_mismatch(learner_logps, worker_logps, self.cfg.weight_sync.check_tolerance)
        except WeightSyncError as exc:
            raise JobFailed(f"{exc}{self._resume_hint()}") from None

    def evaluate(self, step: int) -> float:
        """Every held-out set, greedily and with evaluation.k sampled responses per problem at the training
        temperature (:func:`evaluation_metrics`), logged to eval.jsonl; returns data.eval's avg@k (``eval_accuracy``).

        Every evaluation uses the same sampling seeds, so successive numbers differ by the weights, not the dice.
        """
        start = time.perf_counter()
        metrics = evaluate_sets(
            self.eval_sets, self.cfg.evaluation.k,
            lambda problems, n, greedy: self._launch(problems, n=n, seed=EVAL_SEED, greedy=greedy),
            lambda rollout, name: self._collect(rollout, f"step {step}: evaluation" + (f" of {name}" if name else "")),
        )
        metrics["time_eval"] = time.perf_counter() - start
        self.sink.log_event(step, metrics)
        return metrics["eval_accuracy"]

    def save_checkpoint(self, step: int) -> Path:
        staging = self.checkpoints.begin(step)
        refs = self.learners.call("save", str(staging))
        if self.critics:
            self._critic_calls(f"step {step}: checkpoint", lambda m: self.critics[m].save.remote(str(staging)))
        self._get(refs, f"step {step}: checkpoint")
        # No global RNG state is saved because none is used: every random draw (prompt order, sampling seeds,
        # mini-batch shuffles, response shards) is keyed by (trainer.seed, step).
        state = {"step": step, "version": self.version, "sampler": self._sampler_after_launch[step],
                 "base_accuracy": self.base_accuracy}
        self._sampler_after_launch = {s: v for s, v in self._sampler_after_launch.items() if s > step}
        self._last_checkpoint = self.checkpoints.commit(step, state)
        return self._last_checkpoint

    def close(self) -> None:
        """Release everything this job holds; safe to call more than once and on a half-built trainer."""
        stop_signals = getattr(self, "stop_signals", None)
        if stop_signals is not None:
            stop_signals.restore()
        sink, self.sink = getattr(self, "sink", None), None
        if sink is not None:
            sink.close()
        for group in (getattr(self, "rollout_workers", None), getattr(self, "learners", None),
                      getattr(self, "critics", None)):
            if group is not None:
                group.close()
        self.rollout_workers = self.learners = self.critics = None
        if getattr(self, "owns_ray", False):
            self.owns_ray = False
            ray.shutdown()
        run_log, self.run_log = getattr(self, "run_log", None), None
        if run_log is not None:
            run_log.close()


EVAL_SEED = 10**6


def step_metrics(batch, outputs, old_stats, adv_stats, update_stats, sync_stats, critic_stats, logp_diff,
                 timings: dict[str, float]) -> dict[str, float]:
    """Every number of one step (docs/algorithms.md §7), from the phases' own stats and the driver's timings."""
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
        "rollout_tokens_per_s": generated / max(timings["time_rollout"], 1e-9),
        "rollout_weight_version": float(batch.weight_version),
        **old_stats, **adv_stats, **update_stats, **sync_stats,
        "weight_sync_seconds": sync_stats.get("weight_sync_seconds", timings["time_weight_sync"]),
        "weight_sync_logp_diff": logp_diff,
        **{key: timings[key] for key in ("time_rollout", "time_old_logprobs", "time_values", "time_update",
                                          "time_critic_train", "time_weight_sync")},
    }
    for m, stats in enumerate(critic_stats):
        metrics[f"value_loss_critic_{m}"] = stats["value_loss"]
        metrics[f"value_clip_frac_critic_{m}"] = stats["value_clip_frac"]
        metrics[f"time_train_critic_{m}"] = stats["time_train"]  # its own training time, beside the policy update
        metrics["skipped_steps"] += stats["skipped_steps"]
    if critic_stats:
        metrics["critic_tokens_per_s"] = sum(s["tokens_per_s"] for s in critic_stats)
    return metrics


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
        total_steps=cfg.trainer.steps,
    )


def spawn_rollout_workers(cfg: JobConfig, policy_dir: str, reward_fn, *, max_restarts: int = 0,
                          log_dir: Path | None = None) -> ActorGroup:
    """``rollout-0`` … : one vLLM engine per actor, tensor-parallel over its bundle's GPUs; their output goes to
    ``log_dir`` when given (asyppo.cluster.logs)."""
    from asyppo.actors.rollout_worker import RolloutWorker

    roll = cfg.rollout
    group = ActorGroup("rollout", role_resources(cfg)["rollout"])
    try:
        group.spawn(RolloutWorker, lambda i: ((policy_dir,), dict(
            reward_fn=reward_fn, worker_index=i, tensor_parallel_size=max(1, roll.gpus_per_worker),
            dtype=cfg.model.dtype, seed=cfg.trainer.seed + i, max_model_len=roll.max_model_len,
            gpu_memory_utilization=roll.gpu_memory_utilization, cpu_kv_cache_gib=roll.cpu_kv_cache_gib,
            prompt_format=cfg.prompt_format,
        )), max_restarts=max_restarts, log_dir=log_dir)
    except BaseException:
        group.close()
        raise
    return group


@dataclass
class Rollout:
    """One ``generate`` over the rollout workers: its problems and seed, the learner's weight version when it was
    launched, each worker's pending output (by worker index) and its start time."""

    problems: list
    n: int
    seed: int
    version: int
    refs: dict[int, Any]
    started: float
    greedy: bool = False


def generate(workers, cfg: JobConfig, problems, *, n: int, seed: int, only: list[int] | None = None,
             greedy: bool = False) -> dict[int, Any]:
    """Contiguous slices of whole prompts to each worker (a prompt's n samples stay together); worker ``i`` samples
    with seed ``seed + i``. Returns {worker index: ObjectRef}; ``only`` launches just those workers' slices again.
    ``greedy`` decodes at temperature 0 (evaluation only)."""
    roll = cfg.rollout
    slices = np.array_split(np.arange(len(problems)), len(workers))
    return {
        index: workers[index].generate.remote(
            [problems[i].to_dict() for i in part], n=n, max_new_tokens=roll.max_new_tokens,
            temperature=0.0 if greedy else roll.temperature, top_p=roll.top_p, seed=seed + index,
        )
        for index, part in enumerate(slices)
        if len(part) and (only is None or index in only)
    }


def evaluate_policy(cfg: JobConfig, policy_dir: str) -> dict[str, float]:
    """``asyppo eval``: a saved policy scored on the job's held-out sets as a training run scores them
    (:meth:`Trainer.evaluate`: the same seeds, so a run's checkpoint reproduces its evaluation), on rollout workers
    only."""
    _, held_out = load_datasets(cfg)
    if not held_out:
        raise JobFailed("data.eval: no held-out data configured")
    owns_ray = _connect_ray(cfg)
    workers = None
    try:
        workers = spawn_rollout_workers(cfg, policy_dir, reward_function(cfg))
        return evaluate_sets(
            held_out, cfg.evaluation.k,
            lambda problems, n, greedy: generate(workers, cfg, problems, n=n, seed=EVAL_SEED, greedy=greedy),
            lambda refs, name: ray.get(list(refs.values()), timeout=cfg.trainer.call_timeout_s),
        )
    finally:
        if workers is not None:
            workers.close()
        if owns_ray:
            ray.shutdown()


def reward_function(cfg: JobConfig):
    """The job's reward (``reward.*``, docs/rewards.md), picklable for the rollout workers."""
    from asyppo.tasks.rewards import RewardFunction

    overlong = {}
    if cfg.reward.overlong_buffer:
        overlong = {"max_length": cfg.rollout.max_new_tokens, "buffer": cfg.reward.overlong_buffer,
                    "factor": cfg.reward.overlong_factor}
    return RewardFunction(task=cfg.data.task, function=cfg.reward.function, correct=cfg.reward.correct,
                          wrong=cfg.reward.wrong, **overlong)


@ray.remote(num_cpus=0)
def _learner_address() -> tuple[str, int]:
    from asyppo.common.deepspeed_engine import free_port

    return ray.util.get_node_ip_address(), free_port()


def _connect_ray(cfg: JobConfig) -> bool:
    """Join ``RAY_ADDRESS`` if set, else start an embedded local cluster sized for the job. True if we started it.

    Actors' output reaches the console only with ``logging.verbose``; otherwise it is in ``<run>/logs/``."""
    if ray.is_initialized():
        return False
    verbose = cfg.logging.verbose
    if not verbose:
        route_library_loggers()
    quiet = {"log_to_driver": verbose, "configure_logging": verbose}
    if os.environ.get("RAY_ADDRESS"):
        # No runtime_env here: inside `ray job submit` the job's own runtime env applies, and a second one that
        # sets the same variables makes Ray refuse the job.
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
        return False
    # Logical CPUs: fractional roles share this machine's cores (docs/architecture.md, "Scaling knobs").
    needed = math.ceil(total_cpus(cfg)) + 1
    context = ray.init(num_cpus=max(needed, os.cpu_count() or 1), num_gpus=torch.cuda.device_count(),
                       object_store_memory=512 * 1024**2, **quiet)
    if context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url)
    return True


def train(cfg: JobConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run a whole job; returns a summary (base and final held-out accuracy, run directory)."""
    trainer = Trainer(cfg, resume=resume)
    summary = trainer.run()
    (trainer.run_path / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
