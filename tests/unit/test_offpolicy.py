"""Behaviour-policy correction (docs/algorithms.md §5a) against per-token reference loops, and the learner's use of
it on a real DeepSpeed engine with a batch two versions stale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asyppo.core.losses import policy_loss
from asyppo.core.offpolicy import behaviour_weights
from tests.helpers import DTYPE, grads_as_tensor, reference_policy_terms, reference_token_mean

CAP = 1.5


def make_logps(seed: int, rows: int = 6, length: int = 9, spread: float = 0.6):
    generator = torch.Generator().manual_seed(seed)
    behaviour = -torch.rand(rows, length, generator=generator, dtype=DTYPE) * 3
    prox = behaviour + torch.randn(rows, length, generator=generator, dtype=DTYPE) * spread
    lengths = torch.randint(2, length + 1, (rows,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(DTYPE)
    return prox, behaviour, mask


def reference_weights(prox, behaviour, mask, mode, cap):
    """w per token, written case by case from docs/algorithms.md §5a."""
    rows, length = mask.shape
    weights = [[1.0] * length for _ in range(rows)]
    capped = [[False] * length for _ in range(rows)]
    for n in range(rows):
        valid = [t for t in range(length) if mask[n, t] > 0]
        ratios = {t: math.exp(prox[n, t].item() - behaviour[n, t].item()) for t in valid}
        geometric_mean = math.exp(sum(math.log(r) for r in ratios.values()) / len(valid))
        for t, r in ratios.items():
            if mode == "token-truncate":
                weights[n][t], capped[n][t] = min(r, cap), r > cap
            elif mode == "token-mask":
                weights[n][t], capped[n][t] = (0.0, True) if r > cap else (r, False)
            elif mode == "sequence-mask":
                weights[n][t], capped[n][t] = (0.0, True) if geometric_mean > cap else (r, False)
    return torch.tensor(weights, dtype=DTYPE), capped


@pytest.mark.parametrize("mode", ["token-truncate", "token-mask", "sequence-mask", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_and_mismatch_stats_match_the_reference(mode, seed):
    prox, behaviour, mask = make_logps(seed)
    weights, stats = behaviour_weights(prox, behaviour, mask, mode=mode, cap=CAP)
    if mode == "none":
        expected, capped = torch.ones_like(mask), [[False] * mask.shape[1]] * mask.shape[0]
    else:
        expected, capped = reference_weights(prox, behaviour, mask, mode, CAP)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-7)
    valid = [(n, t) for n in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[n, t] > 0]
    diffs = [prox[n, t].item() - behaviour[n, t].item() for n, t in valid]
    ratios = [math.exp(d) for d in diffs]
    assert stats["offpolicy_logp_abs_diff"] == pytest.approx(np.mean(np.abs(diffs)), rel=1e-5)
    assert stats["offpolicy_kl"] == pytest.approx(np.mean([r - 1 - d for r, d in zip(ratios, diffs)]), rel=1e-4)
    assert stats["offpolicy_capped_frac"] == pytest.approx(np.mean([capped[n][t] for n, t in valid]))
    assert stats["offpolicy_ratio_p50"] == pytest.approx(np.quantile(ratios, 0.5), rel=1e-5)
    assert stats["offpolicy_ratio_p99"] == pytest.approx(np.quantile(ratios, 0.99), rel=1e-5)
    assert stats["offpolicy_ratio_max"] == pytest.approx(max(ratios), rel=1e-5)
    if mode != "none":
        assert 0 < stats["offpolicy_capped_frac"] < 1, "the batch must exercise the cap"


def test_sequence_mask_drops_whole_responses():
    prox, behaviour, mask = make_logps(2, spread=0.5)
    prox[[0, 3]] += 1.0  # these two responses became e ≈ 2.7 times likelier on average: beyond the cap
    weights, _ = behaviour_weights(prox, behaviour, mask, mode="sequence-mask", cap=CAP)
    valid_weights = [weights[n][mask[n] > 0] for n in range(mask.shape[0])]
    dropped = [bool((w == 0).all()) for w in valid_weights]
    assert dropped == [True, False, False, True, False, False]
    # Kept responses carry their tokens' ratios, some above the cap (only the response's mean is limited).
    kept = torch.cat([w for w, d in zip(valid_weights, dropped) if not d])
    assert bool((kept > 0).all()) and bool((kept > CAP).any())


def test_on_policy_weights_are_exactly_one():
    prox, _, mask = make_logps(3)
    weights, stats = behaviour_weights(prox, prox.clone(), mask, mode="token-truncate", cap=CAP)
    assert bool((weights == 1).all())
    assert stats["offpolicy_logp_abs_diff"] == 0 and stats["offpolicy_kl"] == 0 and stats["offpolicy_capped_frac"] == 0


def test_behaviour_weights_reject_bad_input():
    prox, behaviour, mask = make_logps(0)
    with pytest.raises(ValueError, match="mode must be one of"):
        behaviour_weights(prox, behaviour, mask, mode="clip", cap=CAP)
    with pytest.raises(ValueError, match="cap must be > 1"):
        behaviour_weights(prox, behaviour, mask, mode="token-truncate", cap=1.0)
    with pytest.raises(ValueError, match="must match the mask"):
        behaviour_weights(prox[:, :3], behaviour, mask, mode="token-truncate", cap=CAP)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_multiplies_each_token_by_its_behaviour_weight(dual_clip):
    prox, behaviour, mask = make_logps(4)
    generator = torch.Generator().manual_seed(9)
    logp = (prox + torch.randn(prox.shape, generator=generator, dtype=DTYPE) * 0.4).requires_grad_()
    advantages = torch.randn(prox.shape, generator=generator, dtype=DTYPE)
    weights, _ = behaviour_weights(prox, behaviour, mask, mode="token-truncate", cap=CAP)
    kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip)
    # The clipped ratio is π_θ/π_prox; μ enters only through the constant weight.
    values, grads, _, _ = reference_policy_terms(logp, prox, advantages, clip_mode="ppo", **kwargs)
    loss, _ = policy_loss(logp, prox, advantages, mask, behaviour_weight=weights, **kwargs)
    loss.backward()
    assert loss.item() == pytest.approx(reference_token_mean(values, mask, weights=weights), rel=1e-10)
    torch.testing.assert_close(logp.grad, grads_as_tensor(grads, mask, logp.shape, weights=weights))


def test_a_batch_two_versions_stale_is_weighted_exactly_where_its_policy_differs(tiny_policy_dir):
    """K=2: rows sampled by v0 get w ≠ 1 on every token where logμ ≠ logπ_prox; rows sampled by the current v2
    get w = 1 exactly. ERC's H_old is the proximal entropy (the learner's own recompute)."""
    from dataclasses import replace

    from asyppo.common.config import build_config
    from tests.helpers import make_batch, make_learner

    cfg = build_config(overrides=[
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "learner.mini_batch_size=8",
        "learner.micro_batch_size=4", "learner.lr=1e-2",
    ])
    learner = make_learner(cfg, tiny_policy_dir)
    batch = make_batch()
    valid = batch.response_mask > 0
    values = [torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(m)) for m in range(2)]

    def sampled_by_current_policy(batch):
        learner.compute_old_logprobs(batch)
        return replace(batch, rollout_logprobs=learner._old_logp.clone())

    stale = sampled_by_current_policy(batch)  # μ = v0
    for step in range(2):
        learner.compute_old_logprobs(sampled_by_current_policy(batch))
        learner.compute_advantages(0, *values)
        learner.update(step)
    assert learner.version == 2
    fresh = sampled_by_current_policy(batch)  # μ = v2
    mixed = replace(batch, rollout_logprobs=torch.cat([stale.rollout_logprobs[:8], fresh.rollout_logprobs[8:]]))

    stats = learner.compute_old_logprobs(mixed)
    weights, prox = learner._behaviour_weight, learner._old_logp
    differs = (mixed.rollout_logprobs != prox) & valid
    assert bool(differs[:8][valid[:8]].all()) and not bool(differs[8:].any())
    assert torch.equal((weights != 1) & valid, differs)
    expected = torch.clamp(torch.exp(prox - mixed.rollout_logprobs), max=cfg.algorithm.off_policy_cap)
    torch.testing.assert_close(weights[valid], expected[valid])
    assert stats["offpolicy_logp_abs_diff"] > 0 and stats["offpolicy_kl"] > 0
    # The update runs on π_θ/π_prox with these weights: its first mini-batch starts at ratio 1.
    learner.compute_advantages(0, *values)
    update = learner.update(2)
    assert update["optimizer_steps"] == 2 and math.isfinite(update["policy_loss"])
