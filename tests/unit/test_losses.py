"""Policy / value / entropy / NLL losses against per-token reference loops (docs/algorithms.md §2, §5)."""

from __future__ import annotations

import math

import pytest
import torch

from asyppo.core.losses import aggregate, entropy_bonus, entropy_from_logits, nll_loss, policy_loss, value_loss
from tests.helpers import DTYPE, grads_as_tensor, reference_policy_terms, reference_token_mean


def make_batch(seed: int, num_rows: int = 6, length: int = 7, spread: float = 0.4):
    generator = torch.Generator().manual_seed(seed)
    old_logp = -torch.rand(num_rows, length, generator=generator, dtype=DTYPE) * 3
    logp = (old_logp + torch.randn(num_rows, length, generator=generator, dtype=DTYPE) * spread).requires_grad_()
    advantages = torch.randn(num_rows, length, generator=generator, dtype=DTYPE)
    lengths = torch.randint(1, length + 1, (num_rows,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(DTYPE)
    return logp, old_logp, advantages, mask


def run_policy_loss(logp, *args, **kwargs):
    logp.grad = None
    loss, stats = policy_loss(logp, *args, **kwargs)
    loss.backward()
    return loss, stats, logp.grad.clone()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_values_and_gradients(seed):
    logp, old_logp, advantages, mask = make_batch(seed)
    values, grads, clipped, _ = reference_policy_terms(
        logp, old_logp, advantages, clip_low=0.2, clip_high=0.28, clip_mode="ppo"
    )
    assert any(clipped[key] for key in clipped if mask[key] > 0), "the batch must exercise the clipped region"
    loss, stats, grad = run_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(reference_token_mean(values, mask), rel=1e-12)
    torch.testing.assert_close(grad, grads_as_tensor(grads, mask, logp.shape))
    valid = [key for key in clipped if mask[key] > 0]
    assert stats["clip_frac"] == pytest.approx(sum(clipped[key] for key in valid) / len(valid))
    assert stats["pg_loss"] == pytest.approx(loss.item())
    assert stats["erc_kept_frac"] == 1.0 and stats["dual_clip_frac"] == 0.0


def test_ppo_stats_kl_and_ratio():
    logp, old_logp, advantages, mask = make_batch(3)
    _, stats = policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2)
    kl_terms, ratios = [], []
    for n in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[n, t] > 0:
                d = logp[n, t].item() - old_logp[n, t].item()
                kl_terms.append(math.exp(d) - 1 - d)
                ratios.append(math.exp(d))
    assert stats["approx_kl"] == pytest.approx(sum(kl_terms) / len(kl_terms))
    assert stats["ratio_mean"] == pytest.approx(sum(ratios) / len(ratios))
    assert all(isinstance(v, float) for v in stats.values())


@pytest.mark.parametrize("seed", [0, 4])
def test_gppo_forward_equals_ppo_and_gradient_is_preserved(seed):
    logp, old_logp, advantages, mask = make_batch(seed)
    kwargs = dict(clip_low=0.2, clip_high=0.2)
    ppo_loss, ppo_stats, _ = run_policy_loss(logp, old_logp, advantages, mask, clip_mode="ppo", **kwargs)
    gppo_loss, gppo_stats, gppo_grad = run_policy_loss(logp, old_logp, advantages, mask, clip_mode="gppo", **kwargs)
    assert gppo_loss.item() == ppo_loss.item()
    assert gppo_stats["clip_frac"] == ppo_stats["clip_frac"] > 0
    _, grads, clipped, _ = reference_policy_terms(logp, old_logp, advantages, clip_mode="gppo", **kwargs)
    torch.testing.assert_close(gppo_grad, grads_as_tensor(grads, mask, logp.shape))
    # In the clipped region the gradient is exactly (1 ± ε)·(−A)/count, not 0.
    count = float(mask.sum())
    for (n, t), is_clipped in clipped.items():
        if is_clipped and mask[n, t] > 0:
            a = advantages[n, t].item()
            factor = 1.2 if a > 0 else 0.8
            assert gppo_grad[n, t].item() == pytest.approx(-a * factor / count)


@pytest.mark.parametrize("clip_mode", ["ppo", "gppo"])
def test_dual_clip_bounds_negative_advantages(clip_mode):
    logp, old_logp, advantages, mask = make_batch(5, spread=1.5)
    kwargs = dict(clip_low=0.2, clip_high=0.28, clip_mode=clip_mode)
    values, grads, _, dual = reference_policy_terms(logp, old_logp, advantages, dual_clip=3.0, **kwargs)
    valid = [key for key in dual if mask[key] > 0]
    assert any(dual[key] for key in valid), "the batch must exercise the dual clip"
    loss, stats, grad = run_policy_loss(logp, old_logp, advantages, mask, dual_clip=3.0, **kwargs)
    assert loss.item() == pytest.approx(reference_token_mean(values, mask), rel=1e-12)
    torch.testing.assert_close(grad, grads_as_tensor(grads, mask, logp.shape))
    assert stats["dual_clip_frac"] == pytest.approx(sum(dual[key] for key in valid) / len(valid))


def test_advantage_mask_keeps_masked_tokens_in_denominator():
    logp, old_logp, advantages, mask = make_batch(6)
    adv_mask = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(7)) > 0.4).to(DTYPE)
    kwargs = dict(clip_low=0.2, clip_high=0.28)
    values, grads, _, _ = reference_policy_terms(logp, old_logp, advantages, clip_mode="ppo", **kwargs)
    loss, _, grad = run_policy_loss(logp, old_logp, advantages, mask, adv_mask=adv_mask, **kwargs)
    # Divided by all valid tokens, not by the unmasked ones.
    assert loss.item() == pytest.approx(reference_token_mean(values, mask, weights=adv_mask), rel=1e-12)
    torch.testing.assert_close(grad, grads_as_tensor(grads, mask, logp.shape, weights=adv_mask))
    assert bool((grad[(adv_mask == 0)] == 0).all())


