"""Policy, entropy, NLL and value losses (docs/algorithms.md §2 and §5).

Pure PyTorch, no Ray. Per-token tensors are ``[N, T]`` with a float response ``mask[N, T]``.

Gradient accumulation: every loss takes an optional ``denominator``. A learner that splits a mini-batch into
micro-batches passes the whole mini-batch's denominator (its valid-token count for ``token-mean``, its number
of sequences for ``seq-mean-token-mean``) to every micro-batch and sums the micro-batch losses (or their
gradients); the result then equals the one-big-batch loss exactly.

Logged ``stats`` are plain Python floats averaged over the valid tokens of the tensors passed in this call
(a micro-batch), independent of ``denominator``.
"""

from __future__ import annotations

import torch

from asyppo.core.diagnostics import gradient_weight, position_thirds, removed_share

__all__ = [
    "AGGREGATIONS",
    "aggregate",
    "entropy_bonus",
    "entropy_from_logits",
    "kl_penalty",
    "nll_loss",
    "policy_loss",
    "value_loss",
]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean")
CLIP_MODES = ("ppo", "gppo")
LOG_RATIO_LIMIT = 20.0
ENTROPY_RATIO_EPS = 1e-8


def _check_same_shape(caller: str, mask: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    if mask.dim() != 2:
        raise ValueError(f"{caller}: mask must be [N, T], got shape {tuple(mask.shape)}")
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != mask.shape:
            raise ValueError(
                f"{caller}: {name} has shape {tuple(tensor.shape)}, expected {tuple(mask.shape)} like the mask"
            )


def _masked_mean_float(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over valid tokens as a Python float, for logging (0.0 when nothing is valid)."""
    count = float(mask.sum())
    if count == 0.0:
        return 0.0
    return float((values.detach().float() * mask).sum() / count)


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token ``values[N, T]`` to a scalar (docs/algorithms.md §5, "Aggregation").

    - ``token-mean``: ``Σ values·mask / denominator``; default denominator = ``mask.sum()``.
    - ``seq-mean-token-mean``: ``Σ_i (Σ_t values·mask / Σ_t mask)_i / denominator``; default denominator =
      the number of rows ``N``. A row without valid tokens contributes 0 (and still counts in the default
      denominator).

    Raises:
        ValueError: on an unknown ``agg``, shape mismatch, or a zero / negative denominator.
    """
    _check_same_shape("aggregate", mask, values=values)
    mask = mask.to(values.dtype)
    if agg == "token-mean":
        numerator = (values * mask).sum()
        if denominator is None:
            denominator = mask.sum()
    elif agg == "seq-mean-token-mean":
        tokens_per_row = mask.sum(dim=-1)
        row_sums = (values * mask).sum(dim=-1)
        # Rows without a valid token have a zero sum; dividing by 1 keeps them at 0 instead of NaN.
        numerator = (row_sums / tokens_per_row.clamp(min=1.0)).sum()
        if denominator is None:
            denominator = float(mask.shape[0])
    else:
        raise ValueError(f"aggregate: agg must be one of {AGGREGATIONS}, got {agg!r}")
    if float(denominator) <= 0.0:
        raise ValueError(f"aggregate ({agg}): denominator must be > 0, got {float(denominator)} (empty batch?)")
    return numerator / denominator


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary entropy ``H = logsumexp(z) − Σ softmax(z)·z`` over the last dim (docs/algorithms.md §5).

    Computed in the dtype of ``logits``; pass float32 (temperature-scaled) logits.
    """
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, *, clip_low: float, clip_high: float, dual_clip: float | None,
    clip_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token ``ℓ = max(−A·r, −A·clip(r))`` with PPO's or GPPO's clip, then the dual clip ``ℓ = min(ℓ, −A·c)``
    where ``A < 0`` (:func:`policy_loss`). Returns (ℓ, where the clip was active, where the dual clip lowered ℓ)."""
    pg_unclipped = -advantages * ratio
    if clip_mode == "ppo":
        clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    elif clip_mode == "gppo":
        # ratio / sg(ratio) is exactly 1 in the forward pass, so the bounds equal PPO's, but their gradient
        # with respect to logπ is (1 ± ε).
        unit_with_grad = ratio / ratio.detach()
        clipped_ratio = torch.clamp(ratio, (1.0 - clip_low) * unit_with_grad, (1.0 + clip_high) * unit_with_grad)
    else:
        raise ValueError(f"policy_loss: clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
    pg_clipped = -advantages * clipped_ratio
    per_token = torch.maximum(pg_unclipped, pg_clipped)
    clip_active = pg_clipped.detach() > pg_unclipped.detach()

    dual_clip_active = torch.zeros_like(clip_active)
    if dual_clip is not None:
        dual_bound = -advantages * dual_clip
        dual_clip_active = (advantages < 0) & (per_token.detach() > dual_bound)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, dual_bound), per_token)
    return per_token, clip_active, dual_clip_active


def _inside_entropy_ratio_band(entropy: torch.Tensor | None, old_entropy: torch.Tensor | None,
                               band: tuple[float, float]) -> torch.Tensor:
    """ERC's keep mask: ``low < ρ < high`` with ``ρ = (H + 1e-8)/(H_old + 1e-8)`` (:func:`policy_loss`)."""
    if entropy is None or old_entropy is None:
        raise ValueError("policy_loss: ERC needs both entropy and old_entropy")
    low, high = band
    entropy_ratio = (entropy.detach().float() + ENTROPY_RATIO_EPS) / (old_entropy.detach().float() + ENTROPY_RATIO_EPS)
    return (entropy_ratio > low) & (entropy_ratio < high)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    clip_mode: str = "ppo",
    adv_mask: torch.Tensor | None = None,
    behaviour_weight: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    old_entropy: torch.Tensor | None = None,
    erc_band: tuple[float, float] | None = None,
    agg: str = "token-mean",
    denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate with dual-clip, AsyPPO advantage mask and ERC (docs/algorithms.md §5), per token:

    ``r = exp(clamp(logπ − logπ_old, −20, 20))`` (``π_old`` is the proximal policy π_prox), ``pg1 = −A·r``,
    ``pg2 = −A·clip(r, 1−ε_low, 1+ε_high)`` (``clip_mode="ppo"``) or
    ``pg2 = −A·clamp(r, (1−ε_low)·r/sg(r), (1+ε_high)·r/sg(r))`` (``"gppo"``: same forward value, but the
    gradient in a clipped region stays ``(1±ε)·A·∇logπ`` instead of 0),
    ``ℓ = max(pg1, pg2)``; where ``A < 0`` and ``dual_clip`` is set: ``ℓ = min(ℓ, −A·c)``;
    ``ℓ = w·ℓ`` with the behaviour-policy weight ``w`` (§5a, ``asyppo.core.offpolicy.behaviour_weights``; None =
    1); ``ℓ = I^A·ℓ``; ERC: ``ρ = (H + 1e-8)/(H_old + 1e-8)``, tokens outside the open band
    ``erc_band = (low, high)`` (e.g. ``(0.95, 1.05)``) keep their value but lose their gradient (``ℓ = sg(ℓ)``).
    The loss is ``aggregate(ℓ, mask, agg, denominator)``; masked-out tokens (``I^A = 0``) stay in the
    denominator.

    ``old_logp``, ``advantages``, ``adv_mask``, ``behaviour_weight`` and the entropies are constants of the objective and are
    detached. ``erc_band=None`` turns ERC off; with it on, ``entropy`` and ``old_entropy`` are required. The
    ranges of ε, c and the band are the config's to guarantee (``asyppo.common.config.AlgorithmConfig``).

    Returns:
        ``(loss, stats)`` with stats ``pg_loss``, ``clip_frac`` (valid tokens where ``pg2 > pg1``),
        ``dual_clip_frac`` (valid tokens where the dual clip lowered ℓ), ``erc_kept_frac`` (1.0 when ERC is
        off), ``erc_grad_share_removed`` and ``erc_removed_frac_<first|middle|last>_third`` (what ERC removes:
        ``asyppo.core.diagnostics``), ``approx_kl`` (the k3 estimator ``(r − 1) − log r`` of KL(π_old‖π_θ), mean
        over valid tokens) and ``ratio_mean``.
    """
    _check_same_shape(
        "policy_loss", mask, logp=logp, old_logp=old_logp, advantages=advantages, adv_mask=adv_mask,
        behaviour_weight=behaviour_weight, entropy=entropy, old_entropy=old_entropy,
    )

    mask = mask.to(logp.dtype)
    advantages = advantages.detach().to(logp.dtype)
    log_ratio = torch.clamp(logp - old_logp.detach(), -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    per_token, clip_active, dual_clip_active = _clipped_surrogate(
        ratio, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, clip_mode=clip_mode,
    )
    if behaviour_weight is not None:
        per_token = per_token * behaviour_weight.detach().to(per_token.dtype)
    if adv_mask is not None:
        per_token = per_token * adv_mask.detach().to(per_token.dtype)

    erc_keep = torch.ones_like(clip_active)
    if erc_band is not None:
        erc_keep = _inside_entropy_ratio_band(entropy, old_entropy, erc_band)
        per_token = torch.where(erc_keep, per_token, per_token.detach())

    loss = aggregate(per_token, mask, agg, denominator)

    with torch.no_grad():
        approx_kl_per_token = (ratio - 1.0) - log_ratio
        stats = {
            "pg_loss": float(loss.detach()),
            "clip_frac": _masked_mean_float(clip_active.float(), mask),
            "dual_clip_frac": _masked_mean_float(dual_clip_active.float(), mask),
            "erc_kept_frac": _masked_mean_float(erc_keep.float(), mask),
            "erc_grad_share_removed": removed_share(gradient_weight(advantages, old_logp), erc_keep.float(), mask),
            **{f"erc_removed_frac_{third}_third": share
               for third, share in zip(("first", "middle", "last"), position_thirds(erc_keep, mask))},
            "approx_kl": _masked_mean_float(approx_kl_per_token, mask),
            "ratio_mean": _masked_mean_float(ratio, mask),
        }
    return loss, stats


def entropy_bonus(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    entropy_filter: torch.Tensor | None = None,
    agg: str = "token-mean",
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``agg(I^H · H_θ, mask)`` (docs/algorithms.md §5); the learner subtracts ``β_ent`` times this.

    ``entropy_filter`` is the AsyPPO ``I^H`` (None = no filter); filtered tokens stay in the denominator.
    """
    _check_same_shape("entropy_bonus", mask, entropy=entropy, entropy_filter=entropy_filter)
    if entropy_filter is not None:
        entropy = entropy * entropy_filter.detach().to(entropy.dtype)
    return aggregate(entropy, mask, agg, denominator)


KL_ESTIMATORS = ("k1", "k3")


def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k3",
    agg: str = "token-mean",
    denominator: float | torch.Tensor | None = None,
    *,
    old_logp: torch.Tensor | None = None,
    behaviour_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The β_KL term toward the frozen reference policy (docs/algorithms.md §5; the learner adds ``β_KL`` times
    the loss). With ``d = log π_ref − log π_θ`` and ``r = exp(clamp(log π_θ − log π_old, −20, 20))``, per token:

        k1 = −d                  (can be negative per token)
        k3 = exp(d) − d − 1      (≥ 0 per token, lower variance)
        ℓ  = w · r · k

    ``E_{π_old}[r·k] = E_{π_θ}[k] = KL(π_θ ‖ π_ref)`` for every θ, for k1 and for k3, so the loss is an
    importance-weighted estimate of the KL as a function of θ and its gradient is unbiased for
    ``∇_θ KL(π_θ ‖ π_ref)``: at ``π_θ = π_old`` it is ``(log π_θ − log π_ref)·∇log π_θ`` per token (plus
    ``∇log π_θ``, of mean 0, for k1). Using k itself as the loss (without ``r``) would not be: E[∇k1] = 0, and
    ∇k3 follows ∇KL(π_ref ‖ π_θ).

    ``old_logp`` is log π_old of the sampled tokens (the learner's π_prox; None = ``logp`` detached, the
    on-policy case, r = 1 with gradient ∇log π_θ). ``behaviour_weight`` is the constant §5a weight ``w`` that
    takes the samples from the engine's μ to π_old (None = 1). ``ref_logp``, ``old_logp`` and ``w`` carry no
    gradient.

    Returns:
        ``(loss, stats)`` with ``kl_ref = agg(k3, mask, agg, denominator)``, the unweighted k3 estimate of
        KL(π_θ ‖ π_ref) on these tokens (whatever ``estimator``; additive over micro-batches that share the
        denominator).
    """
    _check_same_shape("kl_penalty", mask, logp=logp, ref_logp=ref_logp, old_logp=old_logp,
                      behaviour_weight=behaviour_weight)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    d = (ref_logp.detach().to(logp.dtype) - logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    k3 = torch.exp(d) - d - 1
    k = -d if estimator == "k1" else k3
    sampled_logp = logp.detach() if old_logp is None else old_logp.detach().to(logp.dtype)
    ratio = torch.exp(torch.clamp(logp - sampled_logp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    per_token = ratio * k
    if behaviour_weight is not None:
        per_token = per_token * behaviour_weight.detach().to(per_token.dtype)
    loss = aggregate(per_token, mask, agg, denominator)
    with torch.no_grad():
        stats = {"kl_ref": float(aggregate(k3, mask, agg, denominator))}
    return loss, stats


def nll_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    select: torch.Tensor,
    agg: str = "token-mean",
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of the selected responses (the optional ``α_nll`` term of docs/algorithms.md §5;
    the learner selects the correct responses and passes their own denominator).

    Only tokens of rows with ``select[i] == True`` count. Default denominator: the number of valid tokens of
    the selected rows (``token-mean``) or the number of selected rows (``seq-mean-token-mean``). With no
    selected row and no explicit denominator the loss is a graph-connected 0.
    """
    _check_same_shape("nll_loss", mask, logp=logp)
    if select.dim() != 1 or select.shape[0] != mask.shape[0]:
        raise ValueError(f"nll_loss: select must be [N]={mask.shape[0]}, got shape {tuple(select.shape)}")
    selected_mask = mask.to(logp.dtype) * select.to(logp.dtype).unsqueeze(-1)
    if denominator is None:
        if agg == "token-mean":
            denominator = selected_mask.sum()
        elif agg == "seq-mean-token-mean":
            denominator = select.to(logp.dtype).sum()
        else:
            raise ValueError(f"nll_loss: agg must be one of {AGGREGATIONS}, got {agg!r}")
        if float(denominator) == 0.0:
            return (logp * 0.0).sum()
    return aggregate(-logp, selected_mask, agg, denominator)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.5,
    agg: str = "token-mean",
    denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss ``0.5·agg(max((V − R)², (clip(V, V_old − c, V_old + c) − R)²))`` (docs/algorithms.md §2).

    ``clip=None`` drops the clipped branch (plain ``0.5·agg((V − R)²)``). ``old_values`` and ``returns`` are
    detached.

    Returns:
        ``(loss, stats)`` with ``value_loss`` and ``value_clip_frac`` (valid tokens where the clipped branch is
        strictly larger, i.e. where it decides the loss).
    """
    _check_same_shape("value_loss", mask, values=values, old_values=old_values, returns=returns)
    if clip is not None and clip <= 0.0:
        raise ValueError(f"value_loss: clip must be > 0 (or None), got {clip}")
    mask = mask.to(values.dtype)
    returns = returns.detach().to(values.dtype)
    old_values = old_values.detach().to(values.dtype)
    unclipped_error = (values - returns) ** 2
    if clip is None:
        per_token = unclipped_error
        clip_active = torch.zeros_like(unclipped_error, dtype=torch.bool)
    else:
        clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
        clipped_error = (clipped_values - returns) ** 2
        per_token = torch.maximum(unclipped_error, clipped_error)
        clip_active = clipped_error.detach() > unclipped_error.detach()
    loss = 0.5 * aggregate(per_token, mask, agg, denominator)
    stats = {
        "value_loss": float(loss.detach()),
        "value_clip_frac": _masked_mean_float(clip_active.float(), mask),
    }
    return loss, stats
