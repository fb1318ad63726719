"""The driver loop: one AsyPPO training step after another on a Ray cluster (docs/architecture.md, "One training step").

Per step: rollout workers generate and score → the learner recomputes logπ_old/H_old while every critic scores
every token → the learner computes σ, masks and advantages → critics train on their shards while the learner runs
its PPO + ERC update → the learner broadcasts its weights → the driver checks that the rollout engines now assign
the learner's log-probs. With ``trainer.max_staleness = K ≥ 1`` the rollouts of the next K steps are already in
flight while a step trains.

Batches travel through Ray's object store: the rollout batch is ``ray.put`` once and every actor receives the same
reference; critic values go from the critics straight to the learner, and the learner's returns straight to the
critics, without passing through the driver.

Around this dataflow: the job's inputs are resolved before anything starts (``asyppo.cluster.job_inputs``), the
actors, their failures and restarts are the supervisor's (``asyppo.cluster.supervisor``), and held-out evaluation
and dynamic sampling have modules of their own.
"""

from __future__ import annotations

import json
import logging
import signal
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from asyppo.cluster.actor_group import fit_to_cluster
from asyppo.cluster.dynamic_sampling import fill_with_informative_groups
from asyppo.cluster.errors import ActorLost, JobFailed, JobStopped
from asyppo.cluster.evaluation import evaluate_sets, evaluation_seed
from asyppo.cluster.job_inputs import prepare_job
from asyppo.cluster.logs import RunLog
from asyppo.cluster.metrics import MetricsSink, PhaseTimes, StepRecord, generation_samples, sample_rows, step_metrics
from asyppo.cluster.rollouts import Rollout, collate, collect, generate
from asyppo.cluster.supervisor import StopSignals, Supervisor, connect_ray
from asyppo.common.config import JobConfig
from asyppo.core.batch import RolloutBatch
from asyppo.core.seeds import derive_seed
from asyppo.critics.sharding import assign_shards
from asyppo.tasks.problems import PromptSampler
from asyppo.weight_sync.protocol import WeightSyncError, probe_mismatch

log = logging.getLogger("asyppo")


@dataclass
class AdvantageRefs:
    """Where the learner ranks' advantages land: rank 0's critic targets (``returns``) and stats, and the other
    ranks' calls of the step so far, which must have answered before the weights move."""

    returns: ray.ObjectRef
    stats: ray.ObjectRef
    other_ranks: list


@dataclass
class StepResult:
    """One trained step: its metrics (as logged) and the rollout it trained on (its problems and outputs)."""

    metrics: dict[str, float]
    rollout: Rollout