def test_erc_drops_gradient_but_keeps_value():
    logp, old_logp, advantages, mask = make_batch(8)
    generator = torch.Generator().manual_seed(9)
    old_entropy = torch.rand(mask.shape, generator=generator, dtype=DTYPE) + 0.5
    entropy = old_entropy * (1 + (torch.rand(mask.shape, generator=generator, dtype=DTYPE) - 0.5) * 0.2)
    entropy[0, 0] = old_entropy[0, 0]  # ρ = 1 is inside the band
    kwargs = dict(clip_low=0.2, clip_high=0.28)
    base_loss, _, base_grad = run_policy_loss(logp, old_logp, advantages, mask, **kwargs)
    erc_loss, stats, erc_grad = run_policy_loss(
        logp, old_logp, advantages, mask, entropy=entropy, old_entropy=old_entropy, erc_band=(0.95, 1.05),
        **kwargs,
    )
    assert erc_loss.item() == base_loss.item()
    kept_count, valid_count = 0, 0
    for n in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            rho = (entropy[n, t].item() + 1e-8) / (old_entropy[n, t].item() + 1e-8)
            keep = 0.95 < rho < 1.05
            if mask[n, t] > 0:
                valid_count += 1
                kept_count += keep
            expected = base_grad[n, t].item() if keep else 0.0
            assert erc_grad[n, t].item() == pytest.approx(expected, abs=1e-15)
    assert 0 < kept_count < valid_count, "the batch must have tokens on both sides of the band"
    assert stats["erc_kept_frac"] == pytest.approx(kept_count / valid_count)


def test_erc_band_is_strict():
    logp = torch.zeros(1, 3, dtype=DTYPE, requires_grad=True)
    zeros = torch.zeros(1, 3, dtype=DTYPE)
    # In float32, 1e-8 is below half an ulp of 1.0 and 2.0, so ρ is exactly 0.5, 1.0 and 2.0; with the band
    # (0.5, 2.0) both edge tokens fall outside the strict band.
    old_entropy = torch.tensor([[2.0, 1.0, 1.0]], dtype=torch.float32)
    entropy = torch.tensor([[1.0, 1.0, 2.0]], dtype=torch.float32)
    _, stats = policy_loss(
        logp, zeros, torch.ones(1, 3, dtype=DTYPE), torch.ones(1, 3, dtype=DTYPE), clip_low=0.2, clip_high=0.2,
        entropy=entropy, old_entropy=old_entropy, erc_band=(0.5, 2.0),
    )
    assert stats["erc_kept_frac"] == pytest.approx(1 / 3)


