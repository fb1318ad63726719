"""Rollout throughput: ``RolloutWorker`` against plain ``vllm.LLM.generate``, same engine settings, same prompts.

Two Ray actors hold one vLLM engine each, built from the same checkpoint with the same engine settings (dtype,
seed, max_model_len, eager mode, KV-cache size, and log-probs of the sampling distribution, ``logprobs_mode=
"processed_logprobs"``, which RL needs to compare the learner's π with the sampler's):

- ``plain``: ``vllm.LLM.generate`` with the same ``SamplingParams`` the worker uses (n, temperature, top_p,
  max_tokens, one seed per prompt, the sampled token's log-prob), timed around the call inside its actor: the engine
  alone, no Ray call, no scoring.
- ``rollout_worker``: ``RolloutWorker.generate`` as the trainer calls it, timed from this process: the Ray call,
  prompt encoding, generation, padding into tensors, scoring every response with the task's verifier, and the
  transfer of the result back.

Both draw the same seeds, so they generate the same tokens (checked); tokens/s is generated tokens over seconds.
The calls alternate, one unmeasured warm-up each, then ``--repeats`` measurements (half with the plain engine
started first, half with the worker's); medians are reported.
The ratio ``rollout_worker / plain`` is what the project's wrapper costs (goal ≥ 0.95).

    python benchmarks/bench_rollout.py                       # the chain task's rollout step: ~3 min on 2 cores
    python benchmarks/bench_rollout.py --task arithmetic     # the default job's (short responses)
    python benchmarks/bench_rollout.py --task words          # SmolLM2-135M-Instruct, chat template (examples/smollm2.yaml)
    python benchmarks/bench_rollout.py --repeats 1 --prompts 4 --output /tmp/rollout.json   # smoke

Writes ``benchmarks/results/rollout_<task>.json`` (or ``--output``) and prints a table.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
import platform
import statistics
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trl import policy_dir  # noqa: E402  (a sibling script, not a package)
from report import print_table, write_json  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RolloutWorkload:
    """A task's rollout step as its job runs it: the policy, the response length, the sampling temperature, the
    engine's context and how prompts are formatted."""

    policy: str
    max_new_tokens: int
    temperature: float = 1.0
    max_model_len: int = 0  # 0: 64 + max_new_tokens (the tiny tasks' prompts are short)
    chat_template: bool = False

    def __post_init__(self):
        if not self.max_model_len:
            object.__setattr__(self, "max_model_len", 64 + self.max_new_tokens)

    @property
    def prompt_format(self):
        from asyppo.tasks.prompts import PromptFormat

        return PromptFormat(chat_template=self.chat_template)


WORKLOADS = {  # the default job's, examples/chain.yaml's and examples/smollm2.yaml's
    "arithmetic": RolloutWorkload("the task's builtin:tiny", max_new_tokens=8),
    "chain": RolloutWorkload("the task's builtin:tiny", max_new_tokens=48),
    "words": RolloutWorkload("SmolLM2-135M-Instruct", max_new_tokens=16, temperature=0.7, max_model_len=256,
                             chat_template=True),
}


