"""One rollout batch as the learner and the critics see it: collating workers' outputs, joining and selecting groups.

Pure PyTorch, no Ray: the actors are thin shells that call these functions.

Layout (shared by every module): N = P × n responses, the n samples of prompt i in rows i·n … i·n+n−1.
``input_ids[N, Lp+T]`` holds each prompt left-padded to Lp followed by its response right-padded to T, so
response token t sits at position Lp+t and is predicted (log-prob, entropy, value of s_t) from position Lp+t−1.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch



@dataclass
class RolloutBatch:
    """Token tensors of one rollout batch, padded once (see module docstring for the layout)."""

    input_ids: torch.Tensor  # long [N, Lp+T]
    attention_mask: torch.Tensor  # long [N, Lp+T]
    response_mask: torch.Tensor  # float [N, T]
    scores: torch.Tensor  # float [N], the verifier's reward per response (docs/algorithms.md §1)
    correct: torch.Tensor  # bool [N]
    rollout_logprobs: torch.Tensor  # float [N, T], from the rollout engine (staleness diagnostics)
    prompt_ids: list[str]  # one per prompt (P entries)
    group_size: int  # n
    weight_version: int  # the oldest policy version that generated any of its responses

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor | list[int]) -> "RolloutBatch":
        """A sub-batch of the given rows (prompt ids and group size keep their meaning only for whole groups)."""
        index = torch.as_tensor(index, dtype=torch.long)
        picked = {
            f.name: getattr(self, f.name)[index]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return RolloutBatch(
            **picked, prompt_ids=self.prompt_ids, group_size=self.group_size, weight_version=self.weight_version
        )


def collate_rollouts(
    prompt_token_ids: list[list[int]],
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    scores: torch.Tensor,
    correct: torch.Tensor,
    prompt_ids: list[str],
    group_size: int,
    pad_id: int,
    weight_version: int,
) -> RolloutBatch:
    """Left-pad the prompts, append the (already right-padded) responses and build the attention mask."""
    num_prompts = len(prompt_token_ids)
    if response_ids.shape[0] != num_prompts * group_size:
        raise ValueError(
            f"{response_ids.shape[0]} responses for {num_prompts} prompts × {group_size} samples"
        )
    prompt_len = max(len(p) for p in prompt_token_ids)
    prompts = torch.full((num_prompts, prompt_len), pad_id, dtype=torch.long)
    prompt_attention = torch.zeros((num_prompts, prompt_len), dtype=torch.long)
    for i, tokens in enumerate(prompt_token_ids):
        prompts[i, prompt_len - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        prompt_attention[i, prompt_len - len(tokens):] = 1
    prompts = prompts.repeat_interleave(group_size, dim=0)
    prompt_attention = prompt_attention.repeat_interleave(group_size, dim=0)
    return RolloutBatch(
        input_ids=torch.cat([prompts, response_ids.long()], dim=1),
        attention_mask=torch.cat([prompt_attention, response_mask.long()], dim=1),
        response_mask=response_mask.float(),
        scores=scores.float(),
        correct=correct.bool(),
        rollout_logprobs=rollout_logprobs.float(),
        prompt_ids=list(prompt_ids),
        group_size=group_size,
        weight_version=weight_version,
    )


def concat_batches(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Join batches from several rollout workers (each whole prompt groups) into one, re-padding both sides; its
    weight version is the oldest of theirs."""
    if len(batches) == 1:
        return batches[0]
    prompt_len = max(b.prompt_length for b in batches)
    response_len = max(b.response_length for b in batches)

    def pad(b: RolloutBatch) -> dict[str, torch.Tensor]:
        left, right = prompt_len - b.prompt_length, response_len - b.response_length
        pad2 = torch.nn.functional.pad
        return {
            "input_ids": pad2(b.input_ids, (left, right), value=pad_id),
            "attention_mask": pad2(b.attention_mask, (left, right), value=0),
            "response_mask": pad2(b.response_mask, (0, right), value=0.0),
            "rollout_logprobs": pad2(b.rollout_logprobs, (0, right), value=0.0),
        }

    padded = [pad(b) for b in batches]
    return RolloutBatch(
        **{key: torch.cat([p[key] for p in padded]) for key in padded[0]},
        scores=torch.cat([b.scores for b in batches]),
        correct=torch.cat([b.correct for b in batches]),
        prompt_ids=[pid for b in batches for pid in b.prompt_ids],
        group_size=batches[0].group_size,
        # Workers may answer with different versions (a restarted worker regenerated its share after a broadcast):
        # the batch is as stale as its oldest part, and each token's own rollout log-prob corrects it (§5a).
        weight_version=min(b.weight_version for b in batches),
    )


def uniform_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[P]`` bool: the prompts whose n responses all got the same score. Their GRPO advantage is 0 on every token
    (docs/algorithms.md §3), so they carry no policy gradient; DAPO's dynamic sampling drops them."""
    if scores.dim() != 1 or group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"uniform_groups: {scores.numel()} scores are not whole groups of {group_size}")
    groups = scores.view(-1, group_size)
    return (groups == groups[:, :1]).all(dim=1)


def select_groups(batch: RolloutBatch, groups: list[int]) -> RolloutBatch:
    """The sub-batch of whole prompt groups ``groups`` (indices into ``batch.prompt_ids``), in that order."""
    n = batch.group_size
    rows = [group * n + j for group in groups for j in range(n)]
    picked = batch.rows(rows)
    picked.prompt_ids = [batch.prompt_ids[group] for group in groups]
    return picked
