"""Chunked per-token log-probabilities and entropies (docs/algorithms.md §5).

Pure PyTorch + transformers, no Ray. The vocabulary projection of a whole batch, ``[N, T, vocab]`` in
float32, is by far the largest tensor of a policy update (e.g. 8 × 4096 × 152k × 4 B = 20 GB). Here the
``(N·T)`` response positions are flattened and processed ``chunk_size`` positions at a time, so at most one
chunk's logits ``[chunk_size, vocab]`` is alive. Chunking the flattened positions (rather than T alone)
bounds that memory independently of N.

In grad mode autograd would otherwise keep every chunk's logits (and their softmax) for the backward pass,
which is the full tensor again; each chunk therefore runs under ``torch.utils.checkpoint`` so the backward
pass recomputes its logits.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from asyppo.core.losses import entropy_from_logits

__all__ = ["DEFAULT_CHUNK_SIZE", "logprobs_and_entropy", "response_logprobs"]

DEFAULT_CHUNK_SIZE = 1024


def _chunk_logprobs_and_entropy(
    hidden_chunk: torch.Tensor,
    token_chunk: torch.Tensor,
    lm_head: torch.nn.Module,
    temperature: float,
    with_entropy: bool,
    entropy_requires_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``token_chunk`` and entropy for one chunk of positions (docs/algorithms.md §5)."""
    logits = lm_head(hidden_chunk).float() / temperature
    # gather − logsumexp avoids materialising a second [chunk, vocab] tensor as log_softmax would.
    token_logits = logits.gather(-1, token_chunk.unsqueeze(-1)).squeeze(-1)
    logp = token_logits - torch.logsumexp(logits, dim=-1)
    entropy = None
    if with_entropy:
        if entropy_requires_grad:
            entropy = entropy_from_logits(logits)
        else:
            with torch.no_grad():
                entropy = entropy_from_logits(logits.detach())
    return logp, entropy


def _needs_graph(hidden: torch.Tensor, lm_head: torch.nn.Module) -> bool:
    if not torch.is_grad_enabled():
        return False
    return hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters())


def logprobs_and_entropy(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = True,
    entropy_requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log π(tokens | hidden)`` and the full-vocabulary entropy, chunk by chunk (docs/algorithms.md §5).

    ``logits = lm_head(hidden).float() / temperature``; ``logp = logits[token] − logsumexp(logits)``;
    ``H = logsumexp(z) − Σ softmax(z)·z``. Never holds more than one chunk's ``[chunk_size, vocab]`` float32
    logits at a time, in forward or backward (each chunk is checkpointed when a graph is needed).

    Args:
        hidden: ``[N, T, H]`` hidden states, position ``t`` being the state that predicts ``tokens[:, t]``.
        lm_head: maps ``[..., H]`` to ``[..., vocab]`` (e.g. ``model.get_output_embeddings()``).
        tokens: ``[N, T]`` token ids.
        temperature: the sampling temperature (> 0); logits are divided by it.
        chunk_size: number of (flattened ``N·T``) positions per chunk.
        with_entropy: also return the entropy (else None).
        entropy_requires_grad: build a graph through the entropy (only needed for an entropy bonus);
            otherwise the entropy is computed without one.

    Returns:
        ``(logp[N, T], entropy[N, T] or None)``, float32.
    """
    if hidden.dim() != 3:
        raise ValueError(f"logprobs_and_entropy: hidden must be [N, T, H], got shape {tuple(hidden.shape)}")
    if tokens.shape != hidden.shape[:2]:
        raise ValueError(
            f"logprobs_and_entropy: tokens {tuple(tokens.shape)} must match hidden's [N, T]={tuple(hidden.shape[:2])}"
        )
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"logprobs_and_entropy: tokens must hold integer ids, got {tokens.dtype}")
    if not temperature > 0.0:
        raise ValueError(f"logprobs_and_entropy: temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"logprobs_and_entropy: chunk_size must be >= 1, got {chunk_size}")

    num_rows, length, hidden_size = hidden.shape
    flat_hidden = hidden.reshape(num_rows * length, hidden_size)
    flat_tokens = tokens.reshape(num_rows * length).long()
    if flat_hidden.shape[0] == 0:
        empty = hidden.new_zeros((num_rows, length), dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    use_checkpoint = _needs_graph(hidden, lm_head)

    logp_chunks: list[torch.Tensor] = []
    entropy_chunks: list[torch.Tensor] = []
    for start in range(0, flat_hidden.shape[0], chunk_size):
        hidden_chunk = flat_hidden[start : start + chunk_size]
        token_chunk = flat_tokens[start : start + chunk_size]
        args = (hidden_chunk, token_chunk, lm_head, temperature, with_entropy, entropy_requires_grad)
        if use_checkpoint:
            logp_chunk, entropy_chunk = checkpoint(_chunk_logprobs_and_entropy, *args, use_reentrant=False)
        else:
            logp_chunk, entropy_chunk = _chunk_logprobs_and_entropy(*args)
        logp_chunks.append(logp_chunk)
        if entropy_chunk is not None:
            entropy_chunks.append(entropy_chunk)

    logp = torch.cat(logp_chunks).view(num_rows, length)
    entropy = torch.cat(entropy_chunks).view(num_rows, length) if with_entropy else None
    return logp, entropy


def _check_plain_lm_head(model: torch.nn.Module) -> None:
    """Refuse models whose logits are not simply ``lm_head(last_hidden_state)``."""
    config = getattr(model, "config", None)
    for attribute in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, attribute, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"response_logprobs: {type(model).__name__} transforms its logits ({attribute}={value}); "
                "only models whose logits are lm_head(last_hidden_state) are supported"
            )


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = True,
    entropy_requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs and entropies of the response part of ``input_ids`` (docs/algorithms.md §5).

    Layout: ``input_ids[N, Lp+T]`` = prompt left-padded to ``Lp`` then response right-padded to
    ``T = response_len``; position ids are ``attention_mask.cumsum(-1) − 1`` clamped at 0. Response token
    ``t`` (absolute position ``Lp+t``) is scored from the hidden state at ``Lp+t−1``. Works for any
    ``transformers`` causal LM whose logits are ``get_output_embeddings()(base_model(...).last_hidden_state)``
    (Qwen2, Llama, Mistral, GPT-2, ...).

    Returns:
        ``(logp[N, T], entropy[N, T] or None)``, float32. Padding positions hold numbers that the caller
        masks.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"response_logprobs: input_ids and attention_mask must be equal [N, L], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    total_len = input_ids.shape[1]
    prompt_len = total_len - response_len
    if response_len < 1 or prompt_len < 1:
        raise ValueError(
            f"response_logprobs: need 1 <= response_len < sequence length, got response_len={response_len} "
            f"for length {total_len} (the first response token needs a preceding prompt position)"
        )
    _check_plain_lm_head(model)
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"response_logprobs: {type(model).__name__} has no output embeddings (not a causal LM?)")
    backbone = model.base_model
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    outputs = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    hidden = outputs.last_hidden_state[:, prompt_len - 1 : total_len - 1]
    return logprobs_and_entropy(
        hidden,
        lm_head,
        input_ids[:, prompt_len:],
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        entropy_requires_grad=entropy_requires_grad,
    )
