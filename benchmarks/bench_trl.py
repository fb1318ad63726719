"""Against what a single-box user runs instead: TRL's ``GRPOTrainer`` beside this project's ``grpo`` job.

Both train a built-in task's tiny policy (``--task``: the default ``arithmetic`` job, responses ~3.5 tokens, or
``chain``, ~36 tokens) on the same prompts with the same reward (the task's verifier, 1 correct / 0 wrong), the
same batch (32 prompts × 8 samples = 256 responses per step, 4 optimizer steps of 64), the same generation limit
(8 or 48 tokens), temperature 1, learning rate 2e-4, no KL penalty, clip ε = 0.2:

- ``asyppo (grpo preset)``: the whole system (Ray actors, a vLLM rollout worker, the DeepSpeed learner, weight
  broadcast), ``--steps`` steps;
- ``trl GRPOTrainer``: TRL in this process, generating with ``transformers``' ``generate`` (TRL's default; its vLLM
  path needs a vLLM version TRL supports, and a GPU for its colocated mode), ``4 × --steps`` optimizer steps = the
  same number of rollout batches.

Reported: seconds per step (one rollout batch and its updates, mean over the steps after the first) and generated
tokens per second of the whole run, and the ratio TRL / asyppo measured in the same invocation. TRL is a
benchmark-only extra (``pip install -e '.[bench]'``).

    python benchmarks/bench_trl.py                                   # 20 steps each: ~2 min on 2 cores
    python benchmarks/bench_trl.py --task chain                      # ~6 min
    python benchmarks/bench_trl.py --steps 2 --output /tmp/trl.json  # smoke

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import Experiment, run_one  # noqa: E402  (a sibling script, not a package)
from report import print_table, write_json  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS, SAMPLES, MINI_BATCH, LR = 32, 8, 64, 2e-4
MAX_NEW_TOKENS = {"arithmetic": 8, "chain": 48}  # the default job's and examples/chain.yaml's


def asyppo_experiment(task: str) -> Experiment:
    data = [] if task == "arithmetic" else [f"data.task={task}", f"data.train=builtin:{task}",
                                             f"data.eval=builtin:{task}"]
    return Experiment(question="the grpo preset, for the TRL comparison", seeds=(0,), variants={"grpo": [
        "preset=grpo", *data, f"rollout.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}",
        f"learner.mini_batch_size={MINI_BATCH}", f"rollout.max_new_tokens={MAX_NEW_TOKENS[task]}", f"learner.lr={LR}",
        "trainer.eval_every=0", "data.eval_size=64"]})


def run_trl(task: str, steps: int, scratch: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from asyppo.tasks.registry import TASKS

    torch.set_num_threads(2)
    spec = TASKS[task]
    models = spec.builtin_models(0, lambda line: None)
    tokenizer = AutoTokenizer.from_pretrained(models.policy_dir)
    policy = Qwen2ForCausalLM.from_pretrained(models.policy_dir)
    problems = spec.builtin_problems(PROMPTS * (steps + 1), split="train", seed=0)
    dataset = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])
    generated = []

    def reward(prompts, completions, completion_ids, answer, **_):
        generated.extend(len(ids) for ids in completion_ids)
        return [1.0 if spec.verify(text, ref) else 0.0 for text, ref in zip(completions, answer)]

    class StepClock(TrainerCallback):
        """Wall time of each rollout batch: every ``steps_per_generation`` optimizer steps."""

        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % (PROMPTS * SAMPLES // MINI_BATCH) == 0:
                self.marks.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(scratch / "trl"), max_steps=steps * PROMPTS * SAMPLES // MINI_BATCH,
        per_device_train_batch_size=MINI_BATCH, steps_per_generation=PROMPTS * SAMPLES // MINI_BATCH,
        num_generations=SAMPLES, max_completion_length=MAX_NEW_TOKENS[task], temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, beta=0.0, epsilon=0.2, num_iterations=1,
        loss_type="dapo", scale_rewards="group", max_grad_norm=1.0, use_cpu=True, bf16=False, report_to="none",
        logging_steps=10**6, save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
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
    parser.add_argument("--task", choices=("arithmetic", "chain"), default="arithmetic")
    parser.add_argument("--steps", type=int, default=20, help="rollout batches each side")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    output = args.output or REPO_ROOT / "benchmarks" / "results" / f"trl_{args.task}.json"
    import trl

    with tempfile.TemporaryDirectory(prefix="asyppo-trl-") as scratch:
        ours = run_one("trl", asyppo_experiment(args.task), "grpo", 0, args.steps, [], Path(scratch))
        theirs = run_trl(args.task, args.steps, Path(scratch))

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
    result = {"task": args.task, "steps": args.steps, "prompts": PROMPTS, "samples": SAMPLES,
              "mini_batch": MINI_BATCH, "max_new_tokens": MAX_NEW_TOKENS[args.task], "trl_version": trl.__version__, "rows": rows,
              "trl_seconds_per_step_over_asyppo": speedup, "trl_optimizer_steps": theirs["optimizer_steps"],
              "asyppo_final_accuracy": ours["final_accuracy"],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    write_json(output, result)
    print(f"\n{args.task} task, {args.steps} steps of {PROMPTS} prompts x {SAMPLES} samples, "
          f"{MAX_NEW_TOKENS[args.task]} new tokens at most")
    print_table(["trainer", "seconds per step", "generated tokens/s"],
                [[name, f"{row['seconds_per_step']:.2f}", f"{row['tokens_per_s']:,.0f}"] for name, row in rows.items()])
    print(f"TRL takes {speedup:.2f}x the time per step of asyppo\nwrote {output}")


if __name__ == "__main__":
    main()
