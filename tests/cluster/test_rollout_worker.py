"""RolloutWorker on a real local Ray cluster with a real (CPU) vLLM engine, and the learner → rollout weight
broadcast from this test process acting as the learner's rank 0.

One engine is started for the whole module (about half a minute) and reused; the last test kills it.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("vllm")

from asyppo.actors.rollout_worker import RolloutWorker
from asyppo.weight_sync.protocol import (
    WeightPlanRejected,
    WeightSyncError,
    build_weight_plan,
    check_incoming_version,
    check_names_against_checkpoint,
    pack_bucket,
    probe_mismatch,
    unpack_bucket,
    validate_weight_plan,
)
from asyppo.weight_sync.sender import WeightBroadcaster

pytestmark = pytest.mark.cluster

TEMPERATURE = 0.8
PROBLEMS = [
    {"id": "p0", "prompt": "1+2=", "answer": "3"},
    {"id": "p1", "prompt": "3*4=", "answer": "12"},
    {"id": "p2", "prompt": "9-5=", "answer": "4"},
]


# ---- a tiny character-level Qwen2 --------------------------------------------------------------------------------


def build_char_tokenizer():
    from asyppo.tasks.tiny_models import char_tokenizer

    return char_tokenizer()


def build_tiny_qwen2(vocab_size: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # head_dim 32: the CPU attention kernels do not take 16.
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=1,
        pad_token_id=0, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def starts_with_answer(prompt: str, response: str, answer: str, row: dict, *, response_length: int,
                       truncated: bool) -> tuple[float, bool]:
    """Test reward: 1 (correct) when the response begins with the answer, else 0."""
    return (1.0, True) if response.startswith(answer) else (0.0, False)


# ---- independent references --------------------------------------------------------------------------------------


def reference_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> list[float]:
    """log π(response_k | prompt, response_<k) at ``temperature``, one position at a time, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    values = []
    for k, token in enumerate(response):
        scaled = logits[len(prompt) + k - 1] / temperature
        values.append(float(scaled[token] - torch.logsumexp(scaled, dim=0)))
    return values


def reference_sequence_logprobs(model, ids: list[int]) -> list[float]:
    return reference_logprobs(model, ids[:1], ids[1:], 1.0)


def valid_row(batch: dict, row: int) -> tuple[list[int], list[float]]:
    length = int(batch["response_mask"][row].sum().item())
    return batch["response_ids"][row, :length].tolist(), batch["rollout_logprobs"][row, :length].tolist()


