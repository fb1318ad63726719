"""Where a training step's time goes, what asynchrony and more actors buy, and a projection to Qwen3-4B on 8 GPUs.

Whole training jobs of the default task (the default job, ``trainer.steps`` steps), one per variant:

- ``sync``: the default job. Its per-phase times give the **breakdown**: rollout, old log-probs and critic values
  (run side by side), the policy update and the critics' training (side by side), the weight broadcast with its
  check, and the **orchestration remainder** (the step's wall time minus its phases: collating the batch, Ray
  calls, metrics), goal ≤ 10 % of a step;
- ``max-staleness-1``: rollouts one step ahead of the learner (``trainer.max_staleness=1``): steps per minute and
  held-out accuracy at the same number of steps as ``sync``;
- ``rollout-workers-2``, ``critics-3``: the **scaling** knobs, 1 → 2 rollout workers and 2 → 3 critics. On this
  2-core machine every actor shares the same cores, so these show the orchestration cost of more actors, not the
  speed-up separate GPUs would give.

Every variant's mean step time is over its steps after the first (warm-up) and is reported as a ratio to ``sync``
measured in the same invocation. Each run writes ``<out>/<variant>/seed-0.json`` (the record of
``benchmarks/learning.py``) and is skipped when the file exists.

The **projection** scales the sync run's measured per-token costs to a Qwen3-4B policy with two Qwen3-0.6B critics
(the AsyPPO paper's setup) on 8 GPUs: each role's work per step in FLOPs (2·N per token for a forward pass, 6·N for
forward and backward), divided by the throughput that role achieved here, as a share of this machine's measured
matmul peak, applied to the GPU's peak. It assumes each role keeps its measured efficiency, which decode (memory
bound on a GPU) will not: read it as where the time would go, not as a promise. Where
``benchmarks/results/gpu.json`` holds the learner's and a critic's per-token costs measured on a GPU at the target's
model sizes (``benchmarks/bench_gpu.py``), a last column gives those two roles' seconds from them instead.

    python benchmarks/bench_steps.py                                  # 4 runs x 100 steps: ~15 min on 2 cores
    python benchmarks/bench_steps.py --summary-only                   # the tables from the files already there
    python benchmarks/bench_steps.py --steps 2 --out /tmp/steps --variants sync   # smoke

Writes ``benchmarks/results/steps/`` (or ``--out``): the per-run files and ``summary.json``; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import Experiment, run_missing  # noqa: E402  (a sibling script, not a package)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = Experiment(
    question="Where does a step's time go, and what do asynchrony and more actors change?",
    variants={
        "sync": [],
        "max-staleness-1": ["trainer.max_staleness=1"],
        "rollout-workers-2": ["rollout.num_workers=2"],
        "critics-3": ["critics.num_critics=3"],
    },
    seeds=(0,),
)
# Phases that follow one another within a sync step (docs/architecture.md, "One training step"); old log-probs run
# inside time_values and the policy update inside time_critic_train, side by side with the critics.
SEQUENTIAL_PHASES = ("time_rollout", "time_values", "time_critic_train", "time_weight_sync")
ALL_PHASES = ("time_rollout", "time_old_logprobs", "time_values", "time_update", "time_critic_train",
              "time_weight_sync")

# The projection's target (the AsyPPO paper's setup) and the hardware peak it assumes.
TARGET = {"policy_params": 4.0e9, "critic_params": 0.6e9, "critics": 2, "gpus": {"rollout": 4, "learner": 2,
          "critics": 2}, "gpu_peak_flops": 989e12, "gpu": "H100/H200 dense bf16 peak 989 TFLOP/s",
          "prompt_tokens": 512, "response_tokens": 2048, "responses": 512}


def _steady(record: dict, key: str) -> list[float]:
    values = record["per_step"].get(key) or []
    values = [v for v in values if v is not None]
    return values[1:] if len(values) > 1 else values


def _mean(record: dict, key: str) -> float:
    values = _steady(record, key)
    return statistics.mean(values) if values else float("nan")


def breakdown(record: dict) -> dict[str, float]:
    """Mean seconds of each phase and of the step; the remainder is the step minus its sequential phases."""
    row = {key: _mean(record, key) for key in (*ALL_PHASES, "time_step")}
    row["orchestration"] = row["time_step"] - sum(row[key] for key in SEQUENTIAL_PHASES)
    row["orchestration_share"] = row["orchestration"] / row["time_step"]
    return row


def matmul_peak_flops(size: int = 1024, repeats: int = 20) -> float:
    """This machine's float32 matmul throughput with torch (the 'peak' the projection scales from)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def projection(record: dict, cfg_overrides: list[str], peak_here: float) -> dict:
    """Each role's seconds per step at the TARGET scale, from the efficiency it reached in ``record``."""
    from asyppo.common.config import build_config
    from asyppo.cluster.job_inputs import resolve_models

    from transformers import AutoModelForCausalLM

    cfg = build_config(overrides=cfg_overrides)
    models = resolve_models(cfg)

    def params(path: str) -> float:
        return float(sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters()))

    policy_n, critic_n = params(models.policy), params(models.critic)
    responses = _mean(record, "rollout_responses")
    response_tokens = _mean(record, "response_length") * responses
    prompt_tokens = responses * 4.0  # the built-in prompts are 4-6 characters, one token each
    sequence_tokens = response_tokens + prompt_tokens
    m = cfg.critics.num_critics
    # FLOPs per step of each role, here: decode 2N per generated token (+ prefill); learner old log-probs 2N and
    # update 6N·epochs per sequence token; critics score every token (2N each) and train on their shard (6N).
    work_here = {
        "rollout": 2 * policy_n * (response_tokens + prompt_tokens),
        "learner": (2 + 6 * cfg.learner.epochs) * policy_n * sequence_tokens,
        "critics": (2 * m + 6 * cfg.critics.epochs) * critic_n * sequence_tokens,
    }
    seconds_here = {"rollout": _mean(record, "time_rollout"), "learner": _mean(record, "time_old_logprobs")
                    + _mean(record, "time_update"), "critics": _mean(record, "time_values")
                    + _mean(record, "time_critic_train") - _mean(record, "time_update")}
    efficiency = {role: work_here[role] / seconds_here[role] / peak_here for role in work_here}
    t = TARGET
    target_responses, target_seq = t["responses"], t["prompt_tokens"] + t["response_tokens"]
    work_target = {
        "rollout": 2 * t["policy_params"] * target_responses * target_seq,
        "learner": (2 + 6 * cfg.learner.epochs) * t["policy_params"] * target_responses * target_seq,
        "critics": (2 * t["critics"] + 6 * cfg.critics.epochs) * t["critic_params"] * target_responses * target_seq,
    }
    seconds_target = {role: work_target[role] / (t["gpus"][role] * t["gpu_peak_flops"] * efficiency[role])
                      for role in work_target}
    return {"measured_params": {"policy": policy_n, "critic": critic_n}, "peak_flops_here": peak_here,
            "efficiency_of_peak": efficiency, "seconds_here": seconds_here, "target": t,
            "seconds_target": seconds_target}


