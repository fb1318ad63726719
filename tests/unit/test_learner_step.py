"""The learner's and a mini-critic's step on real DeepSpeed engines (CPU, gloo), outside Ray.

The actors are plain classes, so their step logic is exercised here directly; the Ray shells are covered by the
end-to-end tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from asyppo.common.config import build_config
from asyppo.cluster.supervisor import critic_arguments
from asyppo.critics.mini_critic import MiniCritic
from asyppo.core.advantages import compute_advantages
from tests.helpers import GROUP, T, make_batch, make_learner


@pytest.fixture(scope="module")
def cfg():
    return build_config(overrides=[
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "learner.mini_batch_size=8",
        "learner.micro_batch_size=4", "learner.lr=1e-2", "learner.epochs=2", "critics.micro_batch_size=4",
        "critics.lr=1e-2",
    ])


def make_critic(cfg, critic_dir, index):
    args, kwargs = critic_arguments(cfg, critic_dir, index)
    return MiniCritic(*args, **kwargs)


def params(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_collate_layout_matches_the_batch_contract():
    batch = make_batch()
    assert batch.input_ids.shape == (16, 4 + T) and batch.prompt_length == 4
    # Prompt 2 has length 2: left-padded, and its 4 samples share it.
    assert batch.attention_mask[8:12, :2].sum() == 0 and batch.attention_mask[8:12, 2:4].all()
    assert torch.equal(batch.attention_mask[:, 4:].float(), batch.response_mask)


def test_learner_update_changes_weights_and_reports_finite_stats(cfg, tiny_policy_dir):
    learner = make_learner(cfg, tiny_policy_dir)
    batch = make_batch()
    before = params(learner.engine.module)
    old = learner.compute_old_logprobs(batch)
    assert old["entropy_mean"] > 0
    values = [torch.randn(batch.response_mask.shape) * batch.response_mask for _ in range(2)]
    returns, adv_stats = learner.compute_advantages(0, *values)
    assert returns.shape == batch.response_mask.shape
    valid = int(batch.response_mask.sum())
    # §4: the advantage mask zeroes exactly floor(k · valid) tokens.
    assert adv_stats["adv_mask_frac"] == pytest.approx(math.floor(0.2 * valid) / valid)
    stats = learner.update(step=0)
    assert stats["optimizer_steps"] == 4 and stats["skipped_steps"] == 0  # 2 epochs × 16/8 mini-batches
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert 0 <= stats["erc_kept_frac"] <= 1 and stats["policy_version"] == 1
    after = params(learner.engine.module)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("poison", ["old_logprobs", "nan_critic_values", "diverged_critic_values"])
def test_learner_skips_a_bad_step_and_leaves_weights_untouched(cfg, tiny_policy_dir, poison):
    learner = make_learner(cfg, tiny_policy_dir)
    batch = make_batch(seed=1)
    learner.compute_old_logprobs(batch)
    values = [torch.randn(batch.response_mask.shape) for _ in range(2)]
    if poison == "old_logprobs":
        learner._old_logp[:, 0] = float("nan")  # as a broken forward pass would produce
    elif poison == "nan_critic_values":
        values[1] = torch.full(batch.response_mask.shape, float("nan"))
    else:  # finite but absurd, as critics.lr=1e30 makes them: whitening overflows and every advantage becomes 0
        values[1] = torch.full(batch.response_mask.shape, 1e31)
    returns, prepared = learner.compute_advantages(0, *values)
    if poison != "old_logprobs":
        assert prepared["diverged_critic_1"] == 1.0 and prepared["diverged_critic_0"] == 0.0
    before = params(learner.engine.module)
    optimizer_state_before = len(learner.engine.optimizer.state)
    stats = learner.update(step=0)
    assert stats["optimizer_steps"] == 0 and stats["skipped_steps"] == 4
    assert stats["policy_version"] == 0
    after = params(learner.engine.module)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(learner.engine.optimizer.state) == optimizer_state_before


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_accumulation_equals_one_big_batch(tiny_policy_dir, agg):
    """The accumulated gradient over 4 micro-batches equals the one-micro-batch gradient (§5)."""
    grads = []
    for micro in (8, 2):
        cfg = build_config(overrides=[
            "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4", "learner.mini_batch_size=8",
            f"learner.micro_batch_size={micro}", f"algorithm.agg={agg}", "algorithm.entropy_coef=0.01",
        ])
        learner = make_learner(cfg, tiny_policy_dir)
        batch = make_batch().rows(list(range(8)))
        batch.prompt_ids = batch.prompt_ids[:2]
        learner.compute_old_logprobs(batch)
        learner._old_logp += 0.05 * torch.randn(learner._old_logp.shape, generator=torch.Generator().manual_seed(3))
        learner.compute_advantages(0, *[torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(m))
                          for m in range(2)])
        learner.engine.zero_grad()
        finite, stats, tokens = learner.accumulate_gradients(torch.arange(8))
        assert finite and len(stats) == 8 // micro and tokens == int(batch.response_mask.sum())
        grads.append({n: p.grad.clone() for n, p in learner.engine.module.named_parameters()})
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


def eight_row_learner(policy_dir, *overrides):
    cfg = build_config(overrides=[
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4", "learner.mini_batch_size=8",
        "algorithm.entropy_coef=0.01", *overrides,
    ])
    batch = make_batch().rows(list(range(8)))
    batch.prompt_ids = batch.prompt_ids[:2]
    return make_learner(cfg, policy_dir), batch


def one_update(learner, batch):
    learner.compute_old_logprobs(batch)
    learner.compute_advantages(0, *[torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(m))
                      for m in range(2)])
    return learner.update(step=0)


def test_logged_losses_are_the_mini_batch_loss_whatever_the_micro_batch(tiny_policy_dir):
    """One mini-batch of 8 as 1 micro-batch or as 4: the logged losses and fractions are the same numbers."""
    one, four = (one_update(*eight_row_learner(tiny_policy_dir, f"learner.micro_batch_size={micro}"))
                 for micro in (8, 2))
    for key in ("policy_loss", "pg_loss", "entropy_bonus", "clip_frac", "erc_kept_frac", "approx_kl", "ratio_mean"):
        assert four[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    assert one["entropy_bonus"] > 0


def test_nll_term_uses_the_correct_responses_with_their_own_denominator(tiny_policy_dir):
    learner, batch = eight_row_learner(tiny_policy_dir, "learner.micro_batch_size=2", "algorithm.nll_coef=1.0")
    batch.correct = torch.tensor([True, False, False, True, False, False, False, True])
    batch.scores = batch.correct.float()
    stats = one_update(learner, batch)
    # At the first (only) mini-batch π_θ = π_prox: the NLL is the prox log-probs' mean over correct tokens.
    mask = batch.response_mask[batch.correct]
    expected = float(-(learner._old_logp[batch.correct] * mask).sum() / mask.sum())
    assert stats["nll_loss"] == pytest.approx(expected, rel=1e-4)
    assert stats["policy_loss"] == pytest.approx(
        stats["pg_loss"] - 0.01 * stats["entropy_bonus"] + stats["nll_loss"], rel=1e-5
    )
    # An all-wrong batch has nothing to imitate (not "every response ties for the best score").
    learner, batch = eight_row_learner(tiny_policy_dir, "learner.micro_batch_size=2", "algorithm.nll_coef=1.0")
    batch.correct = torch.zeros(8, dtype=torch.bool)
    batch.scores = torch.zeros(8)
    stats = one_update(learner, batch)
    assert "nll_loss" not in stats
    assert stats["policy_loss"] == pytest.approx(stats["pg_loss"] - 0.01 * stats["entropy_bonus"], rel=1e-5)


def test_critic_scores_every_token_and_trains_only_on_its_rows(cfg, tiny_critic_dir):
    critic = make_critic(cfg, tiny_critic_dir, index=0)
    batch = make_batch()
    values = critic.values(batch)
    assert values.shape == batch.response_mask.shape
    assert torch.all(values[batch.response_mask == 0] == 0)
    returns = batch.scores[:, None] * batch.response_mask
    rows = [0, 1, 2, 3]
    stats = critic.update(returns, rows)
    assert stats["num_rows"] == 4 and math.isfinite(stats["value_loss"]) and stats["skipped_steps"] == 0
    # Returns of rows it does not own must not matter: poison them and train a fresh critic on the same rows.
    poisoned = returns.clone()
    poisoned[4:] = float("nan")
    twin = make_critic(cfg, tiny_critic_dir, index=0)
    twin.values(batch)
    twin_stats = twin.update(poisoned, rows)
    assert twin_stats["value_loss"] == pytest.approx(stats["value_loss"])
    for (name, p), (_, q) in zip(critic.engine.module.named_parameters(), twin.engine.module.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_critic_skips_nan_returns(cfg, tiny_critic_dir):
    critic = make_critic(cfg, tiny_critic_dir, index=1)
    batch = make_batch()
    critic.values(batch)
    before = params(critic.engine.module)
    stats = critic.update(torch.full(batch.response_mask.shape, float("nan")), [0, 1])
    assert stats["skipped_steps"] == 1
    assert all(torch.equal(before[k], v) for k, v in params(critic.engine.module).items())


def test_advantages_for_grpo_need_no_values():
    batch = make_batch()
    result = compute_advantages(batch, None, estimator="grpo", gamma=1.0, lam=1.0)
    assert result.adv_mask is None and result.entropy_filter is None
    group0 = batch.scores[:GROUP]
    expected = (group0 - group0.mean()) / (group0.std() + 1e-6)
    torch.testing.assert_close(result.advantages[:GROUP, 0] * batch.response_mask[:GROUP, 0], expected)


def one_step_cfg(*extra):
    """One optimizer step per update (1 epoch, the whole batch as one mini-batch), no weight decay."""
    return build_config(overrides=[
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "learner.mini_batch_size=16",
        "learner.micro_batch_size=4", "learner.lr=1e-2", "learner.epochs=1", "trainer.steps=10", *extra,
    ])


def update_once(learner, batch, step=0):
    learner.compute_old_logprobs(batch)
    values = [torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(step + m))
              * batch.response_mask for m in range(2)]
    learner.compute_advantages(step, *values)
    return learner.update(step=step)


def master_weights(engine) -> dict[str, torch.Tensor]:
    """Whole float32 parameters under any ZeRO stage (ZeRO-3 keeps them partitioned)."""
    from asyppo.common.deepspeed_engine import full_parameters

    with full_parameters(engine) as module:
        return params(module)


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_every_zero_stage_takes_the_update_of_zero_0(tiny_policy_dir, tiny_critic_dir, zero_stage):
    """The learner and a critic, 4 micro-batches per optimizer step: ZeRO 1-3 move the weights as ZeRO-0 does. The
    module's parts are called directly (never engine.forward()), so ZeRO-3 used to keep the last micro-batch's
    gradient alone (begin_micro_batch in common/deepspeed_engine.py)."""
    batch = make_batch(seed=2)
    returns = batch.scores[:, None] * batch.response_mask
    moved = {}
    for stage in (0, zero_stage):
        cfg = one_step_cfg(f"learner.zero_stage={stage}", f"critics.zero_stage={stage}", "critics.micro_batch_size=4")
        learner, critic = make_learner(cfg, tiny_policy_dir), make_critic(cfg, tiny_critic_dir, 0)
        learner_before, critic_before = master_weights(learner.engine), master_weights(critic.engine)
        stats = update_once(learner, batch)
        assert stats["optimizer_steps"] == 1
        critic.values(batch)
        assert critic.update(returns, list(range(batch.num_sequences)))["skipped_steps"] == 0
        moved[stage] = ({k: v - learner_before[k] for k, v in master_weights(learner.engine).items()},
                        {k: v - critic_before[k] for k, v in master_weights(critic.engine).items()},
                        stats["grad_norm"])
    (learner_0, critic_0, norm_0), (learner_z, critic_z, norm_z) = moved[0], moved[zero_stage]
    assert norm_z == pytest.approx(norm_0, rel=1e-4)
    for expected, got in ((learner_0, learner_z), (critic_0, critic_z)):
        assert any(bool(delta.abs().sum() > 0) for delta in expected.values())
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_same_update(tiny_policy_dir):
    batch = make_batch(seed=2)
    results = []
    for flag in ("false", "true"):
        learner = make_learner(one_step_cfg(f"learner.gradient_checkpointing={flag}"), tiny_policy_dir)
        assert learner.engine.module.is_gradient_checkpointing == (flag == "true")
        stats = update_once(learner, batch)
        results.append((stats["policy_loss"], params(learner.engine.module)))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert all(torch.allclose(params_a[k], params_b[k], atol=1e-7) for k in params_a)


def test_the_learning_rate_follows_its_schedule_into_the_optimizer(tiny_policy_dir):
    """Warm-up then cosine (§5b): the update reports lr_t, and Adam's first step moves the largest weight by ≈ lr_t
    (m̂/√v̂ = ±1 on the first step), so the rate really reached the optimizer."""
    cfg = one_step_cfg("learner.lr_warmup_steps=4", "learner.lr_schedule=cosine", "learner.lr_min_ratio=0.1")
    for step in (1, 7):
        expected = 1e-2 * ((step + 1) / 4 if step < 4 else
                           0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 4) / (10 - 1 - 4))))
        learner = make_learner(cfg, tiny_policy_dir)
        before = params(learner.engine.module)
        stats = update_once(learner, make_batch(seed=3), step=step)
        assert stats["lr"] == pytest.approx(expected, rel=1e-12)
        moved = max(float((params(learner.engine.module)[k] - before[k]).abs().max()) for k in before)
        assert moved == pytest.approx(expected, rel=1e-3)


def test_the_policys_learning_rate_schedule_starts_with_its_first_update(tiny_policy_dir):
    """With algorithm.critic_warmup_steps=W the policy first updates at step W: that update is the schedule's step 0
    (warm-up (0 + 1)/4, not the step-W factor), and the cosine ends at the run's last step, T − W updates later."""
    cfg = one_step_cfg("algorithm.critic_warmup_steps=3", "learner.lr_warmup_steps=4", "learner.lr_schedule=cosine",
                       "learner.lr_min_ratio=0.1")
    first_update, last_step = 3, 9  # trainer.steps=10: policy updates at steps 3 … 9, schedule steps 0 … 6
    for step, expected in ((first_update, 1e-2 * 1 / 4), (last_step, 1e-2 * 0.1)):
        stats = update_once(make_learner(cfg, tiny_policy_dir), make_batch(seed=3), step=step)
        assert stats["lr"] == pytest.approx(expected, rel=1e-12)


