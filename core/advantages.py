"""Rewards placement and advantage estimators (docs/algorithms.md §1 and §3).

Pure PyTorch, no Ray. All per-token tensors are ``[N, T]`` response tensors with a float ``mask[N, T]``
that is 1.0 on real response tokens (see the batch layout in the project docs). Advantages and returns are
targets of the losses, never something to differentiate through, so every estimator here runs without
building an autograd graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asyppo.core.batch import RolloutBatch
from asyppo.core.diagnostics import explained_variance, position_thirds, rank_correlation
from asyppo.core.disagreement import (
    agreement_mask, carries_information, critic_std, divergence_mask, std_quantiles,
)

__all__ = [
    "AdvantageResult",
    "compute_advantages",
    "ensemble_values",
    "gae",
    "grpo_advantages",
    "place_outcome_rewards",
    "whiten",
]


def _check_response_tensor(name: str, tensor: torch.Tensor, shape: torch.Size | None = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be [N, T], got shape {tuple(tensor.shape)}")
    if shape is not None and tensor.shape != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} (same as the mask)")


def _valid_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask > 0


def place_outcome_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put each response's scalar score on its last valid token, 0 elsewhere (docs/algorithms.md §1).

    Args:
        scores: ``[N]`` one outcome score per response.
        mask: ``[N, T]`` response mask (1.0 on real tokens).

    Returns:
        ``[N, T]`` float32 per-token rewards.

    Raises:
        ValueError: on shape mismatch, or if a response has no valid token (its reward could not be placed).
    """
    _check_response_tensor("mask", mask)
    if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores must be [N]={mask.shape[0]}, got shape {tuple(scores.shape)}")
    valid = _valid_bool(mask)
    lengths = valid.sum(dim=-1)
    if bool((lengths == 0).any()):
        empty_rows = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"place_outcome_rewards: responses {empty_rows} have no valid token to carry the reward")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    # The mask need not be contiguous in principle, so take the largest valid index, not length - 1.
    last_index = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=-1)
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    rewards[torch.arange(mask.shape[0], device=mask.device), last_index] = scores.detach().float()
    return rewards


