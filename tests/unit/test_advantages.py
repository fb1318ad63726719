"""Advantage estimators against independent reference implementations (docs/algorithms.md §1, §3)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from asyppo.core.advantages import ensemble_values, gae, grpo_advantages, place_outcome_rewards, whiten


def reference_gae(rewards, values, mask, gamma, lam):
    """GAE written over the list of valid positions of each row, one row at a time, in Python floats."""
    num_rows, length = len(mask), len(mask[0])
    advantages = [[0.0] * length for _ in range(num_rows)]
    returns = [[0.0] * length for _ in range(num_rows)]
    for row in range(num_rows):
        valid_positions = [t for t in range(length) if mask[row][t] > 0]
        running = 0.0
        for order in range(len(valid_positions) - 1, -1, -1):
            t = valid_positions[order]
            is_last = order == len(valid_positions) - 1
            next_value = 0.0 if is_last else values[row][valid_positions[order + 1]]
            delta = rewards[row][t] + gamma * next_value - values[row][t]
            running = delta + gamma * lam * running
            advantages[row][t] = running
            returns[row][t] = running + values[row][t]
    return advantages, returns


def make_mask(rows):
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8), (0.99, 0.0), (0.5, 1.0)])
def test_gae_matches_reference_with_padding(gamma, lam):
    generator = torch.Generator().manual_seed(0)
    mask = make_mask(
        [
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0, 0],
            [1, 0, 1, 1, 0, 1],  # interior padding must be passed through
            [0, 0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0],
        ]
    )
    rewards = torch.randn(mask.shape, generator=generator)
    values = torch.randn(mask.shape, generator=generator)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected_adv, expected_ret = reference_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor(expected_adv), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns, torch.tensor(expected_ret), atol=1e-5, rtol=1e-5)


def test_gae_gamma_lambda_one_gives_reward_to_go_minus_value():
    # With γ = λ = 1 the telescoping sum leaves A_t = Σ_{s>=t} r_s − V_t (V beyond the end is 0).
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.7, 123.0]])
    mask = make_mask([[1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask)
    torch.testing.assert_close(advantages, torch.tensor([[0.8, 0.6, 0.3, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_gae_ignores_values_and_rewards_at_padding():
    mask = make_mask([[1, 0, 1, 0]])
    rewards = torch.tensor([[0.1, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.3, 0.0, 0.5, 0.0]])
    base_adv, base_ret = gae(rewards, values, mask, gamma=0.9, lam=0.7)
    garbage_rewards = rewards.clone()
    garbage_values = values.clone()
    garbage_rewards[:, [1, 3]] = 55.0
    garbage_values[:, [1, 3]] = -77.0
    adv, ret = gae(garbage_rewards, garbage_values, mask, gamma=0.9, lam=0.7)
    torch.testing.assert_close(adv, base_adv)
    torch.testing.assert_close(ret, base_ret)
    assert adv[0, 1] == 0 and adv[0, 3] == 0


def test_gae_builds_no_graph():
    values = torch.randn(2, 3, requires_grad=True)
    advantages, returns = gae(torch.zeros(2, 3), values, torch.ones(2, 3))
    assert not advantages.requires_grad and not returns.requires_grad


def test_gae_rejects_bad_input():
    with pytest.raises(ValueError, match="values"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), gamma=1.5)


def test_ensemble_values_mean_and_min():
    values = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1))
    mean = ensemble_values(values, "mean")
    minimum = ensemble_values(values, "min")
    for n in range(2):
        for t in range(4):
            column = [values[m, n, t].item() for m in range(3)]
            assert mean[n, t].item() == pytest.approx(sum(column) / 3, abs=1e-6)
            assert minimum[n, t].item() == pytest.approx(min(column))
    with pytest.raises(ValueError, match="reduce"):
        ensemble_values(values, "median")
    with pytest.raises(ValueError, match="M>=1"):
        ensemble_values(values[0], "mean")


def test_grpo_advantages_unbiased_std_per_group():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.3, 0.7, 0.2, 0.9])
    group_size = 4
    result = grpo_advantages(scores, group_size)
    expected = []
    for start in range(0, len(scores), group_size):
        group = scores[start : start + group_size].tolist()
        mean = statistics.fmean(group)
        std = statistics.stdev(group)  # sample (n − 1) std
        expected.extend((x - mean) / (std + 1e-6) for x in group)
    assert result.tolist() == pytest.approx(expected, abs=1e-5)
    # A group where every answer scores the same carries no signal.
    assert result[4:8].tolist() == pytest.approx([0.0] * 4, abs=1e-9)


def test_grpo_advantages_without_std():
    scores = torch.tensor([1.0, 0.0, 3.0, 5.0])
    assert grpo_advantages(scores, 2, norm_by_std=False).tolist() == pytest.approx([0.5, -0.5, -1.0, 1.0])


def test_grpo_rejects_bad_groups():
    with pytest.raises(ValueError, match="multiple"):
        grpo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(4), 1)


def test_whiten_over_valid_tokens_only():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, generator=generator) * 4 + 2
    mask = make_mask([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0]])
    x_with_garbage = torch.where(mask > 0, x, torch.full_like(x, 1e6))
    result = whiten(x_with_garbage, mask)
    valid_values = [x[n, t].item() for n in range(3) for t in range(5) if mask[n, t] > 0]
    mean = statistics.fmean(valid_values)
    std = statistics.pstdev(valid_values)
    for n in range(3):
        for t in range(5):
            expected = (x[n, t].item() - mean) / math.sqrt(std**2 + 1e-8) if mask[n, t] > 0 else 0.0
            assert result[n, t].item() == pytest.approx(expected, abs=1e-5)
    valid_result = result[mask > 0]
    assert valid_result.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid_result.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_whiten_rejects_empty_mask():
    with pytest.raises(ValueError, match="no valid token"):
        whiten(torch.ones(2, 3), torch.zeros(2, 3))


def test_place_outcome_rewards_on_last_valid_token():
    mask = make_mask([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])
    scores = torch.tensor([0.5, -1.0, 2.0, 3.0])
    rewards = place_outcome_rewards(scores, mask)
    expected = [[0.0] * 4 for _ in range(4)]
    for n, row in enumerate(mask.tolist()):
        last = max(t for t, m in enumerate(row) if m > 0)
        expected[n][last] = scores[n].item()
    assert rewards.tolist() == expected


def test_place_outcome_rewards_rejects_empty_response():
    with pytest.raises(ValueError, match=r"responses \[1\]"):
        place_outcome_rewards(torch.ones(2), make_mask([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="scores"):
        place_outcome_rewards(torch.ones(3), make_mask([[1, 0], [1, 0]]))


def test_uniform_groups_are_the_prompts_whose_responses_all_scored_alike():
    from asyppo.core.batch import uniform_groups

    scores = torch.tensor([1.0, 1, 1, 0, 1, 0, 0, 0, 0, 0.5, 0.5, 0.5])
    assert uniform_groups(scores, 3).tolist() == [True, False, True, True]
    assert uniform_groups(torch.tensor([0.0, 0.0, 1.0, 1.0]), 2).tolist() == [True, True]
    with pytest.raises(ValueError, match="whole groups"):
        uniform_groups(scores, 5)


def test_select_groups_keeps_whole_groups_with_their_prompt_ids():
    from asyppo.core.batch import collate_rollouts, select_groups

    n, T = 2, 3
    batch = collate_rollouts(
        [[5], [6, 7], [8]], torch.arange(18).view(6, T), torch.ones(6, T), torch.zeros(6, T),
        torch.tensor([0.0, 1, 2, 3, 4, 5]), torch.tensor([0, 1, 0, 1, 0, 1]).bool(), ["a", "b", "c"], n, 0, 7,
    )
    picked = select_groups(batch, [2, 0])
    assert picked.prompt_ids == ["c", "a"] and picked.group_size == n and picked.weight_version == 7
    assert picked.scores.tolist() == [4.0, 5.0, 0.0, 1.0]
    assert torch.equal(picked.input_ids, batch.input_ids[[4, 5, 0, 1]])
    assert select_groups(batch, []).num_sequences == 0


def test_workers_batches_of_different_weight_versions_join_at_the_oldest():
    """A restarted rollout worker regenerates its share with newer weights than its peer's (async mode): the joined
    batch keeps every row as sampled, its rollout log-probs included, and counts as old as its oldest part."""
    from asyppo.core.batch import collate_rollouts, concat_batches

    older = collate_rollouts([[5, 6]], torch.tensor([[1, 2]]), torch.ones(1, 2), torch.tensor([[-0.5, -0.25]]),
                             torch.tensor([1.0]), torch.tensor([True]), ["a"], 1, 0, 4)
    newer = collate_rollouts([[7]], torch.tensor([[3, 4, 9]]), torch.ones(1, 3), torch.tensor([[-1.0, -2.0, -3.0]]),
                             torch.tensor([0.0]), torch.tensor([False]), ["b"], 1, 0, 5)
    joined = concat_batches([older, newer], pad_id=0)
    assert joined.weight_version == 4 and joined.prompt_ids == ["a", "b"]
    assert joined.rollout_logprobs.tolist() == [[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0]]
    assert joined.input_ids.tolist() == [[5, 6, 1, 2, 0], [0, 7, 3, 4, 9]]
    assert concat_batches([newer, older], pad_id=0).weight_version == 4