def gpu_projection(gpu: dict, epochs: dict[str, int]) -> dict | None:
    """The learner's and the critics' seconds per step at the TARGET scale from their per-token costs measured on a
    GPU at the target's model sizes (``benchmarks/bench_gpu.py``): each phase's tokens over its measured tokens/s,
    the learner's split evenly over its data-parallel GPUs (their gradient all-reduce not counted), each critic on
    its own GPU scoring every token and training on its 1/M share. None unless gpu.json holds both roles' costs."""
    costs = gpu.get("costs", {})
    needed = ("learner_old_logprobs", "learner_update", "critic_values", "critic_train")
    if not all(key in costs for key in needed):
        return None
    t = TARGET
    tokens = t["responses"] * (t["prompt_tokens"] + t["response_tokens"])
    rate = {key: costs[key]["tokens_per_s"] for key in needed}
    learner = tokens / rate["learner_old_logprobs"] + epochs["learner"] * tokens / rate["learner_update"]
    critic = tokens / rate["critic_values"] + epochs["critics"] * tokens / t["critics"] / rate["critic_train"]
    return {"gpu": gpu["machine"]["gpu"], "policy": costs["policy"], "critic": costs["critic"],
            "tokens_per_s": rate, "seconds_target": {"learner": learner / t["gpus"]["learner"], "critics": critic}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=sorted(EXPERIMENT.variants))
    parser.add_argument("--steps", type=int, help="override trainer.steps (a smoke run; use another --out)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "steps")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    variants = args.variants or list(EXPERIMENT.variants)

    if not args.summary_only:
        run_missing("steps", EXPERIMENT, args.out, variants, [0], args.steps)

    records = {path.parent.name: json.loads(path.read_text()) for path in sorted(args.out.glob("*/seed-0.json"))}
    if "sync" not in records:
        print(f"no sync run under {args.out}")
        return 1
    sync = breakdown(records["sync"])
    print(f"\nstep-time breakdown, default job, sync, mean over steps 2-{records['sync']['steps']}")
    print("| phase | seconds | share of step |\n|---|---|---|")
    names = {"time_rollout": "rollout (generate + score)", "time_old_logprobs": "  old log-probs (beside values)",
             "time_values": "old log-probs + critic values", "time_update": "  policy update (beside critics)",
             "time_critic_train": "policy update + critic training", "time_weight_sync": "weight broadcast + check",
             "orchestration": "orchestration remainder"}
    for key, name in names.items():
        print(f"| {name} | {sync[key]:.3f} | {sync[key] / sync['time_step']:.1%} |")
    print(f"| step | {sync['time_step']:.3f} | 100% |")
    print(f"orchestration remainder: {sync['orchestration_share']:.1%} of a step (goal <= 10%)")

    print("\n| variant | s/step | steps/min | vs sync | held-out after training |\n|---|---|---|---|---|")
    variants_summary = {}
    for variant, record in records.items():
        step_s = _mean(record, "time_step")
        variants_summary[variant] = {"seconds_per_step": step_s, "steps_per_minute": 60 / step_s,
                                     "speed_vs_sync": sync["time_step"] / step_s,
                                     "steps": record["steps"], "base_accuracy": record["base_accuracy"],
                                     "final_accuracy": record["final_accuracy"]}
        print(f"| {variant} | {step_s:.3f} | {60 / step_s:.1f} | {sync['time_step'] / step_s:.2f}x | "
              f"{record['base_accuracy']:.3f} -> {record['final_accuracy']:.3f} |")

    # The matmul peak belongs with the runs: a summary made again later (other work on the cores) keeps the old one.
    previous = args.out / "summary.json"
    peak = json.loads(previous.read_text())["projection"]["peak_flops_here"] \
        if args.summary_only and previous.exists() else matmul_peak_flops()
    proj = projection(records["sync"], records["sync"]["overrides"], peak)
    print(f"\nprojection (not measured): Qwen3-4B policy, 2 x Qwen3-0.6B critics, {TARGET['responses']} responses of "
          f"{TARGET['prompt_tokens']}+{TARGET['response_tokens']} tokens per step, GPUs rollout/learner/critics "
          f"{TARGET['gpus']['rollout']}/{TARGET['gpus']['learner']}/{TARGET['gpus']['critics']}, {TARGET['gpu']}")
    from asyppo.common.config import build_config

    gpu_file = REPO_ROOT / "benchmarks" / "results" / "gpu.json"
    cfg = build_config(overrides=records["sync"]["overrides"])
    on_gpu = gpu_projection(json.loads(gpu_file.read_text()), {"learner": cfg.learner.epochs,
                                                               "critics": cfg.critics.epochs}) \
        if gpu_file.exists() else None
    print("| role | efficiency here (share of matmul peak) | seconds here | projected seconds per step | "
          "from per-token costs measured on a GPU |\n|---|---|---|---|---|")
    for role in ("rollout", "learner", "critics"):
        measured = f"{on_gpu['seconds_target'][role]:.1f}" if on_gpu and role in on_gpu["seconds_target"] \
            else "not measured"
        print(f"| {role} | {proj['efficiency_of_peak'][role]:.1%} | {proj['seconds_here'][role]:.3f} | "
              f"{proj['seconds_target'][role]:.1f} | {measured} |")
    if on_gpu:
        print(f"(last column: {on_gpu['policy']} learner and {on_gpu['critic']} critic in bf16 on one "
              f"{on_gpu['gpu']}, benchmarks/bench_gpu.py; the rollout needs vLLM on a GPU, not measured)")
    proj["from_gpu_costs"] = on_gpu
    summary = {"breakdown_sync": sync, "variants": variants_summary, "projection": proj}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