def ensemble_values(values: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Combine the critics' values ``[M, N, T]`` into one ``V̄[N, T]`` (docs/algorithms.md §3).

    ``reduce="mean"`` is the AsyPPO default; ``"min"`` is the pessimistic option.
    """
    if values.dim() != 3 or values.shape[0] < 1:
        raise ValueError(f"values must be [M>=1, N, T], got shape {tuple(values.shape)}")
    if reduce == "mean":
        return values.detach().float().mean(dim=0)
    if reduce == "min":
        return values.detach().float().amin(dim=0)
    raise ValueError(f"ensemble_values: reduce must be 'mean' or 'min', got {reduce!r}")


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (docs/algorithms.md §3).

    ``δ_t = r_t + γ·V_{t+1} − V_t`` and ``A_t = δ_t + γ·λ·A_{t+1}`` where ``t+1`` means the next *valid*
    token: a padding position passes the next value and the running advantage through unchanged, and the
    value beyond the last valid token is 0. ``returns = A + V``. No whitening here (see :func:`whiten`).
    For the AsyPPO ensemble pass ``V̄`` from :func:`ensemble_values` as ``values``.

    Padding positions get advantage 0 and return 0 so that nothing unmasked-by-mistake leaks a number.

    Args:
        rewards, values, mask: ``[N, T]``.
        gamma, lam: discount and GAE λ, each in [0, 1].

    Returns:
        ``(advantages, returns)``, both float32 ``[N, T]``.
    """
    _check_response_tensor("mask", mask)
    _check_response_tensor("rewards", rewards, mask.shape)
    _check_response_tensor("values", values, mask.shape)
    if not (0.0 <= gamma <= 1.0) or not (0.0 <= lam <= 1.0):
        raise ValueError(f"gae: gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    rewards = rewards.float()
    values = values.float()
    valid = _valid_bool(mask)

    num_rows, length = mask.shape
    advantages = torch.zeros(num_rows, length, dtype=torch.float32, device=mask.device)
    next_value = torch.zeros(num_rows, dtype=torch.float32, device=mask.device)
    running_advantage = torch.zeros_like(next_value)
    for t in range(length - 1, -1, -1):
        is_valid = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage_here = delta + gamma * lam * running_advantage
        running_advantage = torch.where(is_valid, advantage_here, running_advantage)
        next_value = torch.where(is_valid, values[:, t], next_value)
        advantages[:, t] = torch.where(is_valid, advantage_here, torch.zeros_like(advantage_here))
    returns = torch.where(valid, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


@torch.no_grad()
def grpo_advantages(
    scores: torch.Tensor,
    group_size: int,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages ``(R_i − mean_group)/(std_group + eps)`` (docs/algorithms.md §3).

    Rows ``i*n .. i*n+n-1`` form the group of prompt ``i`` (``n = group_size``); the std is the unbiased
    sample std within the group. Broadcast the ``[N]`` result to tokens with ``adv[:, None] * mask``.

    Raises:
        ValueError: if ``N`` is not a multiple of ``group_size`` or ``group_size < 2`` (a one-sample group
        has no baseline and no sample std, every advantage would be 0 or NaN).
    """
    if scores.dim() != 1:
        raise ValueError(f"grpo_advantages: scores must be [N], got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"grpo_advantages: group_size must be >= 2 (got {group_size}); GRPO needs a group baseline")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"grpo_advantages: N={scores.shape[0]} is not a multiple of group_size={group_size} "
            "(rows i*n..i*n+n-1 must hold the n samples of prompt i)"
        )
    grouped = scores.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if norm_by_std:
        centered = centered / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)
    return centered.reshape(-1)


@torch.no_grad()
def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Shift and scale ``x`` to mean 0 / std 1 over valid tokens only (docs/algorithms.md §3).

    The statistics are the mean and the population variance (divide by the number of valid tokens) over all
    valid tokens of the batch; the result is ``(x − mean)/sqrt(var + eps)``. Padding positions are set to 0.

    Raises:
        ValueError: on shape mismatch or when the mask has no valid token.
    """
    _check_response_tensor("mask", mask)
    _check_response_tensor("x", x, mask.shape)
    valid = _valid_bool(mask)
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("whiten: the mask has no valid token, mean/std are undefined")
    x = x.float()
    valid_values = x[valid]
    mean = valid_values.mean()
    variance = ((valid_values - mean) ** 2).mean()
    whitened = (x - mean) * torch.rsqrt(variance + eps)
    return torch.where(valid, whitened, torch.zeros_like(whitened))


@dataclass
class AdvantageResult:
    advantages: torch.Tensor  # [N, T], whitened where the estimator whitens
    returns: torch.Tensor  # [N, T] critic targets (zeros for grpo)
    adv_mask: torch.Tensor | None  # I^A [N, T] or None when off
    entropy_filter: torch.Tensor | None  # I^H [N, T] or None when off
    stats: dict[str, float]
    sigma: torch.Tensor | None = None  # σ [N, T], the critics' disagreement (M ≥ 2), else None


def compute_advantages(
    batch: RolloutBatch,
    values: torch.Tensor | None,
    *,
    estimator: str,
    gamma: float,
    lam: float,
    ensemble: str = "mean",
    adv_mask_fraction: float = 0.0,
    entropy_filter_fraction: float = 0.0,
    tie_seed: int | None = None,
) -> AdvantageResult:
    """Advantages, returns and the AsyPPO masks for one rollout batch (docs/algorithms.md §3, §4).

    ``values`` is ``[M, N, T]`` (every critic on every token, computed before this step's critic update) or None
    for ``grpo``. Masks need M ≥ 2 and are None when their fraction is 0, and both step aside (None,
    ``masks_skipped = 1``) while σ is the same on every token or M is 1. ``tie_seed`` orders tokens of equal σ.
    """
    mask = batch.response_mask
    stats: dict[str, float] = {}
    adv_mask = entropy_filter = std = None
    if estimator == "grpo":
        per_response = grpo_advantages(batch.scores, batch.group_size)
        advantages = per_response[:, None] * mask
        returns = torch.zeros_like(mask)
    elif estimator in ("asyppo", "gae"):
        if values is None or values.ndim != 3 or values.shape[1:] != mask.shape:
            raise ValueError(f"{estimator} needs values [M, N, T] matching mask {tuple(mask.shape)}")
        rewards = place_outcome_rewards(batch.scores, mask)
        mean_values = ensemble_values(values, ensemble)
        raw_advantages, returns = gae(rewards, mean_values, mask, gamma=gamma, lam=lam)
        advantages = whiten(raw_advantages, mask)
        stats["value_mean"] = float((mean_values * mask).sum() / mask.sum().clamp(min=1))
        stats["value_explained_var"] = explained_variance(mean_values, returns, mask)
        if values.shape[0] >= 2:
            std = critic_std(values)
            stats.update({f"sigma_{key}": value for key, value in std_quantiles(std, mask).items()})
            informative = carries_information(std, mask)
            stats["masks_skipped"] = 0.0 if informative else 1.0
            # Does σ point at the tokens where the ensemble is wrong? (docs/algorithms.md §7, diagnostics)
            stats["sigma_error_spearman"] = rank_correlation(std, (mean_values - returns).abs(), mask)
            if adv_mask_fraction > 0 and informative:
                adv_mask = agreement_mask(std, mask, adv_mask_fraction, tie_seed)
            if entropy_filter_fraction > 0 and informative:
                entropy_filter = divergence_mask(std, mask, entropy_filter_fraction, tie_seed)
        elif adv_mask_fraction > 0 or entropy_filter_fraction > 0:
            stats["masks_skipped"] = 1.0  # one critic (the others sitting out, critics.quorum): no σ to mask by
    else:
        raise ValueError(f"unknown estimator {estimator!r}")

    valid = mask.sum().clamp(min=1)
    stats["adv_mask_frac"] = float(((1 - adv_mask) * mask).sum() / valid) if adv_mask is not None else 0.0
    stats["entropy_filter_frac"] = (
        float(((1 - entropy_filter) * mask).sum() / valid) if entropy_filter is not None else 0.0
    )
    stats["advantage_abs_mean"] = float((advantages.abs() * mask).sum() / valid)
    for name, keep in (("adv_mask", adv_mask), ("entropy_filter", entropy_filter)):
        for third, share in zip(("first", "middle", "last"), position_thirds(keep, mask)):
            stats[f"{name}_frac_{third}_third"] = share
    return AdvantageResult(advantages, returns, adv_mask, entropy_filter, stats, std)
