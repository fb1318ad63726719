"""Behaviour-policy correction: the truncated importance weight of the decoupled objective (docs/algorithms.md §5a).

Pure PyTorch, no Ray. The rollout engine samples from the behaviour policy μ (older weights when
``trainer.max_staleness ≥ 1``, other kernels and precision always); the learner recomputes the proximal policy
π_prox with its weights at the start of the update. The PPO/GPPO/dual-clip term runs on π_θ/π_prox and every token
is multiplied by a constant weight ``w`` that corrects for μ ≠ π_prox:

``ρ_t = exp(clamp(logπ_prox − logμ, −20, 20))``

- ``token-truncate``: ``w_t = min(ρ_t, C)`` (truncated importance sampling).
- ``token-mask``: ``w_t = ρ_t`` where ``ρ_t ≤ C``, else 0.
- ``sequence-mask``: ``w_t = ρ_t`` for every token of a response whose geometric-mean ratio
  ``exp(mean_t log ρ_t) ≤ C``, else 0 for the whole response.
- ``none``: ``w_t = 1`` (no correction; the mismatch is still measured).
"""

from __future__ import annotations

import torch

__all__ = ["OFF_POLICY_MODES", "behaviour_weights"]

OFF_POLICY_MODES = ("token-truncate", "token-mask", "sequence-mask", "none")
LOG_RATIO_LIMIT = 20.0
RATIO_QUANTILES = {"p01": 0.01, "p50": 0.5, "p99": 0.99}


def behaviour_weights(
    prox_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, *, mode: str, cap: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The per-token weight ``w[N, T]`` of the module docstring (1 on padding) and the mismatch statistics.

    Args:
        prox_logp: logπ_prox of each sampled token, the learner's recompute at the start of the update.
        behaviour_logp: logμ of the same tokens, as the rollout engine reported them while sampling.
        mask: float ``[N, T]`` response mask.
        mode: one of ``OFF_POLICY_MODES``.
        cap: C > 1.

    Returns:
        ``(w, stats)``; ``w`` is detached. Stats over valid tokens: ``offpolicy_logp_abs_diff`` (mean
        ``|logμ − logπ_prox|``), ``offpolicy_kl`` (mean of ``(ρ − 1) − log ρ``, the k3 estimate of
        KL(μ‖π_prox) from μ's own samples), ``offpolicy_capped_frac`` (tokens whose weight the mode truncated or
        zeroed), ``offpolicy_ratio_p01/p50/p99`` (quantiles of ρ) and ``offpolicy_ratio_max``.
    """
    if mode not in OFF_POLICY_MODES:
        raise ValueError(f"behaviour_weights: mode must be one of {OFF_POLICY_MODES}, got {mode!r}")
    if prox_logp.shape != mask.shape or behaviour_logp.shape != mask.shape:
        raise ValueError(
            f"behaviour_weights: log-probs {tuple(prox_logp.shape)} and {tuple(behaviour_logp.shape)} must match "
            f"the mask {tuple(mask.shape)}"
        )
    if not cap > 1.0:
        raise ValueError(f"behaviour_weights: cap must be > 1, got {cap}")
    valid = mask > 0
    log_ratio = torch.clamp(prox_logp.detach().float() - behaviour_logp.detach().float(),
                            -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    log_ratio = torch.where(valid, log_ratio, torch.zeros_like(log_ratio))
    ratio = torch.exp(log_ratio)

    if mode == "token-truncate":
        capped = valid & (ratio > cap)
        weights = torch.clamp(ratio, max=cap)
    elif mode == "token-mask":
        capped = valid & (ratio > cap)
        weights = torch.where(capped, torch.zeros_like(ratio), ratio)
    elif mode == "sequence-mask":
        tokens = valid.sum(dim=-1).clamp(min=1)
        sequence_ratio = torch.exp(log_ratio.sum(dim=-1) / tokens)
        capped = valid & (sequence_ratio > cap)[:, None]
        weights = torch.where(capped, torch.zeros_like(ratio), ratio)
    else:
        capped = torch.zeros_like(valid)
        weights = torch.ones_like(ratio)
    weights = torch.where(valid, weights, torch.ones_like(weights))

    stats = {"offpolicy_logp_abs_diff": 0.0, "offpolicy_kl": 0.0, "offpolicy_capped_frac": 0.0,
             **{f"offpolicy_ratio_{name}": 1.0 for name in RATIO_QUANTILES}, "offpolicy_ratio_max": 1.0}
    if valid.any():
        valid_ratio, valid_log_ratio = ratio[valid], log_ratio[valid]
        levels = torch.tensor(list(RATIO_QUANTILES.values()))
        stats.update({
            "offpolicy_logp_abs_diff": float(valid_log_ratio.abs().mean()),
            "offpolicy_kl": float(((valid_ratio - 1.0) - valid_log_ratio).mean()),
            "offpolicy_capped_frac": float(capped[valid].float().mean()),
            **{f"offpolicy_ratio_{name}": float(value)
               for name, value in zip(RATIO_QUANTILES, torch.quantile(valid_ratio, levels))},
            "offpolicy_ratio_max": float(valid_ratio.max()),
        })
    return weights.detach(), stats
