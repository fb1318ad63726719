"""ValueModel on a tiny Qwen2 config (docs/algorithms.md §2)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from asyppo.critics.value_model import VALUE_HEAD_FILE, ValueModel

PROMPT_LEN, RESPONSE_LEN = 4, 5


def tiny_config(layers: int = 2):
    return Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
    )


def model_with_random_head(seed: int = 0) -> ValueModel:
    torch.manual_seed(seed)
    model = ValueModel.from_config(tiny_config()).eval()
    torch.nn.init.normal_(model.value_head.weight, std=0.5)
    torch.nn.init.normal_(model.value_head.bias, std=0.5)
    return model


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 64, (2, PROMPT_LEN + RESPONSE_LEN), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # row 1: prompt of 2 tokens, left-padded
    attention_mask[1, -1] = 0  # and a response of 4 tokens, right-padded
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return input_ids, attention_mask


def test_fresh_head_is_zero_and_output_is_float32():
    model = ValueModel.from_config(tiny_config())
    input_ids, attention_mask = batch()
    values = model(input_ids, attention_mask)
    assert values.shape == input_ids.shape and values.dtype == torch.float32
    assert torch.count_nonzero(values) == 0
    assert torch.count_nonzero(model.value_head.weight) == 0 and torch.count_nonzero(model.value_head.bias) == 0


def test_response_values_read_the_position_before_each_token():
    model = model_with_random_head()
    input_ids, attention_mask = batch()
    with torch.no_grad():
        full = model(input_ids, attention_mask)
        response = model.response_values(input_ids, attention_mask, RESPONSE_LEN)
    assert response.shape == (2, RESPONSE_LEN)
    torch.testing.assert_close(response, full[:, PROMPT_LEN - 1 : PROMPT_LEN + RESPONSE_LEN - 1])

    t = 2
    changed = input_ids.clone()
    changed[:, PROMPT_LEN + t] = (changed[:, PROMPT_LEN + t] + 7) % 61 + 3
    with torch.no_grad():
        after = model.response_values(changed, attention_mask, RESPONSE_LEN)
    # V(s_t) and everything before it is computed before token t exists ...
    torch.testing.assert_close(after[:, : t + 1], response[:, : t + 1])
    # ... while V(s_{t+1}) sees token t.
    assert bool(((after[:, t + 1] - response[:, t + 1]).abs() > 1e-6).all())


def test_left_padding_does_not_change_values():
    model = model_with_random_head(2)
    input_ids, attention_mask = batch(3)
    with torch.no_grad():
        padded_row = model(input_ids[1:], attention_mask[1:])[0]
        unpadded_row = model(input_ids[1:, 2:-1], attention_mask[1:, 2:-1])[0]
    torch.testing.assert_close(padded_row[2:-1], unpadded_row, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    model = model_with_random_head(4)
    model.save_pretrained(tmp_path / "critic")
    assert (tmp_path / "critic" / VALUE_HEAD_FILE).is_file()
    loaded = ValueModel.from_pretrained(tmp_path / "critic").eval()
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for name, tensor in original_state.items():
        assert torch.equal(tensor, loaded_state[name]), name
    input_ids, attention_mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.response_values(input_ids, attention_mask, RESPONSE_LEN),
            model.response_values(input_ids, attention_mask, RESPONSE_LEN),
        )


def test_from_causal_lm_checkpoint_keeps_backbone_and_zero_head(tmp_path):
    torch.manual_seed(5)
    causal_lm = AutoModelForCausalLM.from_config(tiny_config())
    causal_lm.save_pretrained(tmp_path / "policy")
    model = ValueModel.from_pretrained(tmp_path / "policy", torch_dtype=torch.bfloat16)
    assert model.backbone.dtype == torch.bfloat16
    for name, tensor in causal_lm.base_model.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor.to(torch.bfloat16)), name
    assert torch.count_nonzero(model.value_head.weight) == 0
    input_ids, attention_mask = batch()
    assert model(input_ids, attention_mask).dtype == torch.float32


def test_gradients_reach_head_and_backbone():
    model = model_with_random_head(6).train()
    input_ids, attention_mask = batch()
    model.response_values(input_ids, attention_mask, RESPONSE_LEN).sum().backward()
    assert model.value_head.weight.grad.abs().sum() > 0
    assert model.backbone.embed_tokens.weight.grad.abs().sum() > 0


def test_bad_input_is_rejected(tmp_path):
    model = ValueModel.from_config(tiny_config())
    input_ids, attention_mask = batch()
    with pytest.raises(ValueError, match="response_len"):
        model.response_values(input_ids, attention_mask, input_ids.shape[1])
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids, attention_mask[:, 1:])
    with pytest.raises(FileNotFoundError):
        ValueModel.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="Linear"):
        ValueModel(model.backbone, torch.nn.Linear(16, 1))


def test_a_critic_cut_to_n_layers_is_the_models_first_n_layers_and_saves_as_such(tmp_path):
    """model.critic_layers: the embeddings, the first N decoder layers and the final norm of the checkpoint; its
    hidden states are the full model's after layer N, normed (an independent forward of the full model)."""
    torch.manual_seed(6)
    causal_lm = AutoModelForCausalLM.from_config(tiny_config(layers=4)).eval()
    causal_lm.save_pretrained(tmp_path / "policy")

    critic = ValueModel.from_pretrained(tmp_path / "policy", num_layers=2).eval()
    assert len(critic.backbone.layers) == 2 and critic.config.num_hidden_layers == 2
    full = causal_lm.base_model.state_dict()
    kept = critic.backbone.state_dict()
    assert kept.keys() == {name for name in full if not name.startswith(("layers.2.", "layers.3."))}
    assert all(torch.equal(kept[name], full[name]) for name in kept)

    input_ids, attention_mask = batch()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        after_two = causal_lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                         output_hidden_states=True).hidden_states[2]
        expected = causal_lm.base_model.norm(after_two)
        torch.testing.assert_close(critic._hidden_states(input_ids, attention_mask), expected)

    # Saved, it is a 2-layer model: loading it needs no num_layers, and gives the same values.
    torch.nn.init.normal_(critic.value_head.weight, std=0.5)
    critic.save_pretrained(tmp_path / "critic")
    reloaded = ValueModel.from_pretrained(tmp_path / "critic").eval()
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids, attention_mask), critic(input_ids, attention_mask))

    # The same shape randomly initialised (benchmarks/critic_fit.py's control): 2 layers, every weight its own.
    random = ValueModel.from_config(tiny_config(layers=4), num_layers=2)
    assert len(random.backbone.layers) == 2 and random.config.num_hidden_layers == 2
    assert random.backbone.state_dict().keys() == kept.keys()
    assert not torch.equal(random.backbone.state_dict()["layers.0.mlp.up_proj.weight"], kept["layers.0.mlp.up_proj.weight"])
