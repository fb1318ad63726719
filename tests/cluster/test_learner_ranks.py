"""Two data-parallel learner ranks (gloo, one Ray actor each) compute the one-rank update (§5 token-mean), alone
and in whole jobs at every ZeRO stage (``learner.ranks``)."""

from __future__ import annotations

import sys

import pytest
import ray
import torch

from asyppo.cluster.driver import train
from asyppo.common.config import build_config
from asyppo.common.network import free_port
from asyppo.cluster.supervisor import learner_arguments
from asyppo.learner.learner import Learner
from tests import helpers
from tests.helpers import gradients, make_batch, parameters_snapshot
from tests.reference_run import JOB, assert_same_run

# The probes run inside the actors (actor.__ray_call__.remote(fn) calls fn(learner) there); Ray's workers cannot
# import the tests, so they travel by value.
ray.cloudpickle.register_pickle_by_value(helpers)

pytestmark = pytest.mark.cluster


def test_two_ranks_split_the_work_and_agree_with_one_rank(shared_ray, tiny_policy_dir):
    cfg = build_config(overrides=[
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "learner.mini_batch_size=8",
        "learner.micro_batch_size=2", "learner.lr=1e-2", "algorithm.entropy_coef=0.01",
    ])
    batch = make_batch()
    values = [torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(m)) for m in range(2)]
    port = free_port()
    actor = ray.remote(Learner).options(num_cpus=1)

    def spawn(**rank):
        args, kwargs = learner_arguments(cfg, tiny_policy_dir, **rank)
        return actor.remote(*args, **kwargs)

    pair = [spawn(rank=r, world_size=2, master_port=port) for r in range(2)]
    single = spawn(master_port=free_port())
    everyone = [*pair, single]
    ray.get([a.compute_old_logprobs.remote(batch) for a in everyone])
    ray.get([a.compute_advantages.remote(0, *values) for a in everyone])

    # Each rank backpropagates its half of the micro-batches; together they make the one-rank gradient.
    mini = torch.arange(8)
    outcome = ray.get([a.accumulate_gradients.remote(mini) for a in everyone])
    assert [len(stats) for _, stats, _ in outcome] == [2, 2, 4]
    grads = ray.get([a.__ray_call__.remote(gradients) for a in everyone])
    for name, expected in grads[2].items():
        # Rank losses carry × world_size because DeepSpeed averages over ranks.
        torch.testing.assert_close((grads[0][name] + grads[1][name]) / 2, expected, rtol=1e-4, atol=1e-7)

    # A whole update keeps the two ranks' weights identical, and close to the single rank's.
    ray.get([learner.update.remote(1) for learner in everyone])
    snapshots = ray.get([a.__ray_call__.remote(parameters_snapshot) for a in everyone])
    for name in snapshots[2]:
        torch.testing.assert_close(snapshots[0][name], snapshots[1][name], rtol=0, atol=0)
        torch.testing.assert_close(snapshots[0][name], snapshots[2][name], rtol=1e-3, atol=1e-4)


class PoisonableLearner(Learner):
    """The real learner, plus ways to make one rank's loss or gradient non-finite for the test (shipped to the
    actor by value: the test module is not importable in Ray's workers)."""

    def poison_loss(self) -> None:
        self._old_logp[:] = float("nan")

    def poison_gradient(self) -> None:
        # The loss stays finite; the first parameter's gradient becomes NaN during backward.
        next(self.engine.module.parameters()).register_hook(lambda grad: grad * float("nan"))


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_a_bad_step_on_one_rank_is_skipped_by_every_rank(shared_ray, tiny_policy_dir, zero_stage):
    """Rank 1's loss made NaN, then (on the same pair, a fresh batch) one of its gradients: each time every rank
    drops every mini-batch, and no parameter moves."""
    cfg = build_config(overrides=[
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "learner.mini_batch_size=8",
        "learner.micro_batch_size=2", "learner.lr=1e-2", f"learner.zero_stage={zero_stage}",
    ])
    batch = make_batch()
    values = [torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(m)) for m in range(2)]
    port = free_port()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actor = ray.remote(PoisonableLearner).options(num_cpus=1)
    pair = []
    for rank in range(2):
        args, kwargs = learner_arguments(cfg, tiny_policy_dir, rank=rank, world_size=2, master_port=port)
        pair.append(actor.remote(*args, **kwargs))
    before = None
    for step, poison in enumerate(["poison_loss", "poison_gradient"]):
        ray.get([a.compute_old_logprobs.remote(batch) for a in pair], timeout=300)  # fresh log-probs: no NaN left
        ray.get([a.compute_advantages.remote(step, *values) for a in pair], timeout=60)
        # Every rank takes part (ZeRO-3 gathers the parameters with a collective).
        before = before or ray.get([a.__ray_call__.remote(parameters_snapshot) for a in pair], timeout=60)[0]
        ray.get(getattr(pair[1], poison).remote(), timeout=60)  # rank 1 only

        stats = ray.get([a.update.remote(step) for a in pair], timeout=120)  # no rank waits for the other forever
        for rank_stats in stats:
            assert rank_stats["optimizer_steps"] == 0 and rank_stats["skipped_steps"] == 2, poison
            assert rank_stats["policy_version"] == 0, poison
        for snapshot in ray.get([a.__ray_call__.remote(parameters_snapshot) for a in pair], timeout=60):
            for name, tensor in before.items():
                assert torch.equal(snapshot[name], tensor), (poison, name)
    for a in pair:
        ray.kill(a)


# ZeRO-1 (the optimizer state partitioned) is the part of ZeRO-2 (gradients too) that changes what a job saves and
# loads; its two ranks are exercised as real actors in test_a_bad_step_on_one_rank_is_skipped_by_every_rank, and its
# update equals ZeRO-0's in tests/unit/test_learner_step.py.
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_job_with_two_learner_ranks_trains_the_one_rank_run(shared_ray, tmp_path, reference_run, zero_stage):
    """The reference job (one rank, ZeRO-0) with two CPU ranks at ZeRO 0, 2 and 3: the same first two steps, weight
    checks (a forward every rank joins at ZeRO-3), evaluations and grad_norm (the norm of the averaged gradient),
    to float tolerance: the ranks' halves of each gradient are summed in another order, and the rounding follows
    the weights into the next step's samples' log-probs. The reference's micro-batches of 8 are the two ranks'."""
    _, reference_dir = reference_run
    name = f"zero{zero_stage}"
    train(build_config(overrides=[*JOB, f"trainer.run_dir={tmp_path}", f"trainer.name={name}", "trainer.steps=2",
                                  "learner.ranks=2", f"learner.zero_stage={zero_stage}"]))
    # Relative 1e-4, or 1e-5 for numbers that are float noise around zero (the weight check's log-prob gap).
    assert_same_run(reference_dir, tmp_path / name, steps=2, tolerance=1e-4, abs_tolerance=1e-5)
