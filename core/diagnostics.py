"""Diagnostics of the AsyPPO mechanisms, logged every step (docs/algorithms.md §7, "Diagnostics").

They answer, per rollout batch: do the critics predict the return (explained variance)? Does their disagreement σ
point at the tokens where the ensemble is wrong (rank correlation of σ with |V̄ − return|)? How much of the
advantage signal do the masks remove, and where in the response? Pure PyTorch, no Ray; nothing here changes what
is trained.
"""

from __future__ import annotations

import torch

__all__ = ["explained_variance", "gradient_weight", "position_thirds", "rank_correlation", "removed_share"]


def _valid(x: torch.Tensor, mask: torch.Tensor, caller: str) -> torch.Tensor:
    if x.shape != mask.shape:
        raise ValueError(f"{caller}: shapes {tuple(x.shape)} and mask {tuple(mask.shape)} differ")
    return mask > 0


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 − Var(G − V̄) / Var(G)`` over valid tokens: 1 for a perfect critic, 0 for one that predicts the mean
    return, negative for one worse than that. NaN when the returns do not vary (every response scored alike)."""
    valid = _valid(values, mask, "explained_variance") & _valid(returns, mask, "explained_variance")
    g, v = returns[valid].double(), values[valid].double()
    variance = g.var(unbiased=False)
    if g.numel() < 2 or variance == 0:
        return float("nan")
    return float(1 - (g - v).var(unbiased=False) / variance)


def rank_correlation(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    """Spearman's ρ of ``x`` and ``y`` over valid tokens: the Pearson correlation of their ranks.

    Ties get consecutive ranks in index order rather than their average rank, which differs from the textbook
    statistic only when many values are equal (σ is exactly flat only before the critics' first update, when the
    masks step aside anyway). NaN when either side is constant or fewer than 2 tokens are valid.
    """
    valid = _valid(x, mask, "rank_correlation") & _valid(y, mask, "rank_correlation")
    a, b = x[valid].double(), y[valid].double()
    if a.numel() < 2 or bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return float("nan")
    ranks = [torch.empty_like(v).scatter_(0, torch.argsort(v, stable=True), torch.arange(len(v), dtype=v.dtype))
             for v in (a, b)]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def gradient_weight(advantages: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``|A_t| · (1 − π(a_t|s_t))``: how much token t can move the policy. The gradient of ``A·log π(a)`` with
    respect to the logits is ``A·(e_a − π)``, whose norm lies between ``|A|·(1 − π(a))`` and ``√2·|A|·(1 − π(a))``;
    a token the policy already emits with probability ≈ 1 carries almost no gradient whatever its advantage."""
    return advantages.detach().abs() * (1 - logp.detach().float().exp())


def removed_share(weight: torch.Tensor, keep: torch.Tensor | None, mask: torch.Tensor) -> float:
    """``Σ |weight|·(1 − keep) / Σ |weight|`` over valid tokens: the share of a signal (e.g. |A|, the size of each
    token's policy-gradient coefficient) that a 0/1 mask ``keep`` removes. 0 when ``keep`` is None (no mask)."""
    valid = _valid(weight, mask, "removed_share").float()
    if keep is None:
        return 0.0
    magnitude = weight.detach().abs().double() * valid
    total = magnitude.sum()
    return float((magnitude * (1 - keep.double())).sum() / total) if total > 0 else 0.0


def position_thirds(keep: torch.Tensor | None, mask: torch.Tensor) -> tuple[float, float, float]:
    """Fraction of valid tokens a 0/1 mask ``keep`` removes in the first, middle and last third of each response
    (a token at index t of a response of length L is in third ``floor(3t / L)``). Zeros when ``keep`` is None."""
    valid = _valid(mask, mask, "position_thirds")
    if keep is None:
        return 0.0, 0.0, 0.0
    lengths = valid.sum(dim=1, keepdim=True).clamp(min=1)
    index = valid.long().cumsum(dim=1) - 1
    third = torch.div(3 * index, lengths, rounding_mode="floor")
    removed = (1 - keep.float()) * valid
    shares = []
    for part in range(3):
        where = valid & (third == part)
        count = int(where.sum())
        shares.append(float(removed[where].sum() / count) if count else 0.0)
    return shares[0], shares[1], shares[2]
