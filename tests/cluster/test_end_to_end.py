"""End-to-end: the real training loop on a local Ray cluster with real vLLM (CPU), DeepSpeed and W&B (offline).

Each test starts a whole job (rollout engines, critics, learner), so they are few and share what they can.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time

import pytest
import ray

from asyppo.common.config import build_config
from asyppo.cluster import cli
from asyppo.cluster.driver import Trainer, train
from asyppo.cluster.errors import JobFailed
from asyppo.cluster.metrics import read_metrics, required_metric_keys

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("shared_ray")]


def small_job(tmp_path, *extra):
    return build_config(overrides=[
        "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "learner.mini_batch_size=16",
        "learner.micro_batch_size=16", "critics.micro_batch_size=32", "data.eval_size=32",
        f"trainer.run_dir={tmp_path}", "trainer.steps=3", "trainer.eval_every=0", "trainer.checkpoint_every=0",
        "trainer.call_timeout_s=180", "weight_sync.timeout_s=60", "logging.wandb_mode=offline", *extra,
    ])


def alive_actor_names() -> set[str]:
    from ray.util.state import list_actors

    # This job's cluster by its address: another local Ray instance on the machine would make the lookup ambiguous.
    address = ray.get_runtime_context().gcs_address
    return {a.name for a in list_actors(address=address, filters=[("state", "=", "ALIVE")]) if a.name}


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def check_metric_lines(cfg, lines):
    required = required_metric_keys(cfg)
    for line in lines:
        missing = [key for key in required if key not in line]
        assert not missing, f"step {line['step']} lacks {missing}"
        bad = {key: line[key] for key in required if not math.isfinite(line[key])}
        assert not bad, f"step {line['step']} has non-finite {bad}"


def test_one_worker_two_critics_sync(tmp_path):
    # max_model_len as small as preflight allows (the longest prompt, 6 tokens, and 2 new ones): a response that
    # runs to the limit fills the engine's context, and the weight check, which probes the longest sequences, still
    # compares it.
    cfg = small_job(tmp_path, "rollout.max_new_tokens=2", "rollout.max_model_len=8")
    trainer = Trainer(cfg)
    try:
        assert {"rollout-0", "critic-0", "critic-1", "learner"} <= alive_actor_names()
        worker, learner = trainer.actors.rollout_workers[0], trainer.actors.learners[0]
        probe = [trainer.tokenizer.encode(text) for text in ("1+2=3", "9-5=4", "3+4=7")]  # within max_model_len
        before = ray.get(worker.prompt_logprobs.remote(probe))

        for step in range(2):
            trainer.step(step)

        after = ray.get(worker.prompt_logprobs.remote(probe))
        on_learner = ray.get(learner.probe_logprobs.remote(probe))
        assert max_abs_diff(before, after) > 1e-4, "the rollout engine's weights did not change after two steps"
        assert max_abs_diff(after, on_learner) < 1e-4, "the rollout engine's weights differ from the learner's"
        assert ray.get(worker.weight_version.remote()) == 2 == trainer.version

        lines = read_metrics(trainer.run_path / "metrics.jsonl")
        assert [line["step"] for line in lines] == [0, 1]
        check_metric_lines(cfg, lines)
        # Step 0: the critics' heads are still zero, σ = 0 everywhere, and the masks step aside (§4).
        assert [line["masks_skipped"] for line in lines] == [1.0, 0.0]
        assert lines[0]["adv_mask_frac"] == lines[0]["entropy_filter_frac"] == 0.0
        for line in lines[1:]:
            # §4: exactly floor(k · valid) tokens masked, globally over the batch (response_length is a mean).
            valid = round(line["response_length"] * cfg.batch_size)
            assert round(line["adv_mask_frac"] * valid) == math.floor(0.2 * valid)
            assert round(line["entropy_filter_frac"] * valid) == math.floor(0.2 * valid)
        assert all(line["truncated_frac"] > 0.5 for line in lines)  # most responses ran to the limit
        for line in lines:
            assert line["weight_sync_logp_diff"] < cfg.weight_sync.check_tolerance
            assert line["value_loss_critic_0"] >= 0 and line["value_loss_critic_1"] >= 0
        # The two critics train on disjoint shards, so their losses are their own.
        assert any(line["value_loss_critic_0"] != line["value_loss_critic_1"] for line in lines)

        # A dead critic is a clear failure, not a hang.
        ray.kill(trainer.actors.critics.actors[1], no_restart=True)
        started = time.monotonic()
        with pytest.raises(JobFailed, match="died"):
            trainer.step(2)
        assert time.monotonic() - started < 120
    finally:
        trainer.close()
    runs = list((trainer.run_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].rglob("*.wandb")), "no offline W&B run was written"


def test_two_workers_three_critics_async_then_resume(tmp_path, capsys):
    # A second held-out set with the same problems as data.eval must score exactly alike (same seeds).
    cfg = small_job(tmp_path, "rollout.num_workers=2", "critics.num_critics=3", "trainer.max_staleness=1",
                    "data.eval_size=24", "trainer.checkpoint_every=2", "evaluation.k=2",
                    "evaluation.sets.again=builtin:arithmetic")
    summary = train(cfg)
    run_path = tmp_path / cfg.trainer.name
    lines = read_metrics(run_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 1, 2]
    check_metric_lines(cfg, lines)
    assert all(f"value_loss_critic_{m}" in lines[0] for m in range(3))
    # One step of staleness: the rollout of step s was generated by the weights after step s-2.
    assert [line["rollout_weight_version"] for line in lines] == [0, 0, 1]
    # ... and the off-policy correction sees it: μ (v0) and π_prox (v1) differ at step 1 far more than the
    # float32 engine and learner do at step 0 (same weights).
    assert lines[0]["offpolicy_logp_abs_diff"] < 1e-3 < lines[1]["offpolicy_logp_abs_diff"]
    # The checkpoint of step 1 was saved while step 2's rollout was in flight: its sampler position is that of
    # two drawn batches, so a resume draws step 2's prompts again instead of skipping them.
    saved = json.loads((run_path / "checkpoints" / "step-1" / "trainer_state.json").read_text())
    assert saved["sampler"]["position"] == 2 * cfg.rollout.prompts_per_step
    assert 0 <= summary["base_accuracy"] <= 1 and 0 <= summary["final_accuracy"] <= 1
    assert (run_path / "checkpoints" / "step-2" / "policy" / "config.json").is_file()
    # `asyppo eval RUN_DIR`, with nothing else: the run's config, its latest checkpoint served by fresh engines, the
    # same seeds: it reproduces the run's final evaluation, number for number.
    assert cli.main(["eval", str(run_path)]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    final = read_metrics(run_path / "eval.jsonl")[-1]
    assert evaluated["policy"] == str(run_path / "checkpoints" / "step-2" / "policy")
    assert evaluated["eval_problems"] == 24 and evaluated["eval_accuracy"] == summary["final_accuracy"]
    assert {key: evaluated[key] for key in final if key.startswith("eval_")} == {
        key: value for key, value in final.items() if key.startswith("eval_")}
    for line in read_metrics(run_path / "eval.jsonl"):
        assert line["eval_k"] == 2 and line["eval_accuracy"] <= line["eval_pass_at_k"] <= 1
        again = {key.replace("eval_again_", "eval_"): value for key, value in line.items() if "again" in key}
        assert again == {key: value for key, value in line.items() if key.startswith("eval_") and "again" not in key}

    resumed = train(build_config(overrides=[*_overrides_of(cfg), "trainer.steps=5"]), resume=True)
    assert resumed["run_dir"] == str(run_path)
    lines = read_metrics(run_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4]
    check_metric_lines(cfg, lines[3:])
    # The resumed learner continues from version 3 (three updates before the checkpoint).
    assert lines[3]["policy_version"] == 4 and lines[4]["policy_version"] == 5
    assert json.loads((run_path / "summary.json").read_text())["steps"] == 5


def test_actors_that_do_not_start_in_time_end_the_job_in_one_line(tmp_path):
    """Starting an actor (imports, model, engine) is bounded by trainer.start_timeout_s, not call_timeout_s: the
    job ends naming the phase and that field, with no resume command (there is no checkpoint yet)."""
    with pytest.raises(JobFailed) as failure:
        train(small_job(tmp_path, "trainer.start_timeout_s=0.5"))
    assert re.fullmatch(r"(placing|starting) the learner: no answer from \S+ within trainer.start_timeout_s=0.5s "
                        r"\(the process is alive but not answering: .*\)", str(failure.value)), str(failure.value)


def _overrides_of(cfg) -> list[str]:
    dumped = cfg.model_dump(mode="json")
    return [f"{section}.{key}={json.dumps(value)}" for section, fields in dumped.items() if isinstance(fields, dict)
            for key, value in fields.items()] + [f"preset={cfg.preset}"]


def test_diverged_critics_stop_the_policy_and_then_the_job(tmp_path):
    """critics.lr=1e30: the critics' values explode after their first update. The policy must not go on training
    on the entropy bonus alone: its updates are skipped, and after trainer.max_skipped_steps the job stops naming
    the critics."""
    cfg = small_job(tmp_path, "critics.lr=1e30", "trainer.steps=6", "trainer.max_skipped_steps=2")
    with pytest.raises(JobFailed, match=r"no policy update for 2 steps in a row .*critic-\d \(\|V\| up to .*lower "
                                        r"critics.lr"):
        train(cfg)
    lines = read_metrics(tmp_path / cfg.trainer.name / "metrics.jsonl")
    assert [line["optimizer_steps"] > 0 for line in lines] == [True, False, False]
    assert all(line["policy_version"] == 1 for line in lines)  # the skipped steps left the weights alone
    assert any(line["diverged_critic_0"] or line["diverged_critic_1"] for line in lines[1:])


def test_critic_warmup_trains_the_critics_alone(tmp_path):
    """algorithm.critic_warmup_steps=2: steps 0 and 1 train the critics and leave the policy's weights exactly as
    they were; the policy starts updating at step 2, with σ already fitted (masks on); warm-up steps do not count
    as skipped steps (trainer.max_skipped_steps=1 would otherwise stop the job)."""
    cfg = small_job(tmp_path, "algorithm.critic_warmup_steps=2", "trainer.max_skipped_steps=1")
    trainer = Trainer(cfg)
    try:
        learner = trainer.actors.learners[0]
        probe = [trainer.tokenizer.encode(text) for text in ("12+34=46", "70-15=55")]
        before = ray.get(learner.probe_logprobs.remote(probe))
        probes = []
        for step in range(3):
            trainer.step(step)  # logs the step and counts steps without an update
            probes.append(ray.get(learner.probe_logprobs.remote(probe)))
    finally:
        trainer.close()
    assert probes[0] == before and probes[1] == before, "the policy changed during critic warm-up"
    assert max_abs_diff(before, probes[2]) > 1e-4, "the policy did not change after warm-up"

    lines = read_metrics(tmp_path / cfg.trainer.name / "metrics.jsonl")
    assert [line["critic_warmup"] for line in lines] == [1.0, 1.0, 0.0]
    assert [line["optimizer_steps"] > 0 for line in lines] == [False, False, True]
    assert [line["skipped_steps"] for line in lines] == [0.0, 0.0, 0.0]
    assert [line["policy_version"] for line in lines] == [0.0, 0.0, 1.0]
    # The critics did train: their heads start at zero (values 0 at step 0) and score tokens after one update.
    for m in range(2):
        assert lines[0][f"value_absmax_critic_{m}"] == 0.0 < lines[1][f"value_absmax_critic_{m}"]
    assert lines[2]["masks_skipped"] == 0.0 and lines[2]["adv_mask_frac"] > 0


def test_dynamic_sampling_drops_uniform_groups_and_refills(tmp_path):
    """preset=dapo-erc: the trained batch holds only prompts whose responses scored differently, refilled from
    fresh prompts; when the refill rounds run out (here every response scores the same, reward.wrong=1), the
    dropped prompts fill the batch back to its size, and the metrics say so."""
    cfg = small_job(tmp_path, "preset=dapo-erc", "trainer.steps=2")
    P = cfg.rollout.prompts_per_step
    train(cfg)
    for line in read_metrics(tmp_path / cfg.trainer.name / "metrics.jsonl"):
        assert 0 <= line["dynamic_sampling_rounds"] <= cfg.rollout.dynamic_sampling_rounds
        assert line["uniform_groups_frac"] * P == line["dynamic_sampling_filled"]
        assert line["rollout_responses"] == cfg.batch_size * (1 + line["dynamic_sampling_rounds"])
        assert line["optimizer_steps"] == cfg.batch_size // cfg.learner.mini_batch_size  # the batch kept its size
        # A refill round runs exactly when the first round left prompts to replace.
        assert (line["dynamic_sampling_rounds"] > 0) == (line["dynamic_sampling_informative_frac"] < 1)

    # Every evaluation reports sampled and greedy accuracy.
    for line in read_metrics(tmp_path / cfg.trainer.name / "eval.jsonl"):
        assert 0 <= line["eval_accuracy"] <= 1 and 0 <= line["eval_accuracy_greedy"] <= 1

    flat = small_job(tmp_path / "flat", "preset=dapo-erc", "trainer.steps=1", "reward.wrong=1",
                     "rollout.dynamic_sampling_rounds=1")
    train(flat)
    [line] = read_metrics(tmp_path / "flat" / flat.trainer.name / "metrics.jsonl")
    assert (line["dynamic_sampling_rounds"], line["dynamic_sampling_informative_frac"]) == (1.0, 0.0)
    assert line["dynamic_sampling_filled"] == P and line["uniform_groups_frac"] == 1.0
    assert line["optimizer_steps"] == flat.batch_size // flat.learner.mini_batch_size


@ray.remote(num_cpus=0)
class _Stage:
    """A stand-in for two roles chained by a reference (the learner's targets passed to a critic's update)."""

    def hold(self, seconds: float) -> int:
        time.sleep(seconds)
        return 1

    def take(self, value: int) -> int:
        return value


def test_a_failed_result_nobody_read_stays_off_the_console(tmp_path, capsys):
    """The learner lost while a critic's update waits on its targets: the job ends in one line, and Ray's report of
    the update's failure, logged when its unread reference is freed as the job exits, goes to driver.log as a warning
    instead of printing a traceback after that line (cluster/logs.py, _DemoteUnreadFailures)."""
    from asyppo.cluster.logs import RunLog, setup_console

    setup_console(verbose=False)
    run_log = RunLog(tmp_path / "logs")
    try:
        upstream, downstream = _Stage.remote(), _Stage.remote()
        left_unread = downstream.take.remote(upstream.hold.remote(60))
        read = downstream.take.remote(upstream.hold.remote(0))  # runs after left_unread on the same actor
        ray.kill(upstream)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(read, timeout=60)
        del left_unread  # its failure was never read: Ray reports it now
        log = tmp_path / "logs" / "driver.log"
        deadline = time.monotonic() + 30
        while "Unhandled error" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        run_log.close()
        logging.getLogger().removeHandler(next(h for h in logging.getLogger().handlers
                                               if h.get_name() == "asyppo-console"))
    reported = [line for line in log.read_text().splitlines() if "Unhandled error" in line]
    assert reported and reported[0].split()[2:4] == ["WARNING", "ray._private.worker:"], log.read_text()
    assert "Unhandled error" not in capsys.readouterr().err
