"""Disagreement statistics and masks (docs/algorithms.md §4, §7)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyppo.core.advantages import compute_advantages
from asyppo.core.batch import collate_rollouts
from asyppo.core.disagreement import (
    agreement_mask, carries_information, critic_std, divergence_mask, std_quantiles,
)


def test_critic_std_is_population_std():
    values = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    result = critic_std(values)
    for n in range(2):
        for t in range(4):
            column = [values[m, n, t].item() for m in range(3)]
            mean = sum(column) / 3
            expected = math.sqrt(sum((v - mean) ** 2 for v in column) / 3)
            assert result[n, t].item() == pytest.approx(expected, abs=1e-6)


def test_critic_std_two_critics_is_half_the_gap():
    values = torch.tensor([[[0.0, 1.0, -2.0]], [[1.0, 1.0, 2.0]]])
    torch.testing.assert_close(critic_std(values), (values[0] - values[1]).abs() / 2)


def test_critic_std_one_critic_is_zero():
    assert torch.count_nonzero(critic_std(torch.randn(1, 2, 3))) == 0


def reference_masks(std_rows, mask_rows, k, h):
    """Lists-of-lists reference: one total order over (σ, flat index), prefix for I^A, suffix for I^H."""
    length = len(std_rows[0])
    valid = [
        (std_rows[n][t], n * length + t)
        for n in range(len(std_rows))
        for t in range(length)
        if mask_rows[n][t] > 0
    ]
    ordered = sorted(valid)
    low_count = math.floor(k * len(valid))
    high_count = math.floor(h * len(valid))
    lowest = {index for _, index in ordered[:low_count]}
    highest = {index for _, index in ordered[len(ordered) - high_count :]} if high_count else set()
    agreement = [[0.0 if n * length + t in lowest else 1.0 for t in range(length)] for n in range(len(std_rows))]
    divergence = [[0.0 if n * length + t in highest else 1.0 for t in range(length)] for n in range(len(std_rows))]
    return agreement, divergence, low_count, high_count


@st.composite
def std_and_mask(draw):
    num_rows = draw(st.integers(1, 5))
    length = draw(st.integers(1, 7))
    # A small value set forces many ties; the float branch covers distinct values.
    element = st.one_of(st.sampled_from([0.0, 0.25, 1.0]), st.floats(0.0, 5.0, allow_nan=False, width=32))
    std_rows = [[draw(element) for _ in range(length)] for _ in range(num_rows)]
    mask_rows = [[float(draw(st.booleans())) for _ in range(length)] for _ in range(num_rows)]
    return torch.tensor(std_rows, dtype=torch.float32), torch.tensor(mask_rows)


@settings(max_examples=200, deadline=None)
@given(std_and_mask(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_masks_match_reference_and_counts(data, k, h):
    std, mask = data
    agreement = agreement_mask(std, mask, k)
    divergence = divergence_mask(std, mask, h)
    expected_agreement, expected_divergence, low_count, high_count = reference_masks(
        std.tolist(), mask.tolist(), k, h
    )
    assert agreement.tolist() == expected_agreement
    assert divergence.tolist() == expected_divergence
    assert int((agreement == 0).sum()) == low_count
    assert int((divergence == 0).sum()) == high_count
    # Padding is never selected.
    assert bool((agreement[mask == 0] == 1).all()) and bool((divergence[mask == 0] == 1).all())


@settings(max_examples=200, deadline=None)
@given(std_and_mask(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_lowest_and_highest_disjoint_when_fractions_fit(data, k, h):
    std, mask = data
    if k + h > 1.0:
        h = 1.0 - k
    agreement = agreement_mask(std, mask, k)
    divergence = divergence_mask(std, mask, h)
    assert int(((agreement == 0) & (divergence == 0)).sum()) == 0
    # Every token dropped for agreement has σ no larger than any token dropped for divergence.
    low_selected = std[agreement == 0]
    high_selected = std[divergence == 0]
    if low_selected.numel() and high_selected.numel():
        assert low_selected.max() <= high_selected.min()


def test_ranking_is_global_over_the_batch():
    # Row 0 holds all the small σ: a per-row ranking would zero tokens in row 1 too.
    std = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.ones_like(std)
    agreement = agreement_mask(std, mask, 0.5)
    assert agreement.tolist() == [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    divergence = divergence_mask(std, mask, 0.25)
    assert divergence.tolist() == [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]


def test_ties_broken_by_flat_index():
    std = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # 5 valid tokens, floor(0.4 * 5) = 2: the two lowest flat indices go first for I^A ...
    assert agreement_mask(std, mask, 0.4).tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    # ... and the two highest flat indices for I^H.
    assert divergence_mask(std, mask, 0.4).tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


def test_random_tie_break_is_keyed_by_seed_and_keeps_the_masks_disjoint():
    # Half the tokens share σ = 0.5: which of them I^A takes depends only on the tie key.
    std = torch.tensor([[0.5] * 8 + [0.1, 0.9] * 4] * 4)
    mask = torch.ones_like(std)
    low = agreement_mask(std, mask, 0.5, tie_seed=7)
    high = divergence_mask(std, mask, 0.5, tie_seed=7)
    # Every σ = 0.1 token goes first; the 16 other zeros are drawn among the 32 tied ones, not the lowest indices.
    assert bool((low[std == 0.1] == 0).all()) and int((low[std == 0.5] == 0).sum()) == 16
    assert low[std == 0.5].tolist() != sorted(low[std == 0.5].tolist())
    assert not bool(((low == 0) & (high == 0)).any())  # one order for both: disjoint
    assert torch.equal(agreement_mask(std, mask, 0.5, tie_seed=7), low)  # same key, same mask
    assert not torch.equal(agreement_mask(std, mask, 0.5, tie_seed=8), low)


def test_masks_step_aside_while_sigma_carries_no_information():
    gen = torch.Generator().manual_seed(0)
    n, t = 8, 5
    mask = torch.ones(n, t)
    batch = collate_rollouts([[1, 2]] * 2, torch.randint(3, 9, (n, t), generator=gen), mask, torch.zeros(n, t),
                             torch.rand(n, generator=gen), torch.ones(n, dtype=torch.bool), ["a", "b"], 4,
                             pad_id=0, weight_version=0)
    kwargs = dict(estimator="asyppo", gamma=1.0, lam=1.0, adv_mask_fraction=0.2, entropy_filter_fraction=0.2,
                  tie_seed=3)
    zero_heads = torch.zeros(2, n, t)  # step 0: every critic head still at zero, σ = 0 everywhere
    assert not carries_information(critic_std(zero_heads), mask)
    result = compute_advantages(batch, zero_heads, **kwargs)
    assert result.adv_mask is None and result.entropy_filter is None
    assert result.stats["masks_skipped"] == 1.0 and result.stats["adv_mask_frac"] == 0.0
    trained = torch.randn(2, n, t, generator=gen)
    result = compute_advantages(batch, trained, **kwargs)
    assert result.stats["masks_skipped"] == 0.0
    assert result.stats["adv_mask_frac"] == pytest.approx(math.floor(0.2 * n * t) / (n * t))


def test_masks_reject_bad_input():
    std, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="k must be"):
        agreement_mask(std, mask, 1.5)
    with pytest.raises(ValueError, match="h must be"):
        divergence_mask(std, mask, -0.1)
    with pytest.raises(ValueError, match="equal shapes"):
        agreement_mask(std, torch.ones(2, 4), 0.2)
    with pytest.raises(ValueError, match="NaN"):
        divergence_mask(torch.full((2, 3), float("nan")), mask, 0.2)


def test_std_quantiles_over_valid_tokens():
    std = torch.tensor([[0.0, 1.0, 2.0, 100.0], [3.0, 4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    result = std_quantiles(std, mask)
    assert set(result) == {"p10", "p50", "p90"}
    valid = [0.0, 1.0, 2.0, 3.0, 4.0]
    for key, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)):
        # Linear interpolation between order statistics at position q·(n−1).
        position = q * (len(valid) - 1)
        lower = math.floor(position)
        upper = min(lower + 1, len(valid) - 1)
        expected = valid[lower] + (valid[upper] - valid[lower]) * (position - lower)
        assert result[key] == pytest.approx(expected)
        assert isinstance(result[key], float)
    assert std_quantiles(std, mask, qs=(0.25,)) == {"p25": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="no valid token"):
        std_quantiles(std, torch.zeros_like(mask))
