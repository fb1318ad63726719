"""Builders and probes that several test modules share, so that no test module imports another.

``gradients`` and ``parameters_snapshot`` read a learner's state for the tests; they are plain functions of a
``Learner`` (not methods of it), called directly on a local learner or inside a Ray actor with
``actor.__ray_call__.remote(gradients)``, which runs ``gradients(instance)`` in the actor's process. Ray's workers
cannot import the tests, so a test that ships them to an actor registers this module to be pickled by value
(``ray.cloudpickle.register_pickle_by_value``).
"""

from __future__ import annotations

import math

import torch

from asyppo.common.deepspeed_engine import full_parameters
from asyppo.core.batch import RolloutBatch, collate_rollouts

# ---- reference computations of the losses (docs/algorithms.md §5) ------------------------------------------

DTYPE = torch.float64


def reference_policy_terms(logp, old_logp, advantages, *, clip_low, clip_high, clip_mode, dual_clip=None):
    """Per-token loss value and d(loss)/d(logp), written case by case from docs/algorithms.md §5."""
    values, grads, clipped, dual = {}, {}, {}, {}
    num_rows, length = logp.shape
    for n in range(num_rows):
        for t in range(length):
            a = advantages[n, t].item()
            log_ratio = max(-20.0, min(20.0, logp[n, t].item() - old_logp[n, t].item()))
            r = math.exp(log_ratio)
            pg1 = -a * r
            pg2 = -a * min(max(r, 1 - clip_low), 1 + clip_high)
            value = max(pg1, pg2)
            is_clipped = pg2 > pg1
            if not is_clipped:
                grad = -a * r
            elif clip_mode == "ppo":
                grad = 0.0
            else:  # gppo: the clipped branch keeps (1 ± ε)·A·∇logπ
                grad = -a * (1 - clip_low) if r < 1 - clip_low else -a * (1 + clip_high)
            is_dual = False
            if dual_clip is not None and a < 0 and value > -a * dual_clip:
                value, grad, is_dual = -a * dual_clip, 0.0, True
            values[n, t], grads[n, t], clipped[n, t], dual[n, t] = value, grad, is_clipped, is_dual
    return values, grads, clipped, dual


def reference_token_mean(per_token, mask, weights=None, denominator=None):
    total, count = 0.0, 0.0
    for (n, t), value in per_token.items():
        if mask[n, t] > 0:
            total += value * (1.0 if weights is None else weights[n, t].item())
            count += 1
    return total / (count if denominator is None else denominator)


def grads_as_tensor(grads, mask, shape, weights=None, denominator=None):
    denominator = float(mask.sum()) if denominator is None else denominator
    out = torch.zeros(shape, dtype=DTYPE)
    for (n, t), grad in grads.items():
        weight = 1.0 if weights is None else weights[n, t].item()
        out[n, t] = grad * mask[n, t].item() * weight / denominator
    return out


# ---- a rollout batch and a learner, for the learner's step outside and inside Ray ---------------------------

N_PROMPTS, GROUP, T = 4, 4, 5


def make_batch(vocab=24, seed=0) -> RolloutBatch:
    """A rollout batch of 4 prompts × 4 samples, responses of up to 5 tokens, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(length),), generator=gen).tolist() for length in (3, 4, 2, 4)]
    n = N_PROMPTS * GROUP
    lengths = torch.randint(1, T + 1, (n,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    responses = torch.randint(3, vocab, (n, T), generator=gen) * mask.long()
    scores = (torch.rand(n, generator=gen) > 0.5).float()
    return collate_rollouts(prompts, responses, mask, torch.zeros(n, T), scores, scores.bool(),
                            [f"p{i}" for i in range(N_PROMPTS)], GROUP, pad_id=0, weight_version=0)


def make_learner(cfg, policy_dir):
    """A one-rank ``Learner`` for the job ``cfg``, built with the driver's own arguments."""
    from asyppo.cluster.supervisor import learner_arguments
    from asyppo.learner.learner import Learner

    args, kwargs = learner_arguments(cfg, policy_dir)
    return Learner(*args, **kwargs)


def gradients(learner) -> dict[str, torch.Tensor]:
    """This rank's accumulated (not yet all-reduced) gradients."""
    return {name: p.grad.detach().cpu().clone() for name, p in learner.engine.module.named_parameters()
            if p.grad is not None}


def parameters_snapshot(learner) -> dict[str, torch.Tensor]:
    """The learner's whole parameters under any ZeRO stage (a collective under ZeRO-3: every rank calls it)."""
    with full_parameters(learner.engine) as module:
        return {name: p.detach().cpu().clone() for name, p in module.named_parameters()}