def test_the_kl_penalty_measures_the_distance_to_the_initial_policy(tiny_policy_dir):
    """After one update the policy has left the reference; the next update's kl_ref is the k3 estimate over the batch,
    from the frozen initial model (loaded independently here) and the policy's log-probs before that update."""
    from transformers import AutoModelForCausalLM

    from asyppo.core.logprobs import response_logprobs

    learner = make_learner(one_step_cfg("algorithm.kl_coef=0.5", "algorithm.kl_estimator=k3"), tiny_policy_dir)
    first = update_once(learner, make_batch(seed=4), step=0)
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-9)  # the policy still is the reference
    batch = make_batch(seed=5)
    second = update_once(learner, batch, step=1)
    reference = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logp, _ = response_logprobs(reference, batch.input_ids, batch.attention_mask, batch.response_length,
                                        temperature=1.0, chunk_size=256, with_entropy=False)
    mask = batch.response_mask
    d = ref_logp - learner._old_logp
    k3 = ((torch.exp(d) - d - 1) * mask).sum() / mask.sum()
    assert float(k3) > 1e-6
    assert second["kl_ref"] == pytest.approx(float(k3), rel=1e-4)


def test_a_critic_cut_to_fewer_layers_trains_and_restores_from_its_checkpoint(tmp_path, tiny_critic_dir):
    """model.critic_layers=1 on the 2-layer tiny critic: one decoder layer scores and trains, and a critic restored
    from its checkpoint (as after a restart) holds the trained weights and scores alike."""
    cfg = build_config(overrides=["rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
                                  "learner.mini_batch_size=8", "learner.micro_batch_size=4",
                                  "critics.micro_batch_size=4", "critics.lr=1e-2", "model.critic_layers=1"])
    critic = make_critic(cfg, tiny_critic_dir, index=0)
    assert len(critic.engine.module.backbone.layers) == 1
    batch = make_batch()
    values = critic.values(batch)
    assert values.shape == batch.response_mask.shape
    before = params(critic.engine.module)
    stats = critic.update(batch.scores[:, None] * batch.response_mask, list(range(8)))
    assert stats["skipped_steps"] == 0 and stats["num_rows"] == 8
    trained = params(critic.engine.module)
    assert any(not torch.equal(before[name], trained[name]) for name in trained)

    critic.save(str(tmp_path))
    restored = make_critic(cfg, tiny_critic_dir, index=0)
    restored.restore(str(tmp_path))
    assert all(torch.equal(tensor, trained[name]) for name, tensor in params(restored.engine.module).items())
    torch.testing.assert_close(restored.values(batch), critic.values(batch))


