"""Built-in tokenizer, tiny model configs, the deterministic cached warm-up.

Most tests use a cheap recipe (a few steps of a 1-layer model); ``default_models`` builds the real default
recipe once for this module (about 30-60 s on 2 CPU cores) and checks that it lands in the target band.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from asyppo.tasks.tiny_models import (
    ARITHMETIC_ALPHABET,
    WarmupRecipe,
    char_tokenizer,
    ensure_builtin_models,
    expected_accuracy,
    sampled_accuracy,
    tiny_critic_config,
    tiny_policy_config,
)
from asyppo.tasks.arithmetic import arithmetic_problems
from asyppo.tasks.chain import chain_problems, chain_solution

CHEAP = WarmupRecipe(
    policy_hidden_size=32,
    policy_layers=1,
    critic_hidden_size=32,
    critic_layers=1,
    batch_size=32,
    lr_warmup_steps=5,
    max_steps=20,
    eval_every=10,
    eval_size=64,
    eval_samples_per_problem=1,
    critic_steps=3,
)


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_one_token_per_character() -> None:
    tokenizer = char_tokenizer()
    ids = tokenizer.encode("12+34=", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == list("12+34=")
    assert len(set(ids)) == 6
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<eos>"
    assert tokenizer.bos_token is None
    assert len({tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 3
    assert tokenizer.encode("1?2", add_special_tokens=False)[1] == tokenizer.unk_token_id


@given(st.text(alphabet=ARITHMETIC_ALPHABET, max_size=30))
@settings(max_examples=100, deadline=None)
def test_tokenizer_decodes_back_to_the_plain_text(text: str) -> None:
    tokenizer = char_tokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_tokenizer_saves_and_loads_with_auto_tokenizer(tmp_path: Path) -> None:
    original = char_tokenizer()
    original.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "98+7=105"
    assert loaded.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    assert (loaded.eos_token_id, loaded.pad_token_id) == (original.eos_token_id, original.pad_token_id)
    assert len(loaded) == len(original)


def test_configs_critic_smaller_than_policy_with_a_vllm_cpu_head_size() -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    vocab_size = len(char_tokenizer())
    policy, critic = tiny_policy_config(vocab_size), tiny_critic_config(vocab_size)
    policy_size = sum(p.numel() for p in AutoModelForCausalLM.from_config(policy).parameters())
    critic_size = sum(p.numel() for p in AutoModelForCausalLM.from_config(critic).parameters())
    assert critic_size < policy_size
    for config in (policy, critic):
        assert config.model_type == "qwen2" and config.vocab_size == vocab_size
        head_dim = config.hidden_size // config.num_attention_heads
        assert head_dim in CPUAttentionBackend.get_supported_head_sizes()
    with pytest.raises(ValueError, match="multiple of the head size"):
        tiny_policy_config(vocab_size, hidden_size=48)


# ------------------------------------------------------------------------------------------- cheap recipe


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def test_warmup_is_deterministic(tmp_path: Path) -> None:
    first = ensure_builtin_models(tmp_path / "a", recipe=CHEAP, log=_quiet)
    second = ensure_builtin_models(tmp_path / "b", recipe=CHEAP, log=_quiet)
    assert not first.from_cache and not second.from_cache
    for name in ("policy_dir", "critic_dir"):
        left, right = _weights(getattr(first, name)), _weights(getattr(second, name))
        assert left.keys() == right.keys()
        assert all(torch.equal(left[key], right[key]) for key in left)
    assert first.base_accuracy == second.base_accuracy
    assert first.warmup["history"] == second.warmup["history"]

    other_seed = ensure_builtin_models(tmp_path / "c", recipe=CHEAP, seed=1, log=_quiet)
    assert not torch.equal(
        _weights(first.policy_dir)["model.embed_tokens.weight"],
        _weights(other_seed.policy_dir)["model.embed_tokens.weight"],
    )


def test_chain_recipe_warms_up_on_written_chains(tmp_path: Path) -> None:
    recipe = dataclasses.replace(CHEAP, task="chain")
    built = ensure_builtin_models(tmp_path, recipe=recipe, log=_quiet)
    assert built.policy_dir.parent.name.startswith("chain-")
    tokenizer = AutoTokenizer.from_pretrained(built.policy_dir)
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("1+2=3;3+4=7", add_special_tokens=False)) == list(
        "1+2=3;3+4=7")
    heldout = built.heldout_problems()
    assert heldout == chain_problems(recipe.eval_size, split="eval", seed=0)
    # The warm-up's last evaluation is the probability of the written-out chain, not of the bare answer.
    model = AutoModelForCausalLM.from_pretrained(built.policy_dir).eval()
    on_chains = expected_accuracy(model, tokenizer, heldout, target=lambda p: chain_solution(p.prompt))
    assert built.warmup["history"][-1][1] == pytest.approx(on_chains, abs=1e-4)
    assert built.recipe["max_response_tokens"] == 43


def test_cache_hit_returns_same_dirs_without_training(tmp_path: Path) -> None:
    built = ensure_builtin_models(tmp_path, recipe=CHEAP, log=_quiet)
    weights_file = built.policy_dir / "model.safetensors"
    stamp = weights_file.stat().st_mtime_ns
    messages: list[str] = []
    cached = ensure_builtin_models(tmp_path, recipe=CHEAP, log=messages.append)
    assert cached.from_cache
    assert (cached.policy_dir, cached.critic_dir) == (built.policy_dir, built.critic_dir)
    assert cached.base_accuracy == built.base_accuracy
    assert cached.recipe == built.recipe and cached.warmup == built.warmup
    assert weights_file.stat().st_mtime_ns == stamp
    assert len(messages) == 1 and "using cached" in messages[0]
    # a different recipe is a different entry
    other = ensure_builtin_models(tmp_path, recipe=WarmupRecipe(**{**CHEAP.__dict__, "critic_steps": 2}), log=_quiet)
    assert not other.from_cache and other.policy_dir != built.policy_dir


def test_cache_entry_is_a_normal_hf_model_dir(tmp_path: Path) -> None:
    built = ensure_builtin_models(tmp_path, recipe=CHEAP, log=_quiet)
    for directory in (built.policy_dir, built.critic_dir):
        names = {path.name for path in directory.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert model.config.eos_token_id == tokenizer.eos_token_id
    # nothing but the entry and its lock file is left in the cache directory
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [built.policy_dir.parent.name, built.policy_dir.parent.name + ".lock"]
    )


def test_concurrent_callers_build_once(tmp_path: Path) -> None:
    results = []

    def call() -> None:
        results.append(ensure_builtin_models(tmp_path, recipe=CHEAP, log=_quiet))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2
    assert sorted(result.from_cache for result in results) == [False, True]
    assert results[0].policy_dir == results[1].policy_dir


def test_a_crash_mid_build_leaves_no_cache_entry(tmp_path: Path) -> None:
    class Crash(Exception):
        pass

    def crash_after_policy(message: str) -> None:
        if "critic" in message:
            raise Crash

    with pytest.raises(Crash):
        ensure_builtin_models(tmp_path, recipe=CHEAP, log=crash_after_policy)
    assert [path.name for path in tmp_path.iterdir() if not path.name.endswith(".lock")] == []
    rebuilt = ensure_builtin_models(tmp_path, recipe=CHEAP, log=_quiet)
    assert not rebuilt.from_cache and rebuilt.policy_dir.is_dir()


def test_bad_recipe_and_seed_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="target_low <= stop_at <= target_high"):
        WarmupRecipe(stop_at=0.9)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        ensure_builtin_models(tmp_path, seed=-1, log=_quiet)


# ------------------------------------------------------------------------------------------- default recipe


@pytest.fixture(scope="module")
def default_models():
    """The built-in models every default job uses, from the user cache: built here by the default recipe when they
    are missing (a fresh machine), else the cached entry of that same recipe (its hash is the cache key)."""
    return ensure_builtin_models(log=_quiet)


def _reference_sampled_accuracy(model, tokenizer, problems, samples_per_problem: int, seed: int) -> float:
    """Independent ancestral sampling: no padding (problems grouped by prompt length), no KV cache, and an
    exact string comparison with the canonical answer."""
    generator = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    correct = total = 0
    by_length: dict[int, list] = {}
    for problem in problems:
        by_length.setdefault(len(problem.prompt), []).append(problem)
    with torch.no_grad():
        for group in by_length.values():
            group = [problem for problem in group for _ in range(samples_per_problem)]
            sequences = torch.tensor([tokenizer.encode(p.prompt, add_special_tokens=False) for p in group])
            prompt_length = sequences.shape[1]
            for _ in range(4):
                probabilities = torch.softmax(model(input_ids=sequences).logits[:, -1].float(), dim=-1)
                sequences = torch.cat([sequences, torch.multinomial(probabilities, 1, generator=generator)], dim=1)
            for problem, row in zip(group, sequences[:, prompt_length:].tolist()):
                text = ""
                for token in row:
                    if token == eos:
                        break
                    text += tokenizer.convert_ids_to_tokens(token)
                else:
                    text = None  # no EOS within the limit: cannot equal the answer
                correct += text == problem.answer
                total += 1
    return correct / total


def test_default_recipe_lands_in_the_target_band(default_models) -> None:
    recipe = default_models.recipe
    assert recipe["target_low"] <= default_models.base_accuracy <= recipe["target_high"]
    assert default_models.warmup["stop_reason"] == "stop_at"
    assert default_models.warmup["policy_steps"] < recipe["max_steps"]
    assert default_models.warmup["critic_parameters"] < default_models.warmup["policy_parameters"]

    model = AutoModelForCausalLM.from_pretrained(default_models.policy_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_models.policy_dir)
    heldout = default_models.heldout_problems()
    assert heldout == arithmetic_problems(recipe["eval_size"], split="eval", seed=recipe["seed"])
    measured = _reference_sampled_accuracy(model, tokenizer, heldout, samples_per_problem=2, seed=123)
    # base_accuracy: 2048 samples, this: 1024; 0.07 is about four standard deviations of the difference.
    assert abs(measured - default_models.base_accuracy) < 0.07


def test_expected_accuracy_is_the_probability_of_the_exact_answer(default_models) -> None:
    model = AutoModelForCausalLM.from_pretrained(default_models.policy_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_models.policy_dir)
    problems = default_models.heldout_problems()[:40]
    reference = 0.0
    with torch.no_grad():
        for problem in problems:  # chain rule, one unpadded sequence and one token at a time
            context = tokenizer.encode(problem.prompt, add_special_tokens=False)
            probability = 1.0
            for token in tokenizer.encode(problem.answer, add_special_tokens=False) + [tokenizer.eos_token_id]:
                logits = model(input_ids=torch.tensor([context])).logits[0, -1].double()
                probability *= torch.softmax(logits, dim=-1)[token].item()
                context.append(token)
            reference += probability
    assert expected_accuracy(model, tokenizer, problems, batch_size=16) == pytest.approx(reference / 40, abs=1e-5)


def test_sampled_accuracy_is_seeded_and_leaves_the_global_rng_alone(default_models) -> None:
    model = AutoModelForCausalLM.from_pretrained(default_models.policy_dir)
    tokenizer = AutoTokenizer.from_pretrained(default_models.policy_dir)
    problems = default_models.heldout_problems()[:128]
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    first = sampled_accuracy(model, tokenizer, problems, seed=1, max_new_tokens=4)
    after = torch.rand(3)
    assert torch.equal(before, after)
    assert sampled_accuracy(model, tokenizer, problems, seed=1, max_new_tokens=4) == first