class PlainEngine:
    """``vllm.LLM`` as a user would call it, with the rollout worker's engine settings."""

    def __init__(self, model_path: str, *, seed: int, max_model_len: int, cpu_kv_cache_gib: float):
        from vllm import LLM
        from vllm.platforms import current_platform

        from asyppo.actors.rollout_worker import engine_executor

        engine_args = {"kv_cache_memory_bytes": int(cpu_kv_cache_gib * 2**30)} if current_platform.is_cpu() else {}
        self.llm = LLM(model=model_path, dtype="float32", seed=seed, max_model_len=max_model_len, enforce_eager=True,
                       distributed_executor_backend=engine_executor(1), logprobs_mode="processed_logprobs",
                       **engine_args)

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], *, n: int, max_new_tokens: int,
                 temperature: float) -> tuple[float, int]:
        from vllm import SamplingParams

        params = [SamplingParams(n=n, temperature=temperature, top_p=1.0, max_tokens=max_new_tokens, logprobs=0,
                                 seed=s) for s in seeds]
        started = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        seconds = time.perf_counter() - started
        # What the worker counts as generated: every sampled token, EOS included.
        return seconds, sum(len(completion.token_ids) for output in outputs for completion in output.outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(WORKLOADS), default="chain")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per call (rollout.prompts_per_step)")
    parser.add_argument("--samples", type=int, default=8, help="responses per prompt (rollout.samples_per_prompt)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, choices=(1, 2), default=2,
                        help="2: a second round with the engines started in the other order (1: a smoke run)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    output = args.output or REPO_ROOT / "benchmarks" / "results" / f"rollout_{args.task}.json"

    import ray
    from transformers import AutoTokenizer

    from asyppo.actors.rollout_worker import RolloutWorker, prompt_seeds
    from asyppo.tasks.prompts import encode_prompts
    from asyppo.tasks.registry import TASKS
    from asyppo.tasks.rewards import RewardFunction

    work = WORKLOADS[args.task]
    model_path = policy_dir(args.task)
    max_new_tokens, temperature = work.max_new_tokens, work.temperature
    problems = [p.to_dict() for p in TASKS[args.task].builtin_problems(args.prompts, split="eval", seed=0)]
    max_model_len = work.max_model_len
    # Both sides get the same prompt tokens: the worker encodes them itself (with the chat template when the job
    # uses one), the plain engine is handed them.
    prompt_ids = encode_prompts(AutoTokenizer.from_pretrained(model_path), [p["prompt"] for p in problems],
                                work.prompt_format)

    seeds = prompt_seeds(0, 0, len(problems))
    times: dict[str, list[float]] = {"plain": [], "rollout_worker": []}
    tokens: dict[str, set[int]] = {"plain": set(), "rollout_worker": set()}
    engine_seconds: list[float] = []

    def start_plain():
        return ray.remote(PlainEngine).options(num_cpus=1).remote(
            model_path, seed=0, max_model_len=max_model_len, cpu_kv_cache_gib=args.kv_cache_gib)

    def start_worker():
        return ray.remote(RolloutWorker).options(num_cpus=1).remote(
            model_path, reward_fn=RewardFunction(task=args.task), seed=0, max_model_len=max_model_len,
            cpu_kv_cache_gib=args.kv_cache_gib, prompt_format=work.prompt_format)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # Two rounds with the engines started in either order: the engine started second was measurably slower in
        # some runs (both share 2 cores), and the rounds cancel that out.
        for first in ("plain", "rollout_worker")[: args.rounds]:
            if first == "plain":
                plain = start_plain()
                ray.get(plain.__ray_ready__.remote())
                worker = start_worker()
            else:
                worker = start_worker()
                ray.get(worker.health.remote())
                plain = start_plain()
            ray.get([worker.health.remote(), plain.__ray_ready__.remote()])

            def run_plain() -> tuple[float, int]:
                return ray.get(plain.generate.remote(prompt_ids, seeds, n=args.samples, max_new_tokens=max_new_tokens,
                                                     temperature=temperature))

            def run_worker() -> tuple[float, int]:
                started = time.perf_counter()
                result = ray.get(worker.generate.remote(problems, n=args.samples, max_new_tokens=max_new_tokens,
                                                        temperature=temperature, top_p=1.0, seed=0))
                engine_seconds.append(result["generate_seconds"])  # the worker's own LLM.generate call
                return time.perf_counter() - started, result["num_generated_tokens"]

            run_plain(), run_worker()  # warm-up
            engine_seconds.pop()
            for repeat in range((args.repeats + 1) // 2):
                for name, call in ((("plain", run_plain), ("rollout_worker", run_worker)) if repeat % 2 == 0
                                   else (("rollout_worker", run_worker), ("plain", run_plain))):
                    seconds, generated = call()
                    times[name].append(seconds)
                    tokens[name].add(generated)
            ray.kill(plain)
            ray.kill(worker)
    finally:
        ray.shutdown()

    if len(tokens["plain"]) != 1 or tokens["plain"] != tokens["rollout_worker"]:
        raise SystemExit(f"the two engines generated different token counts {tokens}: the comparison is not like for "
                         "like (same seeds should give the same tokens)")
    generated = tokens["plain"].pop()
    rows = {name: {"median_s": statistics.median(values), "seconds": values,
                   "tokens_per_s": generated / statistics.median(values)} for name, values in times.items()}
    ratio = rows["rollout_worker"]["tokens_per_s"] / rows["plain"]["tokens_per_s"]
    # Where the worker's extra time goes: its engine call vs everything around it (Ray, encoding, scoring, padding).
    rows["rollout_worker"]["engine_median_s"] = statistics.median(engine_seconds)
    rows["rollout_worker"]["wrapper_median_s"] = statistics.median(
        total - engine for total, engine in zip(times["rollout_worker"], engine_seconds))
    result = {
        "task": args.task, "policy": work.policy, "prompts": len(problems), "samples_per_prompt": args.samples,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "generated_tokens": generated, "repeats": args.repeats, **rows,
        "ratio_rollout_worker_to_plain": ratio, "goal": 0.95,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    write_json(output, result)
    print(f"\nrollout throughput, {args.task} task: {len(problems)} prompts x {args.samples} samples, "
          f"{generated} tokens generated per call, median of {args.repeats}")
    print_table(["path", "seconds per call", "tokens/s"],
                [[name, f"{row['median_s']:.3f}", f"{row['tokens_per_s']:,.0f}"] for name, row in rows.items()])
    worker_row = rows["rollout_worker"]
    print(f"rollout_worker: engine call {worker_row['engine_median_s']:.3f} s + around it (Ray call, encoding, "
          f"scoring, padding) {worker_row['wrapper_median_s']:.3f} s")
    print(f"ratio rollout_worker / plain: {ratio:.3f} (goal >= 0.95)\nwrote {output}")


if __name__ == "__main__":
    main()