def test_erc_reports_where_in_the_response_it_removes_tokens():
    """Two responses of 6 and 3 valid tokens (thirds: tokens 0-1 | 2-3 | 4-5, and 0 | 1 | 2). ERC drops tokens 0 and
    5 of the first response (ρ = 2) and token 1 of the second: the first third loses 1 of its 3 tokens, the middle
    third 1 of 3, the last third 1 of 3; padding (ρ = 2 too) counts nowhere."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=DTYPE)
    old_entropy = torch.ones(2, 6)
    entropy = torch.ones(2, 6)
    entropy[0, 0] = entropy[0, 5] = entropy[1, 1] = 2.0
    entropy[1, 3:] = 2.0

    def removed_by_third(**erc) -> tuple[dict, list[float]]:
        zeros = torch.zeros(2, 6, dtype=DTYPE)
        _, stats = policy_loss(torch.zeros(2, 6, dtype=DTYPE, requires_grad=True), zeros,
                               torch.ones(2, 6, dtype=DTYPE), mask, clip_low=0.2, clip_high=0.2, **erc)
        return stats, [stats[f"erc_removed_frac_{third}_third"] for third in ("first", "middle", "last")]

    stats, removed = removed_by_third(entropy=entropy, old_entropy=old_entropy, erc_band=(0.95, 1.05))
    assert stats["erc_kept_frac"] == pytest.approx(6 / 9)
    assert removed == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    # Move the second response's dropped token to its end: the middle third keeps everything, the last loses 2 of 3.
    entropy[1, 1], entropy[1, 2] = 1.0, 2.0
    _, removed = removed_by_third(entropy=entropy, old_entropy=old_entropy, erc_band=(0.95, 1.05))
    assert removed == pytest.approx([1 / 3, 0.0, 2 / 3])
    # ERC off: nothing removed anywhere.
    _, removed = removed_by_third()
    assert removed == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("clip_mode", ["ppo", "gppo"])
def test_micro_batch_accumulation_equals_one_batch(agg, clip_mode):
    logp, old_logp, advantages, mask = make_batch(10, num_rows=7, length=9)
    adv_mask = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(11)) > 0.2).to(DTYPE)
    kwargs = dict(clip_low=0.2, clip_high=0.28, clip_mode=clip_mode, dual_clip=3.0, agg=agg)
    big_loss, _, big_grad = run_policy_loss(logp, old_logp, advantages, mask, adv_mask=adv_mask, **kwargs)

    denominator = mask.sum() if agg == "token-mean" else float(mask.shape[0])
    logp.grad = None
    total_loss = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 7)):  # uneven micro-batches with uneven token counts
        loss, _ = policy_loss(
            logp[rows], old_logp[rows], advantages[rows], mask[rows], adv_mask=adv_mask[rows],
            denominator=denominator, **kwargs,
        )
        loss.backward()
        total_loss += loss.item()
    assert total_loss == pytest.approx(big_loss.item(), rel=1e-12)
    torch.testing.assert_close(logp.grad, big_grad)

    # Without the shared denominator the average of micro-batch means is a different objective.
    naive = [
        policy_loss(logp[r], old_logp[r], advantages[r], mask[r], adv_mask=adv_mask[r], **kwargs)[0].item()
        for r in (slice(0, 2), slice(2, 3), slice(3, 7))
    ]
    assert sum(naive) / 3 != pytest.approx(big_loss.item(), rel=1e-6)


def test_aggregate_modes_match_loops():
    generator = torch.Generator().manual_seed(12)
    values = torch.randn(4, 5, generator=generator, dtype=DTYPE)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=DTYPE)
    token_total = sum(values[n, t].item() for n in range(4) for t in range(5) if mask[n, t] > 0)
    assert aggregate(values, mask).item() == pytest.approx(token_total / 9)
    assert aggregate(values, mask, denominator=20.0).item() == pytest.approx(token_total / 20)
    row_means = []
    for n in range(4):
        row = [values[n, t].item() for t in range(5) if mask[n, t] > 0]
        row_means.append(sum(row) / len(row) if row else 0.0)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx(sum(row_means) / 4)
    assert aggregate(values, mask, "seq-mean-token-mean", denominator=8).item() == pytest.approx(sum(row_means) / 8)
    with pytest.raises(ValueError, match="agg must be"):
        aggregate(values, mask, "sum")
    with pytest.raises(ValueError, match="denominator must be > 0"):
        aggregate(values, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="shape"):
        aggregate(values, mask[:, :3])


def test_entropy_from_logits_matches_categorical():
    logits = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(13), dtype=DTYPE) * 3
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    # Large logits must not overflow.
    big = logits * 1000
    torch.testing.assert_close(entropy_from_logits(big), torch.distributions.Categorical(logits=big).entropy())


def test_entropy_bonus_with_filter():
    generator = torch.Generator().manual_seed(14)
    entropy = torch.rand(3, 4, generator=generator, dtype=DTYPE, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=DTYPE)
    entropy_filter = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=DTYPE)
    bonus = entropy_bonus(entropy, mask, entropy_filter)
    kept = [entropy[n, t].item() for n in range(3) for t in range(4) if mask[n, t] > 0 and entropy_filter[n, t] > 0]
    assert bonus.item() == pytest.approx(sum(kept) / 7)  # filtered tokens stay in the denominator
    bonus.backward()
    torch.testing.assert_close(entropy.grad, mask * entropy_filter / 7)


def test_nll_loss_on_selected_rows():
    generator = torch.Generator().manual_seed(15)
    logp = -torch.rand(3, 4, generator=generator, dtype=DTYPE)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=DTYPE)
    select = torch.tensor([True, False, True])
    selected = [-logp[n, t].item() for n in (0, 2) for t in range(4) if mask[n, t] > 0]
    assert nll_loss(logp, mask, select).item() == pytest.approx(sum(selected) / 7)
    assert nll_loss(logp, mask, select, denominator=20).item() == pytest.approx(sum(selected) / 20)
    row0 = -(logp[0, :3].sum().item()) / 3
    row2 = -(logp[2].sum().item()) / 4
    assert nll_loss(logp, mask, select, "seq-mean-token-mean").item() == pytest.approx((row0 + row2) / 2)
    none_selected = nll_loss(logp.clone().requires_grad_(), mask, torch.zeros(3, dtype=torch.bool))
    assert none_selected.item() == 0.0 and none_selected.requires_grad


def test_value_loss_with_clipping():
    generator = torch.Generator().manual_seed(16)
    old_values = torch.randn(4, 6, generator=generator, dtype=DTYPE)
    values = (old_values + torch.randn(4, 6, generator=generator, dtype=DTYPE)).requires_grad_()
    returns = torch.randn(4, 6, generator=generator, dtype=DTYPE)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] + [0] * 5], dtype=DTYPE)
    loss, stats = value_loss(values, old_values, returns, mask, clip=0.5)
    loss.backward()
    total, count, clip_count = 0.0, 0, 0
    expected_grad = torch.zeros_like(old_values)
    for n in range(4):
        for t in range(6):
            v, v_old, r = values[n, t].item(), old_values[n, t].item(), returns[n, t].item()
            unclipped = (v - r) ** 2
            clipped = (min(max(v, v_old - 0.5), v_old + 0.5) - r) ** 2
            if mask[n, t] > 0:
                total += max(unclipped, clipped)
                count += 1
                clip_count += clipped > unclipped
                expected_grad[n, t] = 0.0 if clipped > unclipped else (v - r)
    expected_grad /= count
    assert 0 < clip_count < count
    assert loss.item() == pytest.approx(0.5 * total / count)
    torch.testing.assert_close(values.grad, expected_grad)
    assert stats["value_loss"] == pytest.approx(loss.item())
    assert stats["value_clip_frac"] == pytest.approx(clip_count / count)
    unclipped_loss, unclipped_stats = value_loss(values, old_values, returns, mask, clip=None)
    reference = sum((values[n, t].item() - returns[n, t].item()) ** 2 for n in range(4) for t in range(6) if mask[n, t])
    assert unclipped_loss.item() == pytest.approx(0.5 * reference / count)
    assert unclipped_stats["value_clip_frac"] == 0.0


def test_policy_loss_rejects_bad_input():
    # The ranges of ε, c and the ERC band are the config's to check (tests/unit/test_config.py); what only a caller
    # can get wrong is checked here.
    logp, old_logp, advantages, mask = make_batch(17)
    kwargs = dict(clip_low=0.2, clip_high=0.2)
    with pytest.raises(ValueError, match="clip_mode"):
        policy_loss(logp, old_logp, advantages, mask, clip_mode="trpo", **kwargs)
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(logp, old_logp[:, :3], advantages, mask, **kwargs)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, old_logp, advantages, mask, erc_band=(0.95, 1.05), **kwargs)


def test_kl_penalty_estimators_against_numpy():
    import numpy as np

    from asyppo.core.losses import kl_penalty

    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=gen) * 3
    ref = -torch.rand(3, 5, generator=gen) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    d = ref.numpy() - logp.numpy()
    m = mask.numpy().astype(bool)
    k3_mean = float(np.mean(np.exp(d[m]) - d[m] - 1))
    # On-policy (no old_logp) the importance ratio is 1 in the forward pass: the loss is agg(k).
    k1_loss, k1_stats = kl_penalty(logp, ref, mask, "k1")
    k3_loss, k3_stats = kl_penalty(logp, ref, mask, "k3")
    assert float(k1_loss) == pytest.approx(float(np.mean(-d[m])), rel=1e-6)
    assert float(k3_loss) == pytest.approx(k3_mean, rel=1e-6)
    # kl_ref is the k3 estimate whatever the estimator.
    assert k1_stats["kl_ref"] == pytest.approx(k3_mean, rel=1e-6) and k3_stats["kl_ref"] == k1_stats["kl_ref"]
    # The gradient pulls log π_θ toward log π_ref: ∂ℓ/∂logp = (logp − ref) for k3 (k1 adds 1, of mean 0 on-policy).
    logp.requires_grad_(True)
    kl_penalty(logp, ref, mask, "k3", denominator=1.0)[0].backward()
    assert np.allclose(logp.grad.numpy(), -d * mask.numpy(), atol=1e-6)
    assert float(kl_penalty(ref, ref, mask, "k3")[0]) == 0.0
    # The §5a weight and a stale π_old reweight the loss, not the logged estimate.
    old = logp.detach() + 0.3
    weight = torch.full_like(mask, 0.5)
    loss, stats = kl_penalty(logp, ref, mask, "k3", old_logp=old, behaviour_weight=weight)
    assert float(loss.detach()) == pytest.approx(0.5 * math.exp(-0.3) * k3_mean, rel=1e-5)
    assert stats["kl_ref"] == pytest.approx(k3_mean, rel=1e-6)
    with pytest.raises(ValueError, match="old_logp"):
        kl_penalty(logp, ref, mask, old_logp=old[:, :2])
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logp, ref, mask, "k2")


def _categorical_expected_gradient(theta, loss_of_action, sampling_probs):
    """Σ_a q(a)·∇_θ ℓ(a): the exact expectation over the actions of a categorical of the per-action loss's
    gradient, each by autograd, with q the (constant) sampling distribution."""
    total = torch.zeros_like(theta)
    for action, prob in enumerate(sampling_probs.detach()):
        (grad,) = torch.autograd.grad(loss_of_action(action), theta)
        total += prob * grad
    return total


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("sampling", ["on-policy", "stale", "behaviour"])
def test_kl_penalty_expected_gradient_is_the_exact_kl_gradient(estimator, sampling):
    """On a 6-way categorical π_θ = softmax(θ) with a fixed π_ref, the per-token loss's gradient, averaged exactly
    over the sampled action, equals ∇_θ KL(π_θ ‖ π_ref) from the closed form. Samples come from π_θ itself
    (on-policy), from a stale π_old ≠ π_θ (a later mini-batch), or from an engine's μ with the §5a weight π_old/μ."""
    from asyppo.core.losses import kl_penalty

    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_()
    ref_logp = torch.log_softmax(torch.randn(6, generator=gen, dtype=torch.float64), dim=0)
    old_logp = torch.log_softmax(theta.detach() + 0.5 * torch.randn(6, generator=gen, dtype=torch.float64), dim=0)
    behaviour_logp = torch.log_softmax(torch.randn(6, generator=gen, dtype=torch.float64), dim=0)

    logp = torch.log_softmax(theta, dim=0)
    exact_kl = (logp.exp() * (logp - ref_logp)).sum()
    (exact,) = torch.autograd.grad(exact_kl, theta)
    assert float(exact.abs().max()) > 0.05  # π_θ is far from π_ref: a gradient worth matching

    if sampling == "on-policy":
        sampling_logp, old, weight = logp.detach(), None, None
    elif sampling == "stale":
        sampling_logp, old, weight = old_logp, old_logp, None
    else:
        sampling_logp, old, weight = behaviour_logp, old_logp, torch.exp(old_logp - behaviour_logp)

    def as_token(tensor, action):
        return None if tensor is None else tensor[action].reshape(1, 1)

    def loss_of_action(action):
        current = torch.log_softmax(theta, dim=0)
        loss, _ = kl_penalty(as_token(current, action), as_token(ref_logp, action), torch.ones(1, 1, dtype=torch.float64),
                             estimator, old_logp=as_token(old, action), behaviour_weight=as_token(weight, action))
        return loss

    expected = _categorical_expected_gradient(theta, loss_of_action, sampling_logp.exp())
    assert torch.allclose(expected, exact, rtol=0, atol=1e-10)
    # The loss value itself is an unbiased estimate of KL(π_θ ‖ π_ref) under the sampling distribution.
    expected_value = sum(float(sampling_logp[a].exp()) * float(loss_of_action(a).detach()) for a in range(6))
    assert expected_value == pytest.approx(float(exact_kl.detach()), abs=1e-10)