class Trainer:
    """Owns the actors of one job and runs its steps."""

    def __init__(self, cfg: JobConfig, *, resume: bool = False):
        self.job = job = prepare_job(cfg, resume=resume)  # every input checked before any actor starts
        self.cfg, self.run_path, self.tokenizer = job.cfg, job.run_path, job.tokenizer
        self.run_log = RunLog(self.run_path / "logs")
        log.info("run directory: %s", self.run_path.resolve())
        state = job.trainer_state or {}
        self.start_step, self.version = state.get("step", -1) + 1, state.get("version", 0)
        self.base_accuracy = state.get("base_accuracy")
        self.sampler = PromptSampler(job.train_problems, seed=derive_seed(cfg.trainer.seed, "prompt-order"))
        if state:
            self.sampler.load_state_dict(state["sampler"])
            log.info("resuming %s from %s (step %d)", self.cfg.trainer.name, job.checkpoint, self.start_step)
        # The sampler's state after drawing each launched step's prompts: a checkpoint at step s saves the one of
        # step s, so rollouts already in flight for later steps (max_staleness ≥ 1) are drawn again on resume.
        self._sampler_after_launch: dict[int, dict] = {}
        self._in_flight: deque[Rollout] = deque()
        self._next_launch = self.start_step
        self._skipped_in_a_row = 0
        self._problems_by_id = {problem.id: problem for problem in job.train_problems}
        self.owns_ray = connect_ray(self.cfg)
        # Installed after ray.init, which sets a SIGTERM handler of its own in the driver.
        self.stop_signals = StopSignals()
        self.stop_signals.install()
        try:
            if not self.owns_ray:  # a running cluster: fit it now, or fail now
                self.cfg = fit_to_cluster(self.cfg, ray.cluster_resources(), log.warning)
            self.actors = Supervisor(self.cfg, self.run_path, job.checkpoints, job.checkpoint)
            checkpoint = job.checkpoint
            self.actors.spawn(job.models, job.reward_fn, version=self.version,
                              policy_dir=str(checkpoint / "policy") if checkpoint else job.models.policy,
                              resume_dir=str(checkpoint) if checkpoint else None)
            self.actors.note_nodes()
            self.sink = MetricsSink(self.cfg, self.run_path, resumed=checkpoint is not None,
                                    total_steps=self.cfg.trainer.steps, start_step=self.start_step)
        except BaseException:
            self.close()  # never leave actors, placement groups or an embedded cluster behind
            raise

    # ---- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        steps = cfg.trainer.steps
        summary: dict[str, Any] = {"run_dir": str(self.run_path)}
        try:
            if self.job.eval_sets:
                # A resumed run keeps the accuracy its first start measured.
                if self.base_accuracy is None:
                    self.base_accuracy = self.evaluate(self.start_step)
                summary["base_accuracy"] = self.base_accuracy
            for step in range(self.start_step, steps):
                self.step(step)
                last = step == steps - 1
                if self.job.eval_sets and ends_a_period(step, cfg.trainer.eval_every) and not last:
                    self.evaluate(step)
                stopping = self.stop_signals.received
                if last or stopping or ends_a_period(step, cfg.trainer.checkpoint_every):
                    self.save_checkpoint(step)
                if stopping and not last:
                    raise JobStopped(f"stopped by {signal.Signals(stopping).name} after step {step}; checkpoint "
                                     f"saved{self.actors.resume_hint()}", stopping)
            if self.job.eval_sets:
                summary["final_accuracy"] = self.evaluate(steps - 1)
            summary["steps"] = steps
            return summary
        finally:
            self.close()

    def step(self, step: int) -> StepResult:
        """Train step ``step`` on its rollout, launching the rollouts of the next ``trainer.max_staleness`` steps
        first so that they generate meanwhile; logs the step's metrics and stops the job after too many steps
        without a policy update."""
        staleness, steps = self.cfg.trainer.max_staleness, self.cfg.trainer.steps
        while self._next_launch <= step or (self._next_launch < steps and len(self._in_flight) <= staleness):
            self._in_flight.append(self._launch_rollout(self._next_launch))
            self._next_launch += 1
        rollout = self._in_flight.popleft()
        metrics = self._train_on(step, rollout)
        self.sink.log(step, metrics)
        self._check_progress(step, metrics)
        return StepResult(metrics, rollout)

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
                            f"{reason}{self.actors.resume_hint()}")

    # ---- one step -------------------------------------------------------------------------------------------

    def _train_on(self, step: int, rollout: Rollout) -> dict[str, float]:
        """One step (docs/architecture.md, "One training step"): collect the rollout, compute the advantages, update
        the policy and the critics, sync the weights."""
        times = PhaseTimes()
        with times.phase("time_step"):
            batch, sampling_stats = self._collect_batch(step, rollout, times)
            batch_ref = ray.put(batch)
            old_stats, advantages = self._compute_advantages(step, batch_ref, times)
            update_stats, critic_stats = self._update(step, batch, batch_ref, advantages.returns, times)
            adv_stats = self.actors.get(advantages.stats, f"step {step}: advantages")
            every = self.cfg.logging.samples_every
            if every and step % every == 0:
                self._log_samples(step, batch)
            self.actors.get(advantages.other_ranks, f"step {step}: old log-probs and advantages on learner ranks")
            sync_stats, logp_diff = self._sync_weights(step, batch, update_stats, times)
        metrics = step_metrics(StepRecord(batch, rollout.outputs, old_stats, adv_stats, update_stats, critic_stats,
                                          sync_stats, logp_diff, sampling_stats, times))
        metrics["weight_sync_check_tolerance"] = self.cfg.weight_sync.check_tolerance
        metrics["actor_restarts"] = float(sum(self.actors.restarts.values()))
        metrics["cluster_nodes"] = float(self.actors.note_nodes())
        metrics["rollout_workers"] = float(len(self.actors.rollout_workers))
        return metrics

    def _launch_rollout(self, step: int, refill_round: int = 0) -> Rollout:
        """Step ``step``'s prompts (round > 0: a dynamic-sampling refill), drawn now and sent to the workers."""
        problems = self.sampler.next_batch(self.cfg.rollout.prompts_per_step)
        self._sampler_after_launch[step] = self.sampler.state_dict()
        seed = derive_seed(self.cfg.trainer.seed, "rollout", step, refill_round)
        return self._launch(problems, n=self.cfg.rollout.samples_per_prompt, seed=seed)

    def _launch(self, problems: list, *, n: int, seed: int, greedy: bool = False) -> Rollout:
        refs = generate(self.actors.rollout_workers, self.cfg, problems, n=n, seed=seed, greedy=greedy)
        return Rollout(problems, n, seed, version=self.version, refs=refs, slices=len(self.actors.rollout_workers),
                       greedy=greedy)

    def _collect(self, rollout: Rollout, what: str) -> list[dict]:
        return collect(self.actors, self.cfg, rollout, what, version=self.version)

    def _collect_batch(self, step: int, rollout: Rollout, times: PhaseTimes) -> tuple[RolloutBatch, dict]:
        """The step's rollout as one batch (with DAPO's refills when ``rollout.dynamic_sampling``), refused when it
        is older than ``trainer.max_staleness`` versions."""
        roll = self.cfg.rollout
        with times.phase("time_rollout", since=rollout.started):
            batch = self._collate(rollout.problems, self._collect(rollout, f"step {step}: rollout"))
            sampling_stats = {}
            if roll.dynamic_sampling:
                def refill(refill_round: int):
                    more = self._launch_rollout(step, refill_round)
                    outputs = self._collect(more, f"step {step}: dynamic sampling, round {refill_round}")
                    return self._collate(more.problems, outputs), outputs

                batch, rollout.outputs, sampling_stats = fill_with_informative_groups(
                    batch, rollout.outputs, wanted=roll.prompts_per_step, max_rounds=roll.dynamic_sampling_rounds,
                    pad_id=self.job.pad_id, refill=refill)
        if self.version - batch.weight_version > self.cfg.trainer.max_staleness:
            raise JobFailed(
                f"step {step}: the rollout batch was generated with weights v{batch.weight_version} while the "
                f"learner is at v{self.version} (trainer.max_staleness={self.cfg.trainer.max_staleness})"
            )
        return batch, sampling_stats

    def _collate(self, problems: list, outputs: list[dict]) -> RolloutBatch:
        return collate(problems, outputs, self.cfg.rollout.samples_per_prompt, self.job.pad_id)

    def _compute_advantages(self, step: int, batch_ref, times: PhaseTimes) -> tuple[dict[str, float], AdvantageRefs]:
        """logπ_old and H_old on every learner rank while every critic scores every token; the critics' values go
        straight to the learner ranks, which turn them into advantages and critic targets. Returns rank 0's
        old-log-prob stats and where the advantages land."""
        learners, critics = self.actors.learners, self.actors.critics
        with times.phase("time_values") as start:
            old_refs = learners.call("compute_old_logprobs", batch_ref)
            if critics:
                # A critic that sat out because its node left starts again once room returns (critics.quorum), and
                # one that Ray restarted while idle would score with its initial weights: both are restored first.
                self.actors.rescale_critics(f"step {step}")
                self.actors.restore_critics(f"step {step}: critic values")

            def advantages_from(values: dict[int, Any]) -> list:
                return [learner.compute_advantages.options(num_returns=2).remote(step, *values.values(),
                                                                                  critic_ids=list(values))
                        for learner in learners]

            value_refs = dict(zip(critics.slots, critics.call("values", batch_ref))) if critics else {}
            advantage_refs = advantages_from(value_refs)
            with times.phase("time_old_logprobs", since=start):
                old_stats = self.actors.get(old_refs[0], f"step {step}: old log-probs")
            if critics:
                try:
                    self.actors.get(list(value_refs.values()), f"step {step}: critic values")
                except ActorLost as lost:
                    if lost.actor not in critics.names:
                        raise
                    # The learner's compute_advantages never ran (one of its inputs failed): score, then compute again.
                    values = self.actors.critic_calls(f"step {step}: critic values",
                                                      lambda m: critics.actor(m).values.remote(batch_ref))
                    advantage_refs = advantages_from(values)
        (returns, stats), *others = advantage_refs
        return old_stats, AdvantageRefs(returns, stats, [ref for pair in others for ref in pair] + old_refs[1:])

    def _update(self, step: int, batch: RolloutBatch, batch_ref, returns_ref, times: PhaseTimes):
        """Each critic on its own shard (the targets go straight from the learner to the critics) while every
        learner rank runs its PPO + ERC epochs. Returns rank 0's update stats and each critic's stats.

        A critic that dies meanwhile, or that Ray restarted since it scored (found here before its update is sent, or
        by the update itself: ``CriticStateLost``), is restored and trains on its shard again, scoring the batch first
        (its value clip is relative to its own values)."""
        critics = self.actors.critics
        with times.phase("time_critic_train") as start:
            if critics:
                # Each critic taking part trains on a shard of its own (critic m on shard m of as many as take part).
                shards = dict(zip(critics.slots, assign_shards(
                    batch.prompt_ids, batch.group_size, len(critics), self.cfg.algorithm.critic_split,
                    seed=derive_seed(self.cfg.trainer.seed, "critic-shards", step))))

                def score_then_update(m):
                    critics.actor(m).values.remote(batch_ref)  # an actor runs its calls in order: values, then update
                    return critics.actor(m).update.remote(returns_ref, shards[m], step)

                restarted = self.actors.restore_critics(f"step {step}: critic training")
                critic_refs = {m: score_then_update(m) if m in restarted else
                               critics.actor(m).update.remote(returns_ref, shards[m], step) for m in critics.slots}
            with times.phase("time_update", since=start):
                update_stats = self.actors.get(self.actors.learners.call("update", step),
                                               f"step {step}: learner update")[0]
            critic_stats = {}
            if critics:
                critic_stats = self.actors.critic_calls(f"step {step}: critic training", critic_refs.__getitem__,
                                                        relaunch=score_then_update)
        return update_stats, critic_stats

    def _log_samples(self, step: int, batch: RolloutBatch) -> None:
        """Some of this step's generations with their rewards and σ, for people to read (logging.samples_every)."""
        rows = sample_rows(batch.num_sequences, self.cfg.logging.samples_per_log)
        sigma = None
        if self.cfg.critics.num_critics >= 2:
            sigma = self.actors.get(self.actors.learners[0].response_sigma.remote(rows),
                                    f"step {step}: σ of the logged samples")
        self.sink.log_samples(step, generation_samples(step, batch, rows, self._problems_by_id, self.tokenizer, sigma))

    def _sync_weights(self, step: int, batch: RolloutBatch, update_stats: dict[str, float], times: PhaseTimes):
        """Broadcast the new weights, then check that every rollout engine now assigns the learner's log-probs."""
        sync_stats = {}
        with times.phase("time_weight_sync"):
            version = int(update_stats["policy_version"])
            what = f"step {step}: weight broadcast"
            elastic = self.actors.rollout_workers.resources.elastic
            # A rollout worker runs one call at a time, so a broadcast sent while it generates the next steps'
            # rollouts (max_staleness ≥ 1) would wait behind that generation and its weight_sync.timeout_s run out:
            # the broadcast starts once every worker is free (docs/architecture.md, "Asynchronous mode"). So do
            # workers joining or leaving a range of them (docs/scaling.md).
            if version != self.version or elastic:
                self.actors.wait_finished([ref for rollout in self._in_flight for ref in rollout.refs.values()],
                                          f"{what}: waiting for the rollouts in flight")
            if elastic:
                self.actors.resize_rollout_workers(f"step {step}", self.version)
            if version != self.version:  # a skipped update leaves nothing new to send
                try:
                    sync_stats = self.actors.get(self.actors.learners.call("broadcast_weights"), what)[0]
                except JobFailed as failure:
                    # A rollout worker that died before or during the broadcast fails it; once Ray has restarted it,
                    # every worker gets the new weights through the object store instead.
                    if isinstance(failure, ActorLost) and failure.actor not in self.actors.rollout_workers.names:
                        raise
                    if not self.actors.restore_rollout_workers(what, version):
                        raise
                self.version = version
            logp_diff = self.check_rollout_weights(batch, f"step {step}: weight check")
        return sync_stats, logp_diff

    def check_rollout_weights(self, batch: RolloutBatch, what: str) -> float:
        """After a broadcast every rollout engine must assign the learner's log-probs (stale weights fail loudly)."""
        actors = self.actors
        # The four longest sequences (the most tokens to compare). One that fills the engine's max_model_len is cut
        # by a token: an engine scores at most max_model_len − 1 (it must leave room for one more).
        longest = batch.attention_mask.sum(1).argsort(descending=True, stable=True)[:4].tolist()
        probe = [batch.input_ids[row][batch.attention_mask[row].bool()][:actors.engine_max_len - 1].tolist()
                 for row in longest]
        # Every learner rank runs the probe (under ZeRO-3 a forward needs them all); rank 0 answers.
        learner_logps = actors.get(actors.learners.call("probe_logprobs", probe), f"{what} on the learner")[0]
        try:
            worker_logps = actors.get(actors.rollout_workers.call("prompt_logprobs", probe), what)
        except ActorLost:  # a rollout worker died after the broadcast: bring it back, check again
            actors.restore_rollout_workers(what, self.version)
            worker_logps = actors.get(actors.rollout_workers.call("prompt_logprobs", probe), what)
        try:
            return probe_mismatch(learner_logps, worker_logps, self.cfg.weight_sync.check_tolerance)
        except WeightSyncError as exc:
            raise JobFailed(f"{exc}{actors.resume_hint()}") from None

    # ---- around the steps ---------------------------------------------------------------------------------------

    def evaluate(self, step: int) -> float:
        """Every held-out set, greedily and with evaluation.k sampled responses per problem at the training
        temperature (``asyppo.cluster.evaluation``), logged to eval.jsonl; returns data.eval's avg@k
        (``eval_accuracy``)."""
        times = PhaseTimes()
        with times.phase("time_eval"):
            metrics = evaluate_sets(
                self.job.eval_sets, self.cfg.evaluation.k,
                lambda problems, n, greedy: self._launch(problems, n=n, seed=evaluation_seed(self.cfg),
                                                         greedy=greedy),
                lambda rollout, name: self._collect(rollout, f"step {step}: evaluation" + (f" of {name}" if name
                                                                                          else "")),
            )
        self.sink.log_event(step, {**metrics, **times})
        return metrics["eval_accuracy"]

    def save_checkpoint(self, step: int) -> Path:
        """Step ``step``'s checkpoint: every actor's state, then the trainer's, then the manifest."""
        actors, what = self.actors, f"step {step}: checkpoint"
        staging = self.job.checkpoints.begin(step)
        refs = actors.learners.call("save", str(staging))
        if actors.critics:
            actors.save_critics(str(staging), what)
        actors.get(refs, what)
        # No global RNG state is saved because none is used: every random draw takes its seed from
        # (trainer.seed, purpose, step, ...) (asyppo.core.seeds).
        state = {"step": step, "version": self.version, "sampler": self._sampler_after_launch[step],
                 "base_accuracy": self.base_accuracy}
        self._sampler_after_launch = {s: v for s, v in self._sampler_after_launch.items() if s > step}
        actors.last_checkpoint = self.job.checkpoints.commit(step, state)
        return actors.last_checkpoint

    def close(self) -> None:
        """Release everything this job holds; safe to call more than once and on a half-built trainer."""
        stop_signals = getattr(self, "stop_signals", None)
        if stop_signals is not None:
            stop_signals.restore()
        sink, self.sink = getattr(self, "sink", None), None
        if sink is not None:
            sink.close()
        actors = getattr(self, "actors", None)
        if actors is not None:
            actors.close()
        if getattr(self, "owns_ray", False):
            self.owns_ray = False
            ray.shutdown()
        run_log, self.run_log = getattr(self, "run_log", None), None
        if run_log is not None:
            run_log.close()


def ends_a_period(step: int, period: int) -> bool:
    """Step ``step`` (0-based) is the last of a period of ``period`` steps; a period of 0 never ends."""
    return period > 0 and (step + 1) % period == 0


def train(cfg: JobConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run a whole job; returns a summary (base and final held-out accuracy, run directory)."""
    trainer = Trainer(cfg, resume=resume)
    summary = trainer.run()
    (trainer.run_path / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
