"""Critic disagreement statistics and the two AsyPPO masks (docs/algorithms.md §4).

Pure PyTorch, no Ray. Ranking is global over every valid response token of the rollout batch.

Tie-breaking: all valid tokens are put in ONE total order, ascending by ``(σ, tie key)``. The tie key is a random
permutation of the valid tokens drawn from ``tie_seed`` (the learner passes one per seed and step), or the flat
index ``row * T + column`` when ``tie_seed`` is None. The advantage mask zeroes a prefix of that order (lowest σ)
and the entropy filter a suffix of it (highest σ). Both masks of one batch use the same ``tie_seed``, so the one
order makes the two selections disjoint whenever ``k + h <= 1``, even when every σ is equal.

Padding positions get mask value 1 in both masks: the masks multiply a loss term that the response mask
already removes there, and 1 is the neutral element.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["agreement_mask", "carries_information", "critic_std", "divergence_mask", "std_quantiles"]


def _check_std_and_mask(std: torch.Tensor, mask: torch.Tensor, caller: str) -> torch.Tensor:
    if std.dim() != 2 or std.shape != mask.shape:
        raise ValueError(
            f"{caller}: std and mask must both be [N, T] with equal shapes, got {tuple(std.shape)} and "
            f"{tuple(mask.shape)}"
        )
    valid = mask > 0
    if not bool(torch.isfinite(std[valid]).all()):
        raise ValueError(f"{caller}: std holds NaN or inf on valid tokens")
    return valid


def _check_fraction(name: str, fraction: float, caller: str) -> None:
    if not (0.0 <= fraction <= 1.0):
        raise ValueError(f"{caller}: {name} must be a fraction in [0, 1], got {fraction}")


def critic_std(values: torch.Tensor) -> torch.Tensor:
    """Per-token population std of the critics' values, ``σ_t = std_m V_m(s_t)`` (docs/algorithms.md §4).

    Args:
        values: ``[M, N, T]``. With ``M == 1`` the result is all zeros (the caller turns the masks off).

    Returns:
        float32 ``[N, T]``.
    """
    if values.dim() != 3 or values.shape[0] < 1:
        raise ValueError(f"critic_std: values must be [M>=1, N, T], got shape {tuple(values.shape)}")
    return values.detach().float().std(dim=0, unbiased=False)


def _ascending_valid_order(std: torch.Tensor, valid: torch.Tensor, tie_seed: int | None) -> torch.Tensor:
    """Flat indices of valid tokens sorted ascending by (σ, tie key) (module docstring)."""
    valid_flat_indices = torch.nonzero(valid.flatten()).flatten()
    if tie_seed is not None:
        generator = torch.Generator().manual_seed(tie_seed)
        shuffle = torch.randperm(len(valid_flat_indices), generator=generator).to(valid_flat_indices.device)
        valid_flat_indices = valid_flat_indices[shuffle]
    valid_std = std.detach().flatten()[valid_flat_indices]
    # A stable sort keeps the tie-key order among equal σ.
    order = torch.sort(valid_std, stable=True).indices
    return valid_flat_indices[order]


def _zero_end_of_order(
    std: torch.Tensor, valid: torch.Tensor, fraction: float, tie_seed: int | None, *, highest: bool
) -> torch.Tensor:
    """Ones ``[N, T]`` with 0 on ``floor(fraction · num_valid)`` valid tokens: the start of the ascending
    (σ, tie key) order, or its end when ``highest``."""
    num_valid = int(valid.sum())
    count = math.floor(fraction * num_valid)
    result = torch.ones(std.numel(), dtype=torch.float32, device=std.device)
    if count > 0:
        order = _ascending_valid_order(std, valid, tie_seed)
        result[order[num_valid - count :] if highest else order[:count]] = 0.0
    return result.view(std.shape)


def carries_information(std: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether σ ranks anything: False when every valid token has the same σ (e.g. 0 while the critics' heads are
    still at their zero initialisation), where a mask would depend only on the tie key."""
    valid = _check_std_and_mask(std, mask, "carries_information")
    values = std[valid]
    return bool(values.numel() > 0 and values.max() > values.min())


def agreement_mask(std: torch.Tensor, mask: torch.Tensor, k: float, tie_seed: int | None = None) -> torch.Tensor:
    """Advantage mask ``I^A`` (docs/algorithms.md §4): 0 on the ``floor(k · num_valid)`` valid tokens with the
    lowest σ (the critics agree), 1 elsewhere, padding included; float32 ``[N, T]``. Ties: earlier tie key first."""
    return _sigma_end_mask("agreement_mask", "k", std, mask, k, tie_seed, highest=False)


def divergence_mask(std: torch.Tensor, mask: torch.Tensor, h: float, tie_seed: int | None = None) -> torch.Tensor:
    """Entropy filter ``I^H`` (docs/algorithms.md §4): 0 on the ``floor(h · num_valid)`` valid tokens with the
    highest σ (the critics diverge), 1 elsewhere, padding included; float32 ``[N, T]``. Ties: later tie key first
    (the reverse of :func:`agreement_mask`'s order, see the module docstring)."""
    return _sigma_end_mask("divergence_mask", "h", std, mask, h, tie_seed, highest=True)


@torch.no_grad()
def _sigma_end_mask(caller: str, name: str, std: torch.Tensor, mask: torch.Tensor, fraction: float,
                    tie_seed: int | None, *, highest: bool) -> torch.Tensor:
    _check_fraction(name, fraction, caller)
    valid = _check_std_and_mask(std, mask, caller)
    return _zero_end_of_order(std, valid, fraction, tie_seed, highest=highest)


@torch.no_grad()
def std_quantiles(
    std: torch.Tensor,
    mask: torch.Tensor,
    qs: tuple[float, ...] = (0.1, 0.5, 0.9),
) -> dict[str, float]:
    """Quantiles of σ over valid tokens for logging (docs/algorithms.md §7), linear interpolation.

    Keys are ``"p<percent>"``, e.g. ``{"p10": ..., "p50": ..., "p90": ...}`` for the default ``qs``.
    NumPy does the quantile because ``torch.quantile`` refuses inputs beyond 2**24 elements.
    """
    valid = _check_std_and_mask(std, mask, "std_quantiles")
    for q in qs:
        _check_fraction("each q", q, "std_quantiles")
    valid_std = std.detach().float()[valid].cpu().numpy().astype(np.float64)
    if valid_std.size == 0:
        raise ValueError("std_quantiles: the mask has no valid token")
    values = np.quantile(valid_std, list(qs))
    return {f"p{q * 100:g}": float(v) for q, v in zip(qs, values)}
