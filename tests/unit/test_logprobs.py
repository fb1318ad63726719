"""Chunked log-probs / entropies equal the naive full-vocabulary computation (docs/algorithms.md §5)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

from asyppo.core.logprobs import logprobs_and_entropy, response_logprobs

NUM_ROWS, LENGTH, HIDDEN, VOCAB = 3, 5, 16, 37


def naive_logprobs_and_entropy(hidden, lm_head, tokens, temperature):
    """Materialises the full [N, T, vocab] logits; entropy as −Σ p·log p."""
    logits = lm_head(hidden).float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def make_inputs(seed: int):
    torch.manual_seed(seed)
    lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=True)
    hidden = torch.randn(NUM_ROWS, LENGTH, HIDDEN, requires_grad=True)
    tokens = torch.randint(0, VOCAB, (NUM_ROWS, LENGTH))
    return hidden, lm_head, tokens


def grads_of(outputs_fn, hidden, lm_head, weights):
    hidden.grad = None
    lm_head.zero_grad(set_to_none=True)
    total = sum((w * out).sum() for w, out in zip(weights, outputs_fn()) if w is not None)
    total.backward()
    return hidden.grad.clone(), lm_head.weight.grad.clone(), lm_head.bias.grad.clone()


@pytest.mark.parametrize("chunk_size", [1, 4, 7, NUM_ROWS * LENGTH, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_equals_naive_values_and_logp_grads(chunk_size, temperature):
    hidden, lm_head, tokens = make_inputs(0)
    logp, entropy = logprobs_and_entropy(hidden, lm_head, tokens, temperature=temperature, chunk_size=chunk_size)
    expected_logp, expected_entropy = naive_logprobs_and_entropy(hidden, lm_head, tokens, temperature)
    torch.testing.assert_close(logp, expected_logp)
    torch.testing.assert_close(entropy, expected_entropy)
    assert logp.dtype == torch.float32 and logp.requires_grad
    assert not entropy.requires_grad  # ERC needs no graph through H

    weights = (torch.randn(NUM_ROWS, LENGTH, generator=torch.Generator().manual_seed(1)), None)
    chunked = grads_of(
        lambda: logprobs_and_entropy(hidden, lm_head, tokens, temperature=temperature, chunk_size=chunk_size),
        hidden, lm_head, weights,
    )
    naive = grads_of(lambda: naive_logprobs_and_entropy(hidden, lm_head, tokens, temperature), hidden, lm_head, weights)
    for got, want in zip(chunked, naive):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("chunk_size", [2, 6])
def test_entropy_gradient_when_requested(chunk_size):
    hidden, lm_head, tokens = make_inputs(2)
    generator = torch.Generator().manual_seed(3)
    weights = (torch.randn(NUM_ROWS, LENGTH, generator=generator), torch.randn(NUM_ROWS, LENGTH, generator=generator))
    chunked = grads_of(
        lambda: logprobs_and_entropy(
            hidden, lm_head, tokens, temperature=0.8, chunk_size=chunk_size, entropy_requires_grad=True
        ),
        hidden, lm_head, weights,
    )
    naive = grads_of(lambda: naive_logprobs_and_entropy(hidden, lm_head, tokens, 0.8), hidden, lm_head, weights)
    for got, want in zip(chunked, naive):
        torch.testing.assert_close(got, want)


def test_backward_keeps_no_full_logits():
    """Checkpointing means autograd saves only each chunk's inputs, never [chunk, vocab] or bigger logits."""
    hidden, lm_head, tokens = make_inputs(4)
    saved_sizes: list[int] = []

    def record(tensor):
        saved_sizes.append(tensor.numel())
        return tensor

    chunk_size = 4
    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        logp, _ = logprobs_and_entropy(hidden, lm_head, tokens, chunk_size=chunk_size)
    assert saved_sizes and max(saved_sizes) < chunk_size * VOCAB
    logp.sum().backward()  # the recomputation path works
    assert hidden.grad is not None

    saved_sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        naive_logprobs_and_entropy(hidden, lm_head, tokens, 1.0)
    assert max(saved_sizes) >= NUM_ROWS * LENGTH * VOCAB  # the hook does see full logits when they are saved


def test_no_grad_mode_and_without_entropy():
    hidden, lm_head, tokens = make_inputs(5)
    with torch.no_grad():
        logp, entropy = logprobs_and_entropy(hidden, lm_head, tokens, chunk_size=4, with_entropy=False)
    assert entropy is None and not logp.requires_grad
    torch.testing.assert_close(logp, naive_logprobs_and_entropy(hidden, lm_head, tokens, 1.0)[0])


def test_bad_input_is_rejected():
    hidden, lm_head, tokens = make_inputs(6)
    with pytest.raises(ValueError, match="tokens"):
        logprobs_and_entropy(hidden, lm_head, tokens[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy(hidden, lm_head, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        logprobs_and_entropy(hidden, lm_head, tokens, chunk_size=0)
    with pytest.raises(TypeError, match="integer"):
        logprobs_and_entropy(hidden, lm_head, tokens.float())


def tiny_qwen2():
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config)


def tiny_gpt2():
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config)


def left_padded_batch(seed: int, prompt_len: int = 4, response_len: int = 5):
    """Prompt left-padded to prompt_len, response right-padded to response_len (project batch layout)."""
    generator = torch.Generator().manual_seed(seed)
    prompt_lengths, response_lengths = [4, 2, 3], [5, 3, 1]
    input_ids = torch.randint(3, 64, (3, prompt_len + response_len), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        attention_mask[row, prompt_len - p : prompt_len + r] = 1
    input_ids = torch.where(attention_mask.bool(), input_ids, torch.zeros_like(input_ids))
    return input_ids, attention_mask, response_len


@pytest.mark.parametrize("build_model", [tiny_qwen2, tiny_gpt2], ids=["qwen2", "gpt2"])
def test_response_logprobs_matches_full_model_forward(build_model):
    torch.manual_seed(7)
    model = build_model().eval()
    input_ids, attention_mask, response_len = left_padded_batch(8)
    prompt_len = input_ids.shape[1] - response_len
    temperature = 0.7
    logp, entropy = response_logprobs(
        model, input_ids, attention_mask, response_len, temperature=temperature, chunk_size=4
    )
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.float()
    mask = attention_mask[:, prompt_len:].bool()
    for row in range(input_ids.shape[0]):
        for t in range(response_len):
            if not mask[row, t]:
                continue
            scaled = logits[row, prompt_len + t - 1] / temperature  # the position before token t predicts it
            token = input_ids[row, prompt_len + t]
            expected_logp = torch.log_softmax(scaled, -1)[token]
            expected_entropy = torch.distributions.Categorical(logits=scaled).entropy()
            torch.testing.assert_close(logp[row, t], expected_logp, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entropy[row, t], expected_entropy, atol=1e-5, rtol=1e-5)
    (logp * mask).sum().backward()
    assert model.get_output_embeddings().weight.grad is not None


def test_response_logprobs_rejects_bad_lengths():
    model = tiny_qwen2()
    input_ids, attention_mask, _ = left_padded_batch(9)
    with pytest.raises(ValueError, match="response_len"):
        response_logprobs(model, input_ids, attention_mask, input_ids.shape[1])
    with pytest.raises(ValueError, match="attention_mask"):
        response_logprobs(model, input_ids, attention_mask[:, 1:], 3)
