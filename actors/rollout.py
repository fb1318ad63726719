"""``RolloutWorker``: one vLLM engine that samples responses with their log-probs, scores them and takes new
weights from the learner (ARCHITECTURE.md "One training step", steps 1-2 and 7).

A plain class: the driver wraps it with ``ray.remote(RolloutWorker).options(name="rollout-0", ...)``; tests can
build it directly. vLLM runs its engine core and workers in child processes of this one; the weight-sync
receiving end lives there (``actors/vllm_extension.py``), the sending end in ``learner/weight_sync.py``.

Decisions worth knowing:

* **EOS is part of the response.** When a response ends because the policy sampled EOS, that token is kept in
  ``response_ids`` with mask 1 and its log-prob: it is an action the policy chose, so the loss must see it and the
  outcome reward sits on it (ALGORITHMS.md §1: the last valid token). ``response_text`` has no EOS text.
* **Log-probs are the processed ones** (``logprobs_mode="processed_logprobs"``): those of the distribution that
  was actually sampled, i.e. after temperature. With ``top_p < 1`` they are renormalised over the nucleus, which
  is *not* what the learner recomputes from the full vocabulary (ALGORITHMS.md §5); keep ``top_p = 1`` for
  training, as the presets do.
* **Seeds.** ``generate(seed=s)`` gives prompt ``i`` its own seed drawn from ``(s, worker_index, i)``; vLLM gives
  sample ``j`` of a prompt that seed ``+ j``. The same call returns the same samples; no two prompts share seeds.
* **Padding** uses the tokenizer's pad id, or 0 when it has none (the driver pads with the same id).
* After new weights arrive the prefix cache is reset: cached KV blocks were computed by the old weights.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from actors.vllm_extension import REJECTED_MARKER
from learner.weight_sync import WeightPlanRejected

EXTENSION = "actors.vllm_extension.WeightSyncExtension"


def prompt_seeds(seed: int, worker_index: int, num_prompts: int) -> list[int]:
    """Independent 62-bit seeds for each prompt of a ``generate`` call (vLLM adds the sample index to each, so
    the spacing between prompts' seeds must be much larger than n)."""
    state = np.random.SeedSequence([seed, worker_index]).generate_state(num_prompts, dtype=np.uint64)
    return [int(value >> np.uint64(2)) for value in state]


class RolloutWorker:
    """A vLLM engine for ``model_path`` (a Hugging Face directory with its tokenizer).

    ``reward_fn(response_text, answer, *, response_length, truncated) -> float`` scores each response; if it also
    has ``is_correct(response_text, answer) -> bool`` that feeds the ``correct`` column (else ``score > 0``).
    ``cpu_kv_cache_gib`` sizes the KV cache of a CPU engine (the ``VLLM_CPU_KVCACHE_SPACE`` environment variable,
    if set, wins); ``gpu_memory_utilization`` is the share of GPU memory a GPU engine may take.
    """

    def __init__(
        self,
        model_path: str,
        *,
        reward_fn: Callable[..., float],
        worker_index: int = 0,
        tensor_parallel_size: int = 1,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.5,
        cpu_kv_cache_gib: float = 1.0,
        enforce_eager: bool = True,
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
        self.tensor_parallel_size = tensor_parallel_size
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
            # Worker processes of its own, whether or not this runs inside Ray: the Ray executor would need a
            # placement group of its own, while the driver already gives this actor its GPUs.
            distributed_executor_backend="mp",
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
        self._version = 0
        self._weights_valid = True
        self._sync_timeout_s: float | None = None  # set once in a weight-sync group

    # ---- sampling ----------------------------------------------------------------------------------------------

    def generate(
        self, problems: list[dict], *, n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> dict[str, Any]:
        """Sample ``n`` responses per problem and score them. Rows are prompt-major: prompt i has rows
        i·n … i·n+n−1.

        Returns ``prompt_ids`` (list of token lists), ``response_ids`` (long [P·n, T], right-padded with the pad
        id), ``response_mask`` and ``rollout_logprobs`` (float [P·n, T], 0 on padding), ``scores`` (float [P·n]),
        ``correct`` and ``truncated`` (bool [P·n]; truncated = stopped by the length limit), ``response_text``,
        ``weight_version``, ``num_generated_tokens``, ``generate_seconds`` (the engine's part).
        """
        from vllm import SamplingParams

        self._require_valid_weights()
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n and max_new_tokens must be >= 1, got n={n}, max_new_tokens={max_new_tokens}")
        if not temperature > 0:
            raise ValueError(
                f"temperature must be > 0 (log-probs are those of the sampling distribution), got {temperature}"
            )
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not problems:
            raise ValueError("generate() got no problems")
        prompt_ids = []
        for position, problem in enumerate(problems):
            if not isinstance(problem, dict):
                raise TypeError(f"problem #{position} is a {type(problem).__name__}, not a dict")
            missing = [key for key in ("id", "prompt", "answer") if not isinstance(problem.get(key), str)]
            if missing:
                raise ValueError(f"problem #{position} ({problem.get('id')!r}): {missing} missing or not a string")
            ids = self.tokenizer.encode(problem["prompt"])
            if not ids:
                raise ValueError(f"problem {problem['id']!r}: the prompt tokenises to nothing")
            if len(ids) >= self.max_model_len:
                raise ValueError(
                    f"problem {problem['id']!r}: prompt of {len(ids)} tokens leaves no room in max_model_len "
                    f"{self.max_model_len}"
                )
            prompt_ids.append(list(ids))

        params = [
            SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
                           seed=prompt_seed)
            for prompt_seed in prompt_seeds(seed, self.worker_index, len(problems))
        ]
        started = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        generate_seconds = time.perf_counter() - started

        rows_ids, rows_logp, texts, truncated = [], [], [], []
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
                rows_ids.append(token_ids)
                rows_logp.append([step[token].logprob for step, token in zip(completion.logprobs, token_ids)])
                texts.append(completion.text)
                truncated.append(completion.finish_reason == "length")

        rows = len(rows_ids)
        width = max(len(ids) for ids in rows_ids)
        response_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        response_mask = torch.zeros((rows, width), dtype=torch.float32)
        rollout_logprobs = torch.zeros((rows, width), dtype=torch.float32)
        for row, (ids, logps) in enumerate(zip(rows_ids, rows_logp)):
            response_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            response_mask[row, : len(ids)] = 1.0
            rollout_logprobs[row, : len(ids)] = torch.tensor(logps, dtype=torch.float32)

        scores, correct = [], []
        is_correct = getattr(self.reward_fn, "is_correct", None)
        for row, (text, ids, cut) in enumerate(zip(texts, rows_ids, truncated)):
            problem = problems[row // n]
            score = self.reward_fn(text, problem["answer"], response_length=len(ids), truncated=cut)
            if not isinstance(score, (int, float)) or not math.isfinite(score):
                raise ValueError(f"problem {problem['id']!r}: reward_fn returned {score!r}, not a finite number")
            scores.append(float(score))
            correct.append(bool(is_correct(text, problem["answer"])) if is_correct else score > 0)

        return {
            "prompt_ids": prompt_ids,
            "response_ids": response_ids,
            "response_mask": response_mask,
            "rollout_logprobs": rollout_logprobs,
            "scores": torch.tensor(scores, dtype=torch.float32),
            "correct": torch.tensor(correct, dtype=torch.bool),
            "truncated": torch.tensor(truncated, dtype=torch.bool),
            "response_text": texts,
            "weight_version": self._version,
            "num_generated_tokens": int(response_mask.sum().item()),
            "generate_seconds": generate_seconds,
        }

    def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-prob (temperature 1, full vocabulary) of every token after the first of each sequence."""
        from vllm import SamplingParams

        self._require_valid_weights()
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

    # ---- weights -----------------------------------------------------------------------------------------------

    def init_weight_sync(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int, backend: str,
        timeout_s: float,
    ) -> None:
        """Join the learner's weight-sync group (every tensor-parallel rank; ranks rank_offset … +tp−1)."""
        if rank_offset < 1 or rank_offset + self.tensor_parallel_size > world_size:
            raise ValueError(
                f"ranks {rank_offset}..{rank_offset + self.tensor_parallel_size - 1} of this worker do not fit in a "
                f"weight-sync world of {world_size} (rank 0 is the learner)"
            )
        self._sync_timeout_s = None  # the engine leaves any previous group first
        self.llm.collective_rpc(
            "asyppo_init_weight_sync", timeout=timeout_s + 30.0,
            args=(master_address, master_port, rank_offset, world_size, backend, timeout_s),
        )
        self._sync_timeout_s = timeout_s

    def receive_weights(self, plan: dict, version: int) -> int:
        """Receive weight ``version`` as described by ``plan`` (the learner broadcasts the buckets meanwhile).

        Raises ``WeightPlanRejected`` if the plan was refused (nothing changed), else ``RuntimeError`` on a failed
        transfer (then the weights are incomplete: generate refuses until a broadcast succeeds).
        """
        timeout_s = self._sync_timeout_s
        if timeout_s is None:
            raise RuntimeError("receive_weights before init_weight_sync: this worker is in no weight-sync group")
        buckets = len(plan.get("buckets", ())) if isinstance(plan, dict) else 0
        return self._load_on_workers(
            "asyppo_receive_weights", (plan, version), version, timeout=(buckets + 2) * timeout_s + 60.0
        )

    def receive_weights_from_object_store(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """The simple path: the state dict came through Ray's object store (pass an ObjectRef); same checks."""
        from safetensors.torch import save

        # vLLM's RPC serialises tensor arguments in a way its worker queue cannot pickle; plain bytes pass.
        blob = save({name: tensor.detach().contiguous() for name, tensor in state_dict.items()})
        return self._load_on_workers("asyppo_load_serialized_weights", (blob, version), version)

    def _load_on_workers(self, method: str, args: tuple, version: int, timeout: float | None = None) -> int:
        """Run a weight-loading RPC on every vLLM worker; a rejected plan keeps the old weights valid."""
        try:
            acks = self.llm.collective_rpc(method, timeout=timeout, args=args)
        except Exception as err:
            if REJECTED_MARKER in str(err):
                raise self._rejection(err) from None
            self._refresh_weight_state()
            raise
        return self._accept(acks, version)

    def close_weight_sync(self) -> None:
        """Leave the weight-sync group (the learner is closing it)."""
        self.llm.collective_rpc("asyppo_close_weight_sync", timeout=60.0)
        self._sync_timeout_s = None

    def weight_version(self) -> int:
        return self._version

    def health(self) -> dict[str, Any]:
        """Process id, weight version, whether the weights are whole and whether the engine answers."""
        try:
            states = self.llm.collective_rpc("asyppo_weight_state", timeout=30.0)
            engine_alive = True
        except Exception:  # noqa: BLE001 - whatever the failure, the engine does not answer
            states, engine_alive = [], False
        return {
            "pid": os.getpid(),
            "worker_index": self.worker_index,
            "weight_version": self._version,
            "weights_valid": self._weights_valid,
            "engine_alive": engine_alive,
            "in_sync_group": bool(states) and all(s["sync_rank"] is not None for s in states),
        }

    def shutdown(self) -> None:
        """Stop the engine and its processes (the actor can then be killed without leaving them behind)."""
        self.llm.llm_engine.engine_core.shutdown()

    # ---- helpers -----------------------------------------------------------------------------------------------

    def _accept(self, acks: list[int], version: int) -> int:
        if any(ack != version for ack in acks):
            raise RuntimeError(
                f"rollout worker #{self.worker_index}: ranks acknowledged versions {acks}, not {version}"
            )
        # KV blocks cached under the old weights must not be reused.
        self.llm.reset_prefix_cache()
        self._version = version
        self._weights_valid = True
        return version

    def _rejection(self, err: Exception) -> WeightPlanRejected:
        """vLLM forwards only the text of the worker's exception; keep the part that says why."""
        reason = str(err)
        reason = reason[reason.index(REJECTED_MARKER):].split("', please check the stack trace")[0]
        return WeightPlanRejected(reason)

    def _refresh_weight_state(self) -> None:
        try:
            states = self.llm.collective_rpc("asyppo_weight_state", timeout=30.0)
            self._weights_valid = all(s["weights_valid"] for s in states)
        except Exception:  # noqa: BLE001 - an engine that cannot say must be assumed broken
            self._weights_valid = False

    def _require_valid_weights(self) -> None:
        if not self._weights_valid:
            raise RuntimeError(
                f"rollout worker #{self.worker_index}: a weight transfer failed half-way, the engine holds a mix of "
                f"versions; broadcast the weights again (or restart the worker) before sampling"
            )
