"""The mechanism diagnostics against independent computations (numpy, hand-worked examples)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asyppo.core.diagnostics import explained_variance, gradient_weight, position_thirds, rank_correlation, removed_share

MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float32)


def _numpy_spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort().argsort().astype(float), b.argsort().argsort().astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def test_explained_variance_matches_the_formula_on_valid_tokens_only():
    returns = torch.tensor([[1.0, 1, 1, 1, 1, 1], [0, 0, 0, 9, 9, 9]])
    values = torch.tensor([[0.8, 0.6, 0.9, 0.7, 1.0, 0.5], [0.2, 0.1, 0.4, -5, -5, -5]])
    g = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=float)
    v = np.array([0.8, 0.6, 0.9, 0.7, 1.0, 0.5, 0.2, 0.1, 0.4])
    assert explained_variance(values, returns, MASK) == pytest.approx(1 - np.var(g - v) / np.var(g))
    assert explained_variance(returns, returns, MASK) == 1.0
    assert math.isnan(explained_variance(values, torch.ones_like(values), MASK))


def test_rank_correlation_is_spearman_on_valid_tokens():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 6, generator=generator), torch.rand(2, 6, generator=generator)
    y[1, 3:] = 100.0  # padding: must not count
    valid = MASK > 0
    expected = _numpy_spearman(x[valid].numpy(), y[valid].numpy())
    assert rank_correlation(x, y, MASK) == pytest.approx(expected)
    assert rank_correlation(x, x.exp(), MASK) == pytest.approx(1.0)  # any increasing transform
    assert rank_correlation(x, -x, MASK) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation(torch.zeros(2, 6), y, MASK))


def test_removed_share_weighs_tokens_by_magnitude():
    weight = torch.tensor([[1.0, -3, 0, 2, 0, 4], [-1, 1, 1, 50, 50, 50]])
    keep = torch.tensor([[1.0, 0, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0]])
    # removed: |−3| + |2| + |1| = 6 of 1+3+0+2+0+4+1+1+1 = 13 (the padding's 50s do not count)
    assert removed_share(weight, keep, MASK) == pytest.approx(6 / 13)
    assert removed_share(weight, None, MASK) == 0.0


def test_position_thirds_place_each_token_in_its_own_response():
    # Row 0 (length 6): thirds are tokens {0,1}, {2,3}, {4,5}; row 1 (length 3): {0}, {1}, {2}.
    keep = torch.tensor([[0.0, 1, 1, 1, 0, 0], [1, 0, 1, 0, 0, 0]])
    first, middle, last = position_thirds(keep, MASK)
    assert (first, middle, last) == pytest.approx((1 / 3, 1 / 3, 2 / 3))
    assert position_thirds(None, MASK) == (0.0, 0.0, 0.0)


def test_gradient_weight_is_the_advantage_times_the_room_left_to_move():
    advantages = torch.tensor([[2.0, -1.0, 0.5]])
    logp = torch.log(torch.tensor([[0.25, 0.5, 1.0]]))
    assert torch.allclose(gradient_weight(advantages, logp), torch.tensor([[1.5, 0.5, 0.0]]))
    # Against autograd: the norm of d(A·log softmax(z)_a)/dz lies in [w, √2·w].
    z = torch.tensor([0.3, -1.0, 2.0, 0.0], requires_grad=True)
    (1.7 * torch.log_softmax(z, 0)[1]).backward()
    w = float(gradient_weight(torch.tensor([1.7]), torch.log_softmax(z.detach(), 0)[1:2]))
    assert w <= float(z.grad.norm()) <= 2**0.5 * w