def test_a_critics_value_head_trains_at_its_own_rate(tiny_critic_dir):
    """critics.head_lr=1e-2 beside critics.lr=1e-4. AdamW's first step moves every parameter with a gradient by
    exactly its rate (m̂/√v̂ = ±1), so the zero head moves by 1e-2 at the first update, while the backbone, whose
    gradient is zero while the head is, does not move. At the second update the backbone takes its own first
    step: at most 1e-4 per parameter."""
    cfg = build_config(overrides=["rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
                                  "learner.mini_batch_size=8", "learner.micro_batch_size=4",
                                  "critics.micro_batch_size=4", "critics.lr=1e-4", "critics.head_lr=1e-2"])
    critic = make_critic(cfg, tiny_critic_dir, index=0)
    batch = make_batch()
    returns = batch.scores[:, None] * batch.response_mask

    def largest_moves(before):
        moved = {name: float((tensor - before[name]).abs().max()) for name, tensor in params(critic.engine.module).items()}
        head = max(move for name, move in moved.items() if name.startswith("value_head."))
        backbone = max(move for name, move in moved.items() if name.startswith("backbone."))
        return head, backbone

    before = params(critic.engine.module)
    critic.values(batch)
    assert critic.update(returns, list(range(8)), step=0)["skipped_steps"] == 0
    head, backbone = largest_moves(before)
    assert head == pytest.approx(1e-2, rel=1e-3) and backbone == 0.0

    before = params(critic.engine.module)
    critic.values(batch)
    critic.update(returns, list(range(8)), step=1)
    head, backbone = largest_moves(before)
    assert 1e-5 < backbone <= 1e-4 * (1 + 1e-3) and head > 1e-3