# ---- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("rollout") / "policy"
    build_tiny_qwen2(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def policy_a(model_dir):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def policy_b(tokenizer):
    return build_tiny_qwen2(len(tokenizer), seed=1)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    # The test reward lives in this module, which the actor cannot import; ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def worker(ray_cluster, model_dir):
    handle = ray.remote(RolloutWorker).options(name="rollout-0", num_cpus=1, max_restarts=0).remote(
        model_dir, reward_fn=starts_with_answer, seed=0, max_model_len=256, cpu_kv_cache_gib=1.0,
    )
    health = ray.get(handle.health.remote(), timeout=300)
    assert health["engine_alive"] and health["weight_version"] == 0
    yield handle


@pytest.fixture(scope="module")
def broadcaster():
    sender = WeightBroadcaster("gloo", timeout_s=30.0, bucket_mb=0.02)
    yield sender
    sender.close()


# ---- wire format (plain torch) -----------------------------------------------------------------------------------


def test_plan_buckets_respect_size_and_roundtrip():
    tensors = {"a": torch.randn(10, 3), "b": torch.randn(50), "c": torch.randn(2, 2, 2), "d": torch.randn(7)}
    plan = build_weight_plan([(n, t.shape) for n, t in tensors.items()], torch.float32, bucket_bytes=4 * 40, version=5)
    validate_weight_plan(plan)
    # Greedy in order: a (30) | b (50, alone: over 40) | c (8) + d (7)
    assert [[e["name"] for e in b["tensors"]] for b in plan["buckets"]] == [["a"], ["b"], ["c", "d"]]
    assert plan["version"] == 5 and plan["total_numel"] == 30 + 50 + 8 + 7
    for bucket in plan["buckets"]:
        flat = pack_bucket(bucket, tensors, torch.float32, "cpu")
        for name, view in unpack_bucket(flat, bucket):
            assert torch.equal(view, tensors[name])


def test_malformed_plan_and_wrong_versions_rejected():
    plan = build_weight_plan([("x", [4]), ("y", [2, 3])], "bfloat16", bucket_bytes=1 << 20, version=3)
    plan["buckets"][0]["tensors"][1]["offset"] += 1
    with pytest.raises(ValueError, match="offset"):
        validate_weight_plan(plan)
    with pytest.raises(ValueError, match="not one of"):
        build_weight_plan([("x", [4])], torch.int64, bucket_bytes=64, version=1)
    with pytest.raises(WeightPlanRejected, match="stamped v3 but was announced as v4"):
        check_incoming_version(3, 4, current_version=1)
    with pytest.raises(WeightPlanRejected, match="stale weight version v2"):
        check_incoming_version(2, 2, current_version=2)
    check_incoming_version(3, 3, current_version=2)
    with pytest.raises(WeightPlanRejected, match="1 unknown"):
        check_names_against_checkpoint({"module.w": [2]}, {"w": [2]})
    with pytest.raises(WeightPlanRejected, match="other shapes"):
        check_names_against_checkpoint({"w": [3]}, {"w": [2]})


# ---- generation --------------------------------------------------------------------------------------------------


def test_weight_check_fails_on_a_gap_above_tolerance_or_a_nan():
    learner = [[-1.0, -2.0], [-0.5]]
    close = [[-1.0005, -2.0], [-0.5]]
    assert probe_mismatch(learner, [learner, close], tolerance=1e-3) == pytest.approx(0.0005 / 3)
    with pytest.raises(WeightSyncError, match="rollout-1 .* above weight_sync.check_tolerance=0.0001"):
        probe_mismatch(learner, [learner, close], tolerance=1e-4)
    with pytest.raises(WeightSyncError, match="rollout-0 .* nan"):
        probe_mismatch(learner, [[[float("nan"), -2.0], [-0.5]]], tolerance=1e-3)
    with pytest.raises(WeightSyncError, match="rollout-0 .* nan"):
        probe_mismatch([[float("nan"), -2.0], [-0.5]], [learner], tolerance=1e-3)


def test_generate_shapes_scores_and_layout(worker, tokenizer):
    n, max_new = 4, 12
    out = ray.get(worker.generate.remote(PROBLEMS, n=n, max_new_tokens=max_new, temperature=TEMPERATURE,
                                         top_p=1.0, seed=7))
    rows = len(PROBLEMS) * n
    assert out["prompt_ids"] == [tokenizer.encode(p["prompt"]) for p in PROBLEMS]
    ids, mask, logp = out["response_ids"], out["response_mask"], out["rollout_logprobs"]
    assert ids.dtype == torch.long and mask.dtype == torch.float32 and logp.dtype == torch.float32
    lengths = mask.sum(dim=1).long()
    assert ids.shape == mask.shape == logp.shape == (rows, int(lengths.max()))
    assert out["scores"].shape == out["truncated"].shape == out["correct"].shape == (rows,)
    assert len(out["response_text"]) == rows
    assert out["weight_version"] == 0 and out["num_generated_tokens"] == int(lengths.sum())
    assert out["generate_seconds"] > 0
    for row in range(rows):
        length = int(lengths[row])
        assert 1 <= length <= max_new
        assert torch.all(mask[row, :length] == 1) and torch.all(mask[row, length:] == 0)  # right padding
        assert torch.all(ids[row, length:] == tokenizer.pad_token_id)
        assert torch.all(logp[row, length:] == 0)
        valid = logp[row, :length]
        assert torch.all(torch.isfinite(valid)) and torch.all(valid <= 0)
        tokens = ids[row, :length].tolist()
        ended_by_eos = tokens[-1] == tokenizer.eos_token_id
        assert bool(out["truncated"][row]) == (not ended_by_eos)
        assert ended_by_eos or length == max_new
        assert tokenizer.eos_token_id not in tokens[:-1]
        assert out["response_text"][row] == tokenizer.decode(tokens, skip_special_tokens=True)
        answer = PROBLEMS[row // n]["answer"]
        expected_score = 1.0 if out["response_text"][row][: len(answer)] == answer else 0.0
        assert out["scores"][row].item() == expected_score
        assert bool(out["correct"][row]) == (expected_score > 0)


def test_rollout_logprobs_match_hf_model_at_temperature(worker, policy_a):
    n = 3
    out = ray.get(worker.generate.remote(PROBLEMS, n=n, max_new_tokens=16, temperature=TEMPERATURE, top_p=1.0,
                                         seed=11))
    for row in range(len(PROBLEMS) * n):
        tokens, logps = valid_row(out, row)
        expected = reference_logprobs(policy_a, out["prompt_ids"][row // n], tokens, TEMPERATURE)
        assert logps == pytest.approx(expected, abs=2e-4), f"row {row}"


def test_greedy_decoding_follows_the_argmax_of_the_hf_model(worker, policy_a):
    out = ray.get(worker.generate.remote(PROBLEMS, n=1, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0))
    for row in range(len(PROBLEMS)):
        tokens, _ = valid_row(out, row)
        context = list(out["prompt_ids"][row])
        expected = []
        with torch.no_grad():
            while len(expected) < len(tokens):
                token = int(policy_a(torch.tensor([context])).logits[0, -1].argmax())
                expected.append(token)
                context.append(token)
        assert tokens == expected, f"row {row}"
    with pytest.raises(ray.exceptions.RayTaskError, match="greedy decoding .* one response per prompt"):
        ray.get(worker.generate.remote(PROBLEMS, n=2, max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0))


def test_seeds_reproduce_and_prompts_do_not_share_samples(worker):
    same_prompt = [{"id": "a", "prompt": "2+2=", "answer": "4"}, {"id": "b", "prompt": "2+2=", "answer": "4"}]
    kwargs = {"n": 3, "max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0}
    first = ray.get(worker.generate.remote(same_prompt, seed=3, **kwargs))
    again = ray.get(worker.generate.remote(same_prompt, seed=3, **kwargs))
    other = ray.get(worker.generate.remote(same_prompt, seed=4, **kwargs))
    assert torch.equal(first["response_ids"], again["response_ids"])
    assert not torch.equal(first["response_ids"], other["response_ids"])
    # Identical prompts at two positions must not get identical samples (each prompt has its own seed).
    assert first["response_text"][:3] != first["response_text"][3:]


def test_bad_problem_is_a_clear_error(worker):
    with pytest.raises(ray.exceptions.RayTaskError, match=r"problem #0 \('q'\).*'answer'"):
        ray.get(worker.generate.remote([{"id": "q", "prompt": "1+1="}], n=1, max_new_tokens=2, temperature=1.0,
                                       top_p=1.0, seed=0))


# ---- weight sync -------------------------------------------------------------------------------------------------


def test_peer_that_never_joins_fails_within_timeout(worker):
    sender = WeightBroadcaster("gloo", timeout_s=4.0, bucket_mb=1.0)
    started = time.monotonic()
    # The worker runs one vLLM process; claiming two leaves rank 2 of the world empty.
    with pytest.raises(WeightSyncError, match="forming the weight-sync group"):
        sender.setup([worker], tensor_parallel_size=2)
    assert time.monotonic() - started < 4.0 + 10.0
    # The worker's own attempt times out too, with an error rather than a hang.
    assert ray.get(worker.health.remote(), timeout=60)["engine_alive"]


def test_broadcast_loads_learner_weights(worker, broadcaster, policy_a, policy_b, tokenizer):
    probe = [tokenizer.encode("12+34=46"), tokenizer.encode("7*8=56 ok")]
    broadcaster.setup([worker], tensor_parallel_size=1)
    before = ray.get(worker.prompt_logprobs.remote(probe))
    for seq, got in zip(probe, before):
        assert got == pytest.approx(reference_sequence_logprobs(policy_a, seq), abs=2e-4)
    # A long prompt fills whole KV blocks, which the prefix cache keeps: after the update they must not be reused.
    long_problem = [{"id": "long", "prompt": ("1+2=3 " * 40)[:230], "answer": "3"}]
    ray.get(worker.generate.remote(long_problem, n=1, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0))

    stats = broadcaster.broadcast(policy_b.named_parameters(), version=1, dtype=torch.float32)

    expected_bytes = 4 * sum(p.numel() for p in policy_b.parameters())
    assert stats["bytes"] == expected_bytes and stats["num_buckets"] >= 3
    assert stats["seconds"] > 0 and stats["gb_per_s"] == pytest.approx(expected_bytes / 1e9 / stats["seconds"])
    assert ray.get(worker.weight_version.remote()) == 1
    after = ray.get(worker.prompt_logprobs.remote(probe))
    for seq, old, new in zip(probe, before, after):
        assert new == pytest.approx(reference_sequence_logprobs(policy_b, seq), abs=2e-4)
        assert max(abs(a - b) for a, b in zip(old, new)) > 1e-2
    out = ray.get(worker.generate.remote(long_problem, n=2, max_new_tokens=6, temperature=TEMPERATURE, top_p=1.0,
                                         seed=1))
    assert out["weight_version"] == 1
    for row in range(2):
        tokens, logps = valid_row(out, row)
        assert logps == pytest.approx(reference_logprobs(policy_b, out["prompt_ids"][0], tokens, TEMPERATURE), abs=2e-4)


def test_stale_version_and_foreign_names_rejected_group_survives(worker, broadcaster, policy_a, policy_b, tokenizer):
    probe = [tokenizer.encode("5+5=10")]
    expected_b = reference_sequence_logprobs(policy_b, probe[0])
    for stale in (1, 0):
        with pytest.raises(WeightPlanRejected, match=f"stale weight version v{stale}.*holds v1"):
            broadcaster.broadcast(policy_a.named_parameters(), version=stale, dtype=torch.float32)
    wrapped = (("module." + name, p) for name, p in policy_a.named_parameters())
    with pytest.raises(WeightPlanRejected, match="unknown"):
        broadcaster.broadcast(wrapped, version=2, dtype=torch.float32)
    assert ray.get(worker.weight_version.remote()) == 1
    assert ray.get(worker.prompt_logprobs.remote(probe))[0] == pytest.approx(expected_b, abs=2e-4)
    # Nothing moved and the group is intact: the next valid version goes through.
    broadcaster.broadcast(policy_a.named_parameters(), version=2, dtype=torch.float32)
    assert ray.get(worker.weight_version.remote()) == 2
    expected_a = reference_sequence_logprobs(policy_a, probe[0])
    assert ray.get(worker.prompt_logprobs.remote(probe))[0] == pytest.approx(expected_a, abs=2e-4)


def test_killed_worker_mid_broadcast_raises_within_timeout(worker, broadcaster, policy_b):
    # Keep the worker busy so the broadcast is under way (plan sent, learner in the handshake) when it dies.
    busy = [{"id": f"b{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(256)]
    generating = worker.generate.remote(busy, n=16, max_new_tokens=200, temperature=1.0, top_p=1.0, seed=0)
    outcome: dict = {}

    def learner():
        started = time.monotonic()
        try:
            broadcaster.broadcast(policy_b.named_parameters(), version=3, dtype=torch.float32)
        except Exception as err:  # noqa: BLE001 - recorded for the assertions below
            outcome["error"] = err
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=learner)
    thread.start()
    time.sleep(1.0)
    assert not ray.wait([generating], timeout=0)[0], "the worker finished generating too early to test this"
    ray.kill(worker, no_restart=True)
    thread.join(timeout=broadcaster.timeout_s + 30)
    assert not thread.is_alive(), "the broadcast hung after the worker died"
    assert isinstance(outcome.get("error"), WeightSyncError)
    assert "rollout worker #0" in str(outcome["error"])
    assert outcome["seconds"] < broadcaster.timeout_s
    with pytest.raises(WeightSyncError, match="broken"):
        broadcaster.broadcast(policy_b.named_parameters(), version=4, dtype=torch.float32)
