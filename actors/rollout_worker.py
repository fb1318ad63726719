"""``RolloutWorker``: one vLLM engine that samples responses with their log-probs, scores them and takes new
weights from the learner (docs/architecture.md, "One training step", steps 1 and 6-7).

A plain class: the driver wraps it in an actor group (``rollout-0``, ...); tests can build it directly. A
one-device engine runs in this process, a tensor-parallel one in worker processes of its own; the weight-sync
receiving end lives with the model runner (``asyppo.weight_sync.receiver``), the sending end on the learner
(``asyppo.weight_sync.sender``).

Decisions worth knowing:

* **EOS is part of the response.** When a response ends because the policy sampled EOS, that token is kept in
  ``response_ids`` with mask 1 and its log-prob: it is an action the policy chose, so the loss must see it and the
  outcome reward sits on it (docs/algorithms.md §1: the last valid token). ``response_text`` has no EOS text.
* **Log-probs are the processed ones** (``logprobs_mode="processed_logprobs"``): those of the distribution that
  was actually sampled, i.e. after temperature. With ``top_p < 1`` they are renormalised over the nucleus, which
  is *not* what the learner recomputes from the full vocabulary (docs/algorithms.md §5); keep ``top_p = 1`` for
  training, as the presets do.
* **Seeds.** ``generate(seed=s, first_prompt=f)`` gives its prompt ``i`` its own seed drawn from ``(s, f + i)``, its
  position in the whole generation; vLLM gives sample ``j`` of a prompt that seed ``+ j``. The same call returns the
  same samples, however the generation is split over workers; no two prompts share seeds.
* **Padding** uses the tokenizer's pad id, or 0 when it has none (the driver pads with the same id).
* After new weights arrive the prefix cache is reset: cached KV blocks were computed by the old weights.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from asyppo.core.seeds import derive_seed
from asyppo.tasks.prompts import PromptFormat, encode_prompts
from asyppo.weight_sync.receiver import EXTENSION, EngineWeights


def prompt_seeds(seed: int, first_prompt: int, num_prompts: int) -> list[int]:
    """Independent 62-bit seeds for prompts ``first_prompt`` … of a generation (vLLM adds the sample index to each,
    so the spacing between prompts' seeds must be much larger than n). Keyed by the prompt's position in the whole
    generation, not by which worker samples it: any number of workers draws the same samples."""
    return [derive_seed(seed, "sample", first_prompt + i, bits=62) for i in range(num_prompts)]


@dataclass
class _Sample:
    """One sampled response as vLLM returned it."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    truncated: bool  # stopped by the length limit, not by EOS


def score_samples(
    reward_fn: Callable[..., Any], problems: list[dict], samples: list[_Sample], n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The score and the correctness of every sample (rows prompt-major), one ``reward_fn`` call per sample.

    ``reward_fn(prompt, response, answer, row, *, response_length, truncated)`` returns a ``(score, correct)`` pair
    (``asyppo.tasks.rewards.RewardFunction`` returns a ``Reward``, which is one). An error, or a score that is not a
    finite number, names the problem it happened on.
    """
    scores, correct = [], []
    for row, sample in enumerate(samples):
        problem = problems[row // n]
        try:
            score, accepted = reward_fn(problem["prompt"], sample.text, problem["answer"], problem.get("row", {}),
                                        response_length=len(sample.token_ids), truncated=sample.truncated)
        except Exception as exc:  # noqa: BLE001 - the user's reward function can raise anything
            raise ValueError(f"problem {problem['id']!r}: the reward function failed on the response "
                             f"{sample.text[:80]!r}: {type(exc).__name__}: {exc}") from exc
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"problem {problem['id']!r}: the reward function scored {score!r}, not a finite number")
        scores.append(float(score))
        correct.append(bool(accepted))
    return torch.tensor(scores, dtype=torch.float32), torch.tensor(correct, dtype=torch.bool)


def engine_executor(tensor_parallel_size: int) -> str:
    """vLLM's ``distributed_executor_backend`` for an engine in this process, with the environment it needs.

    An engine on one device runs inside this process (vLLM's engine core in-process, its one model runner beside
    it): no engine-core and worker processes to start (each imports vLLM again: about 16 s of a job's start on 2
    cores) or to outlive the actor when it is killed. A tensor-parallel engine has worker processes of its own (the
    mp executor), whether or not this runs inside Ray: the Ray executor would need a placement group of its own,
    while the driver already gives this actor its GPUs."""
    if tensor_parallel_size > 1:
        return "mp"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return "uni"


class RolloutWorker:
    """A vLLM engine for ``model_path`` (a Hugging Face directory with its tokenizer).

    ``reward_fn`` scores each response (:func:`score_samples`). ``prompt_format`` says how prompt texts become
    token ids: raw text by default, or the tokenizer's chat template (``asyppo.tasks.prompts``).
    ``cpu_kv_cache_gib`` sizes the KV cache of a CPU engine (the ``VLLM_CPU_KVCACHE_SPACE`` environment variable,
    if set, wins); ``gpu_memory_utilization`` is the share of GPU memory a GPU engine may take.
    """

    def __init__(
        self,
        model_path: str,
        *,
        reward_fn: Callable[..., Any],
        worker_index: int = 0,
        tensor_parallel_size: int = 1,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.5,
        cpu_kv_cache_gib: float = 1.0,
        enforce_eager: bool = True,
        prompt_format: PromptFormat = PromptFormat(),
    ):
        if not os.path.isdir(model_path):
            raise FileNotFoundError(f"rollout model directory {model_path!r} does not exist")
        if not callable(reward_fn):
            raise TypeError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if not cpu_kv_cache_gib > 0:
            raise ValueError(f"cpu_kv_cache_gib must be positive, got {cpu_kv_cache_gib}")
        from vllm import LLM
        from vllm.platforms import current_platform

        self.model_path = model_path
        self.reward_fn = reward_fn
        self.worker_index = worker_index
        self.prompt_format = prompt_format
        engine_args: dict[str, Any] = {}
        if current_platform.is_cpu():
            engine_args["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
        else:
            engine_args["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend=engine_executor(tensor_parallel_size),
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=EXTENSION,
            **engine_args,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = model_config.max_model_len
        self.vocab_size = model_config.get_vocab_size()
        self.weights = EngineWeights(self.llm, worker_index, tensor_parallel_size)

    # ---- sampling ----------------------------------------------------------------------------------------------

    def generate(
        self, problems: list[dict], *, n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int,
        first_prompt: int = 0,
    ) -> dict[str, Any]:
        """Sample ``n`` responses per problem and score them. Rows are prompt-major: prompt i has rows
        i·n … i·n+n−1. ``problems`` are the generation's prompts ``first_prompt`` … (their seeds:
        ``prompt_seeds``).

        Returns ``prompt_ids`` (list of token lists), ``response_ids`` (long [P·n, T], right-padded with the pad
        id), ``response_mask`` and ``rollout_logprobs`` (float [P·n, T], 0 on padding), ``scores`` (float [P·n]),
        ``correct`` and ``truncated`` (bool [P·n]; truncated = stopped by the length limit), ``response_text``,
        ``weight_version``, ``pid`` (this process: another one than before means Ray restarted the worker),
        ``num_generated_tokens``, ``generate_seconds`` (the engine's part).
        """
        from vllm import SamplingParams

        self.weights.require_valid()
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n and max_new_tokens must be >= 1, got n={n}, max_new_tokens={max_new_tokens}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy, for evaluation only), got {temperature}")
        if temperature == 0 and n != 1:
            raise ValueError(f"greedy decoding (temperature 0) gives one response per prompt, got n={n}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        prompt_ids = self._encode_prompts(problems)
        params = [
            SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
                           seed=prompt_seed)
            for prompt_seed in prompt_seeds(seed, first_prompt, len(problems))
        ]
        started = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        generate_seconds = time.perf_counter() - started

        samples = self._samples(problems, outputs, n)
        response_ids, response_mask, rollout_logprobs = self._pad(samples)
        scores, correct = score_samples(self.reward_fn, problems, samples, n)
        return {
            "prompt_ids": prompt_ids,
            "response_ids": response_ids,
            "response_mask": response_mask,
            "rollout_logprobs": rollout_logprobs,
            "scores": scores,
            "correct": correct,
            "truncated": torch.tensor([sample.truncated for sample in samples], dtype=torch.bool),
            "response_text": [sample.text for sample in samples],
            "weight_version": self.weights.version,
            "pid": os.getpid(),
            "num_generated_tokens": int(response_mask.sum().item()),
            "generate_seconds": generate_seconds,
        }

    def _encode_prompts(self, problems: list[dict]) -> list[list[int]]:
        """Token ids of each problem's prompt, checked to leave room for a response."""
        if not problems:
            raise ValueError("generate() got no problems")
        for position, problem in enumerate(problems):
            if not isinstance(problem, dict):
                raise TypeError(f"problem #{position} is a {type(problem).__name__}, not a dict")
            missing = [key for key in ("id", "prompt", "answer") if not isinstance(problem.get(key), str)]
            if missing:
                raise ValueError(f"problem #{position} ({problem.get('id')!r}): {missing} missing or not a string")
        prompt_ids = encode_prompts(self.tokenizer, [problem["prompt"] for problem in problems], self.prompt_format)
        for problem, ids in zip(problems, prompt_ids):
            if not ids:
                raise ValueError(f"problem {problem['id']!r}: the prompt tokenises to nothing")
            if len(ids) >= self.max_model_len:
                raise ValueError(
                    f"problem {problem['id']!r}: prompt of {len(ids)} tokens leaves no room in max_model_len "
                    f"{self.max_model_len}"
                )
        return prompt_ids

    @staticmethod
    def _samples(problems: list[dict], outputs, n: int) -> list[_Sample]:
        """vLLM's completions in row order (prompt-major, sample index within), each checked to be whole."""
        samples = []
        for problem, output in zip(problems, outputs):
            completions = sorted(output.outputs, key=lambda c: c.index)
            if len(completions) != n:
                raise RuntimeError(f"problem {problem['id']!r}: vLLM returned {len(completions)} samples, not {n}")
            for completion in completions:
                if completion.finish_reason not in ("stop", "length"):
                    raise RuntimeError(
                        f"problem {problem['id']!r}: sample ended with finish_reason={completion.finish_reason!r}"
                    )
                token_ids = list(completion.token_ids)
                if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
                    raise RuntimeError(f"problem {problem['id']!r}: vLLM returned no log-prob for some tokens")
                samples.append(_Sample(
                    token_ids=token_ids,
                    logprobs=[step[token].logprob for step, token in zip(completion.logprobs, token_ids)],
                    text=completion.text,
                    truncated=completion.finish_reason == "length",
                ))
        return samples

    def _pad(self, samples: list[_Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Response ids (right-padded with the pad id), response mask and sampled log-probs, ``[rows, T]`` each."""
        width = max(len(sample.token_ids) for sample in samples)
        # Padded Python lists turned into tensors once: a tensor per row costs more than the rest of this method.
        response_ids = torch.tensor([sample.token_ids + [self.pad_id] * (width - len(sample.token_ids))
                                     for sample in samples], dtype=torch.long)
        rollout_logprobs = torch.tensor([sample.logprobs + [0.0] * (width - len(sample.logprobs))
                                         for sample in samples], dtype=torch.float32)
        lengths = torch.tensor([len(sample.token_ids) for sample in samples])
        response_mask = (torch.arange(width)[None, :] < lengths[:, None]).to(torch.float32)
        return response_ids, response_mask, rollout_logprobs

    def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-prob (temperature 1, full vocabulary) of every token after the first of each sequence."""
        from vllm import SamplingParams

        self.weights.require_valid()
        for position, ids in enumerate(token_ids):
            if not ids:
                raise ValueError(f"prompt_logprobs: sequence #{position} is empty")
            bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
            if bad:
                raise ValueError(
                    f"prompt_logprobs: sequence #{position} has token ids outside the vocabulary: {bad[:5]}"
                )
            if len(ids) >= self.max_model_len:
                raise ValueError(f"prompt_logprobs: sequence #{position} is longer than max_model_len")
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in token_ids], params, use_tqdm=False)
        result = []
        for ids, output in zip(token_ids, outputs):
            steps = output.prompt_logprobs[1:]  # the first token has no log-prob
            result.append([step[token].logprob for step, token in zip(steps, ids[1:])])
        return result

    # ---- weights (the receiving half of asyppo.weight_sync) ---------------------------------------------------

    def init_weight_sync(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int, backend: str,
        timeout_s: float,
    ) -> None:
        """Join the learner's weight-sync group (every tensor-parallel rank; ranks rank_offset … +tp−1)."""
        self.weights.join(master_address, master_port, rank_offset, world_size, backend, timeout_s)

    def receive_weights(self, plan: dict, version: int) -> int:
        """Receive weight ``version`` as described by ``plan`` (the learner broadcasts the buckets meanwhile)."""
        return self.weights.receive(plan, version)

    def receive_weights_from_object_store(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """The simple path: the state dict came through Ray's object store (pass an ObjectRef); same checks."""
        return self.weights.load_state_dict(state_dict, version)

    def close_weight_sync(self) -> None:
        """Leave the weight-sync group (the learner is closing it)."""
        self.weights.leave()

    def weight_version(self) -> int:
        return self.weights.version

    def pid(self) -> int:
        """This actor's process id: a new one means Ray restarted the worker."""
        return os.getpid()

    def health(self) -> dict[str, Any]:
        """Process id, weight version, whether the weights are whole, whether the engine answers, and the longest
        sequence it takes."""
        states = self.weights.engine_states()
        return {
            "pid": os.getpid(),
            "worker_index": self.worker_index,
            "weight_version": self.weights.version,
            "weights_valid": self.weights.valid,
            "engine_alive": states is not None,
            "in_sync_group": bool(states) and all(s["sync_rank"] is not None for s in states),
            "max_model_len": self.max_model_len,
        }

    def shutdown(self) -> None:
        """Stop the engine and its processes (the actor can then be killed without leaving them behind)."""
        self.llm.llm_engine.engine_core.shutdown()
