"""Against what a single-box user runs instead: TRL's ``GRPOTrainer`` beside this project's ``grpo`` job.

Both train the same policy on the same prompts with the same reward (the task's verifier, 1 correct / 0 wrong), the
same batch, the same generation limit and temperature, the same learning rate, no KL penalty, clip ε = 0.2:

- ``--task arithmetic`` (the default job: its tiny policy, responses ~3.5 tokens) or ``chain`` (~36 tokens):
  32 prompts × 8 samples = 256 responses a step, 4 optimizer steps of 64, temperature 1, learning rate 2e-4;
- ``--task words``: the real pretrained model SmolLM2-135M-Instruct through its chat template (examples/smollm2.yaml):
  8 prompts × 4 samples, 2 optimizer steps of 16, temperature 0.7, learning rate 1e-6.

The sides:

- ``asyppo (grpo preset)``: the whole system (Ray actors, a vLLM rollout worker, the DeepSpeed learner, weight
  broadcast), ``--steps`` steps;
- ``trl GRPOTrainer``: TRL in this process, generating with ``transformers``' ``generate`` (TRL's default; its vLLM
  path needs a vLLM version TRL supports, and a GPU for its colocated mode), the same number of rollout batches.

Reported: seconds per step (one rollout batch and its updates, mean over the steps after the first) and generated
tokens per second of the whole run, and the ratio TRL / asyppo measured in the same invocation. TRL is a
benchmark-only extra (``pip install -e '.[bench]'``).

    python benchmarks/bench_trl.py                                   # 20 steps each: ~2 min on 2 cores
    python benchmarks/bench_trl.py --task chain                      # ~6 min
    python benchmarks/bench_trl.py --task words --steps 5            # SmolLM2: ~10 min
    python benchmarks/bench_trl.py --steps 2 --prompts 8 --samples 4 --output /tmp/trl.json  # smoke

Writes ``benchmarks/results/trl_<task>.json`` (or ``--output``) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import Experiment, run_one  # noqa: E402  (a sibling script, not a package)
from report import print_table, write_json  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workload:
    """What both sides train: one rollout batch is ``prompts × samples`` responses, split into optimizer steps of
    ``mini_batch``."""

    prompts: int
    samples: int
    mini_batch: int
    lr: float
    max_new_tokens: int
    temperature: float
    micro_batch: int = 64  # the learner's forward/backward chunk (memory), at most a mini-batch
    overrides: tuple[str, ...] = ()  # the task's data and models, as config overrides of the asyppo job

    @property
    def optimizer_steps_per_batch(self) -> int:
        return max(1, self.prompts * self.samples // self.mini_batch)


def _task(name: str) -> tuple[str, ...]:
    return (f"data.task={name}", f"data.train=builtin:{name}", f"data.eval=builtin:{name}")


WORKLOADS = {
    "arithmetic": Workload(32, 8, 64, 2e-4, max_new_tokens=8, temperature=1.0),  # the default job's
    "chain": Workload(32, 8, 64, 2e-4, max_new_tokens=48, temperature=1.0, overrides=_task("chain")),
    "words": Workload(8, 4, 16, 1e-6, max_new_tokens=16, temperature=0.7, micro_batch=8, overrides=(
        *_task("words"), "model.policy=builtin:smollm2-135m-instruct", "data.chat_template=true",
        "rollout.max_model_len=256")),  # examples/smollm2.yaml's
}


def asyppo_experiment(work: Workload) -> Experiment:
    return Experiment(question="the grpo preset, for the TRL comparison", seeds=(0,), variants={"grpo": [
        "preset=grpo", *work.overrides, f"rollout.prompts_per_step={work.prompts}",
        f"rollout.samples_per_prompt={work.samples}", f"learner.mini_batch_size={work.mini_batch}",
        f"learner.micro_batch_size={min(work.micro_batch, work.mini_batch)}",
        f"rollout.max_new_tokens={work.max_new_tokens}", f"rollout.temperature={work.temperature}",
        f"learner.lr={work.lr}", "trainer.eval_every=0", "data.eval_size=64"]})


def policy_dir(task: str) -> str:
    """The directory of the policy both sides start from: the task's built-in tiny policy, or SmolLM2's cache entry."""
    from asyppo.tasks.model_cache import default_cache_dir
    from asyppo.tasks.pretrained import ensure_pretrained
    from asyppo.tasks.registry import TASKS

    if task == "words":
        return str(ensure_pretrained("smollm2-135m-instruct", default_cache_dir(), log=lambda line: None))
    return str(TASKS[task].builtin_models(0, lambda line: None).policy_dir)


def run_trl(task: str, work: Workload, steps: int, scratch: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from asyppo.tasks.registry import TASKS

    torch.set_num_threads(2)
    spec = TASKS[task]
    start = policy_dir(task)
    tokenizer = AutoTokenizer.from_pretrained(start)
    policy = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    problems = spec.builtin_problems(work.prompts * (steps + 1), split="train", seed=0)
    chat = "data.chat_template=true" in work.overrides  # TRL renders a conversational prompt with the chat template
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}] if chat else p.prompt,
                                  "answer": p.answer} for p in problems])
    generated = []

    def reward(prompts, completions, completion_ids, answer, **_):
        generated.extend(len(ids) for ids in completion_ids)
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if spec.verify(text, ref) else 0.0 for text, ref in zip(texts, answer)]

    per_batch = work.optimizer_steps_per_batch

    class StepClock(TrainerCallback):
        """Wall time of each rollout batch: every ``steps_per_generation`` optimizer steps."""

        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % per_batch == 0:
                self.marks.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(scratch / "trl"), max_steps=steps * per_batch,
        per_device_train_batch_size=work.prompts * work.samples // per_batch, steps_per_generation=per_batch,
        num_generations=work.samples, max_completion_length=work.max_new_tokens, temperature=work.temperature,
        top_p=1.0, top_k=0, learning_rate=work.lr, lr_scheduler_type="constant", warmup_steps=0, beta=0.0,
        epsilon=0.2, num_iterations=1, loss_type="dapo", scale_rewards="group", max_grad_norm=1.0, use_cpu=True,
        bf16=False, report_to="none", logging_steps=10**6, save_strategy="no", seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    clock = StepClock()
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    step_times = [b - a for a, b in zip([started, *clock.marks], clock.marks)]
    return {"seconds": seconds, "step_seconds": step_times, "generated_tokens": sum(generated),
            "optimizer_steps": trainer.state.global_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(WORKLOADS), default="arithmetic")
    parser.add_argument("--steps", type=int, default=20, help="rollout batches each side")
    parser.add_argument("--prompts", type=int, help="prompts per rollout batch (default: the task's workload)")
    parser.add_argument("--samples", type=int, help="samples per prompt (default: the task's workload)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    output = args.output or REPO_ROOT / "benchmarks" / "results" / f"trl_{args.task}.json"
    work = WORKLOADS[args.task]
    if args.prompts or args.samples:  # a smaller batch keeps the number of optimizer steps per batch
        steps_per_batch = work.optimizer_steps_per_batch
        work = replace(work, prompts=args.prompts or work.prompts, samples=args.samples or work.samples)
        work = replace(work, mini_batch=max(1, work.prompts * work.samples // steps_per_batch))
    import trl

    with tempfile.TemporaryDirectory(prefix="asyppo-trl-") as scratch:
        ours = run_one("trl", asyppo_experiment(work), "grpo", 0, args.steps, [], Path(scratch))
        theirs = run_trl(args.task, work, args.steps, Path(scratch))

    def steady(values: list[float]) -> float:
        return statistics.mean(values[1:] if len(values) > 1 else values)

    our_step = steady(ours["per_step"]["time_step"])
    our_tokens = sum(length * responses for length, responses in
                     zip(ours["per_step"]["response_length"], ours["per_step"]["rollout_responses"]))
    our_train_seconds = sum(ours["per_step"]["time_step"])
    rows = {
        "asyppo (grpo preset)": {"seconds_per_step": our_step, "tokens_per_s": our_tokens / our_train_seconds,
                                 "generated_tokens": our_tokens, "train_seconds": our_train_seconds},
        "trl GRPOTrainer": {"seconds_per_step": steady(theirs["step_seconds"]),
                            "tokens_per_s": theirs["generated_tokens"] / theirs["seconds"],
                            "generated_tokens": theirs["generated_tokens"], "train_seconds": theirs["seconds"]},
    }
    speedup = rows["trl GRPOTrainer"]["seconds_per_step"] / rows["asyppo (grpo preset)"]["seconds_per_step"]
    result = {"task": args.task, "steps": args.steps, "prompts": work.prompts, "samples": work.samples,
              "mini_batch": work.mini_batch, "max_new_tokens": work.max_new_tokens, "temperature": work.temperature,
              "lr": work.lr, "policy": "SmolLM2-135M-Instruct" if args.task == "words" else "the task's builtin:tiny",
              "trl_version": trl.__version__, "rows": rows, "trl_seconds_per_step_over_asyppo": speedup,
              "trl_optimizer_steps": theirs["optimizer_steps"], "asyppo_final_accuracy": ours["final_accuracy"],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    write_json(output, result)
    print(f"\n{args.task} task, {args.steps} steps of {work.prompts} prompts x {work.samples} samples, "
          f"{work.max_new_tokens} new tokens at most")
    print_table(["trainer", "seconds per step", "generated tokens/s"],
                [[name, f"{row['seconds_per_step']:.2f}", f"{row['tokens_per_s']:,.0f}"] for name, row in rows.items()])
    print(f"TRL takes {speedup:.2f}x the time per step of asyppo\nwrote {output}")


if __name__ == "__main__":
    main()
