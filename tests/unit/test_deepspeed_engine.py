"""The DeepSpeed engine the learner and the critics share (common/deepspeed_engine.py), on the CPU accelerator."""

from __future__ import annotations

import copy

import pytest
import torch

from asyppo.common.deepspeed_engine import (
    init_process_group, make_engine, master_weights, optimizer_step, scale_learning_rates,
)


def test_a_bf16_engine_takes_adamw_steps_of_the_right_size():
    """bf16 keeps float32 master weights and moves them as AdamW does. At ZeRO-0 DeepSpeed's unfused bf16 optimizer
    creates AdamW's state with a dummy step, which made the first update 0.744 of AdamW's (the bias correction of
    step 2: 0.1/0.19 over sqrt(0.001/0.001999)); make_engine runs bf16 at ZeRO-1 instead. The reference is a float32
    twin stepped by torch's own AdamW on the same data."""
    init_process_group(0, 1, "127.0.0.1", 0, 60)
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    inputs, targets = torch.randn(64, 16), torch.randn(64, 1)
    engine = make_engine(copy.deepcopy(reference), lr=1e-3, weight_decay=0.0, zero_stage=0, grad_clip=1.0,
                         bf16=True)
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    before = master_weights(engine)
    loss = ((engine.module(inputs.bfloat16()).float() - targets) ** 2).mean()
    engine.backward(loss, scale_wrt_gas=False)
    applied, grad_norm = optimizer_step(engine, True)
    assert applied and grad_norm > 0
    update = master_weights(engine) - before

    start = torch.cat([p.detach().reshape(-1).clone() for p in reference.parameters()])
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
    ((reference(inputs) - targets) ** 2).mean().backward()
    optimizer.step()
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()]) - start

    ratio = float(update.norm() / expected.norm())
    cosine = float(update @ expected / (update.norm() * expected.norm()))
    assert abs(ratio - 1) < 0.02, f"bf16 update is {ratio:.3f} of AdamW's"
    assert cosine > 0.95  # bf16 gradients differ a little from float32's


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_parameter_groups_keep_their_own_rates_under_the_schedule(zero_stage):
    """A head at ten times the body's rate, both scaled by a schedule factor of 0.5, at every ZeRO stage: each layer
    moves exactly as torch's AdamW moves it with the rates set by hand (0.5e-3 and 0.5e-2)."""
    init_process_group(0, 1, "127.0.0.1", 0, 60)
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    inputs, targets = torch.randn(32, 8), torch.randn(32, 1)
    module = copy.deepcopy(reference)
    engine = make_engine(module, lr=1e-3, weight_decay=0.0, zero_stage=zero_stage, grad_clip=100.0, bf16=False,
                         param_groups=[{"params": list(module[0].parameters())},
                                       {"params": list(module[2].parameters()), "lr": 1e-2}])
    scale_learning_rates(engine, 0.5)
    assert sorted(group["lr"] for group in engine.optimizer.param_groups) == pytest.approx([5e-4, 5e-3])
    before = master_weights(engine)
    engine.backward(((engine.module(inputs) - targets) ** 2).mean(), scale_wrt_gas=False)
    applied, _ = optimizer_step(engine, True)
    assert applied
    update = master_weights(engine) - before

    start = torch.cat([p.detach().reshape(-1).clone() for p in reference.parameters()])
    optimizer = torch.optim.AdamW([{"params": reference[0].parameters(), "lr": 5e-4},
                                   {"params": reference[2].parameters(), "lr": 5e-3}], weight_decay=0.0)
    ((reference(inputs) - targets) ** 2).mean().backward()
    optimizer.step()
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()]) - start
    body = sum(p.numel() for p in reference[0].parameters())
    torch.testing.assert_close(update[:body], expected[:body], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(update[body:], expected[body:], rtol=1e-4, atol=1e-7)