def test_the_old_direct_kl_losses_had_the_wrong_expected_gradient():
    """Why kl_penalty multiplies k by the importance ratio: used directly as a loss on on-policy samples, k1 =
    logπ_θ − logπ_ref has expected gradient E_π[∇logπ] = 0, and k3 = r − 1 − log r (r = π_ref/π_θ) has expected
    gradient ∇KL(π_ref ‖ π_θ), the reverse KL, not ∇KL(π_θ ‖ π_ref)."""
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_()
    ref_logp = torch.log_softmax(torch.randn(6, generator=gen, dtype=torch.float64), dim=0)
    logp = torch.log_softmax(theta, dim=0)
    (forward_kl,) = torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), theta, retain_graph=True)
    (reverse_kl,) = torch.autograd.grad((ref_logp.exp() * (ref_logp - logp)).sum(), theta)

    def old_k1(action):
        return torch.log_softmax(theta, dim=0)[action] - ref_logp[action]

    def old_k3(action):
        d = ref_logp[action] - torch.log_softmax(theta, dim=0)[action]
        return torch.exp(d) - d - 1

    probs = logp.detach().exp()
    assert torch.allclose(_categorical_expected_gradient(theta, old_k1, probs), torch.zeros(6, dtype=torch.float64),
                          rtol=0, atol=1e-12)
    old_k3_gradient = _categorical_expected_gradient(theta, old_k3, probs)
    assert torch.allclose(old_k3_gradient, reverse_kl, rtol=0, atol=1e-10)
    assert float((old_k3_gradient - forward_kl).abs().max()) > 0.01


def test_lr_factor_warmup_constant_and_cosine():
    import math

    from asyppo.core.schedules import lr_factor

    assert [lr_factor(t, total_steps=10, warmup_steps=4) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_factor(t, total_steps=10, warmup_steps=4, schedule="cosine", min_ratio=0.2) for t in range(12)]
    assert cosine[4] == 1.0 and cosine[9] == pytest.approx(0.2) and cosine[11] == pytest.approx(0.2)
    assert cosine[6] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 2 / 5)))
    assert all(a >= b for a, b in zip(cosine[4:], cosine[5:]))  # decays monotonically after the warm-up
    assert lr_factor(0, total_steps=1, schedule="cosine") == 1.0
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor(0, total_steps=10, schedule="linear")
