"""The learner's and the mini-critics' GPU paths on one accelerator: bf16 under every ZeRO stage, and per-token costs at
the AsyPPO paper's sizes (a Qwen3-4B policy, Qwen3-0.6B critics).

The ``Learner`` and ``MiniCritic`` classes run here directly (they are plain classes; Ray only hosts them), in one
process with a one-rank NCCL group, so this needs neither Ray nor vLLM.

1. **bf16 against float32** (``--stages``, default 0 1 2 3), on the built-in chain task's (``--task``) policy and
   critic and a batch the policy sampled (``transformers`` ``generate``). For each ZeRO stage a float32 and a bf16 learner (and two
   critics of each) take the same step from the same weights:
   - ``logp_abs_diff_max``/``_mean``: the bf16 engine's log-probs of the response tokens against float32's;
   - ``value_abs_diff_max``/``_mean``: the same for the critics' values after one step of training (the value head
     starts at zero, so the first values agree in any dtype), beside their mean size ``value_abs_mean``;
   - ``update_cosine``: cosine between the two updates (new − old fp32 master weights; DeepSpeed keeps float32
     master weights under bf16), ``update_norm_ratio`` their norms' ratio; both updates must be applied and finite;
   - ``resume_exact``: the bf16 learner saved and loaded again (``Learner.save`` then ``resume_state_dir``) has
     bit-identical master weights.
2. **Per-token costs** (``--policy``/``--critic``, default Qwen3-4B / Qwen3-0.6B with random weights: speed does not
   depend on the values): ``--responses`` sequences of ``--prompt-tokens`` + ``--response-tokens`` tokens. Timed after
   one warm-up of each phase: the learner's old log-probs (no grad), its update (one epoch, one optimizer step), one
   critic's values and its training on the whole batch. Each phase's tokens/s counts every sequence token; its
   ``model_flops_utilisation`` is (2N for a forward pass, 6N for forward + backward) × tokens/s over the bf16
   matmul throughput measured in the same run (8192³, ``matmul_tflops``).

    python benchmarks/bench_gpu.py                       # on a CUDA machine: ~5 min on one H200
    python benchmarks/bench_gpu.py --smoke --output /tmp/gpu.json   # any machine: tiny sizes, arithmetic, ZeRO-0 (CI)

Writes ``benchmarks/results/gpu.json`` (or ``--output``) after each part, so a part that fails keeps the others.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from asyppo.common.deepspeed_engine import master_weights

REPO_ROOT = Path(__file__).resolve().parents[1]

# The published configs of Qwen/Qwen3-0.6B and Qwen/Qwen3-4B (their config.json), and a tiny one for the smoke.
QWEN3 = {
    "Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8),
    "Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1),
}
QWEN3_COMMON = dict(vocab_size=151936, head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960,
                    rope_theta=1_000_000.0, rms_norm_eps=1e-6)


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_tflops(size: int = 8192, repeats: int = 10) -> float:
    """bf16 matmul throughput of this GPU with torch (float32 on CPU): the denominator of the utilisations."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    size = size if torch.cuda.is_available() else 512
    a = torch.randn(size, size, device=device(), dtype=dtype)
    b = torch.randn(size, size, device=device(), dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def job_config(task: str, *overrides: str):
    """The job whose sections the classes take: the chain task as benchmarks/learning.py runs it, or the default."""
    from asyppo.common.config import build_config

    task_overrides = {"chain": ["data.task=chain", "data.train=builtin:chain", "data.eval=builtin:chain",
                                "rollout.max_new_tokens=48"], "arithmetic": []}[task]
    return build_config(overrides=[*task_overrides, *overrides])


def make_learner(cfg, policy_dir: str, dtype: str, resume_state_dir: str | None = None):
    from asyppo.common.network import free_port
    from asyppo.learner.learner import Learner

    return Learner(policy_dir, cfg.algorithm, cfg.learner, temperature=cfg.rollout.temperature, dtype=dtype,
                   seed=cfg.trainer.seed, timeout_s=300, total_steps=cfg.trainer.steps, master_port=free_port(),
                   resume_state_dir=resume_state_dir)


def make_critic(cfg, critic_dir: str, index: int, dtype: str):
    from asyppo.critics.mini_critic import MiniCritic

    return MiniCritic(critic_dir, index, cfg.critics, cfg.algorithm, dtype=dtype, seed=cfg.trainer.seed,
                      timeout_s=300, total_steps=cfg.trainer.steps)


# ---- part 1: bf16 against float32 ---------------------------------------------------------------------------------

def sampled_batch(task_name: str, models, cfg, prompts: int, group: int):
    """A rollout batch of the task sampled from the policy with ``generate``, scored by the task's reward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyppo.core.batch import collate_rollouts
    from asyppo.core.logprobs import response_logprobs
    from asyppo.tasks.prompts import encode_prompts
    from asyppo.tasks.registry import TASKS

    task = TASKS[task_name]
    tokenizer = AutoTokenizer.from_pretrained(models.policy_dir)
    problems = task.builtin_problems(prompts, split="train", seed=cfg.trainer.seed)
    prompt_ids = encode_prompts(tokenizer, [p.prompt for p in problems])
    policy = AutoModelForCausalLM.from_pretrained(models.policy_dir, dtype=torch.float32).to(device()).eval()
    torch.manual_seed(cfg.trainer.seed)
    length = cfg.rollout.max_new_tokens
    responses = torch.full((prompts * group, length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(prompts * group, length)
    scores = torch.zeros(prompts * group)
    for i, (problem, ids) in enumerate(zip(problems, prompt_ids)):
        inputs = torch.tensor([ids] * group, device=device())
        out = policy.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True, temperature=1.0,
                              top_p=1.0, top_k=0, max_new_tokens=length, pad_token_id=tokenizer.pad_token_id)
        for j, row in enumerate(out[:, len(ids):].cpu().tolist()):
            eos = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            r = i * group + j
            responses[r, :eos] = torch.tensor(row[:eos])
            mask[r, :eos] = 1
            text = tokenizer.decode(row[:eos], skip_special_tokens=True)
            scores[r] = float(task.reward(problem.prompt, text, problem.answer, problem.row))
    batch = collate_rollouts(prompt_ids, responses, mask, torch.zeros_like(mask), scores, scores > 0,
                             [p.id for p in problems], group, pad_id=tokenizer.pad_token_id, weight_version=0)
    with torch.no_grad():  # the sampler's own log-probs, as vLLM would report them
        logp, _ = response_logprobs(policy, batch.input_ids.to(device()), batch.attention_mask.to(device()),
                                    batch.response_length, with_entropy=False)
    batch.rollout_logprobs = logp.float().cpu() * batch.response_mask
    del policy
    return batch


def one_step(cfg, models, batch, dtype: str, shards: list[list[int]]) -> dict:
    """One learner step and one step of two critics in ``dtype``: what part 1 compares."""
    learner = make_learner(cfg, str(models.policy_dir), dtype)
    critics = [make_critic(cfg, str(models.critic_dir), m, dtype) for m in range(len(shards))]
    learner.compute_old_logprobs(batch)
    values = [critic.values(batch) for critic in critics]
    returns, _ = learner.compute_advantages(0, *values)
    before = master_weights(learner.engine)
    update = learner.update(0)
    after = master_weights(learner.engine)
    critic_stats = [critic.update(returns, rows, 0) for critic, rows in zip(critics, shards)]
    # The value head starts at zero (V ≡ 0 in any dtype): compare the values after one step of training.
    trained_values = [critic.values(batch) for critic in critics]
    result = {"logp": learner._old_logp.clone(), "values": torch.stack(trained_values), "delta": after - before,
              "update": update, "critic_train": critic_stats, "learner": learner}
    del critics
    return result


def bf16_against_fp32(task: str, stages: list[int], prompts: int, group: int, out: dict, save) -> None:
    from asyppo.critics.sharding import assign_shards
    from asyppo.tasks.registry import TASKS

    cfg = job_config(task, f"rollout.prompts_per_step={prompts}", f"rollout.samples_per_prompt={group}",
                     f"learner.mini_batch_size={prompts * group}", "learner.micro_batch_size=8",
                     "critics.micro_batch_size=8")
    models = TASKS[task].builtin_models(cfg.trainer.seed, print)
    batch = sampled_batch(task, models, cfg, prompts, group)
    mask = batch.response_mask > 0
    out["bf16"] = {"task": task, "batch": {"responses": batch.num_sequences, "response_tokens": int(mask.sum()),
                             "mean_reward": float(batch.scores.mean())}, "stages": {}}
    shards = assign_shards(batch.prompt_ids, group, 2)
    for stage in stages:
        staged = cfg.model_copy(update={
            "learner": cfg.learner.model_copy(update={"zero_stage": stage}),
            "critics": cfg.critics.model_copy(update={"zero_stage": stage})})
        row: dict = {}
        try:
            fp32 = one_step(staged, models, batch, "float32", shards)
            fp32.pop("learner")
            free_memory()
            bf16 = one_step(staged, models, batch, "bfloat16", shards)
            logp_diff = (bf16["logp"] - fp32["logp"]).abs()[mask]
            value_diff = (bf16["values"] - fp32["values"]).abs()[:, mask]
            d16, d32 = bf16["delta"], fp32["delta"]
            row.update({
                "engine_dtype": str(next(bf16["learner"].engine.module.parameters()).dtype),
                "engine_zero_stage": bf16["learner"].engine.zero_optimization_stage(),
                "logp_abs_diff_max": float(logp_diff.max()), "logp_abs_diff_mean": float(logp_diff.mean()),
                "value_abs_diff_max": float(value_diff.max()), "value_abs_diff_mean": float(value_diff.mean()),
                "value_abs_mean": float(fp32["values"].abs()[:, mask].mean()),
                "update_cosine": float(d16.double() @ d32.double() / (d16.double().norm() * d32.double().norm())),
                "update_norm_ratio": float(d16.double().norm() / d32.double().norm()),
                "applied": {"float32": fp32["update"]["optimizer_steps"], "bfloat16": bf16["update"]["optimizer_steps"]},
                "grad_norm": {"float32": fp32["update"]["grad_norm"], "bfloat16": bf16["update"]["grad_norm"]},
                "policy_loss": {"float32": fp32["update"].get("policy_loss"),
                                "bfloat16": bf16["update"].get("policy_loss")},
                "critic_value_loss": {"float32": [s["value_loss"] for s in fp32["critic_train"]],
                                      "bfloat16": [s["value_loss"] for s in bf16["critic_train"]]},
            })
            learner = bf16.pop("learner")
            with tempfile.TemporaryDirectory() as tmp:
                learner.save(tmp)
                saved = master_weights(learner.engine)
                del learner
                free_memory()
                resumed = make_learner(staged, str(models.policy_dir), "bfloat16",
                                       resume_state_dir=str(Path(tmp) / "policy_state"))
                row["resume_exact"] = bool(torch.equal(saved, master_weights(resumed.engine)))
                del resumed
        except Exception as error:  # keep the other stages and parts: the failure is the finding
            row["error"] = "".join(traceback.format_exception_only(error)).strip()
            traceback.print_exc()
        free_memory()
        out["bf16"]["stages"][str(stage)] = row
        save()
        print(f"bf16 vs float32, ZeRO-{stage}: {json.dumps(row)}", flush=True)


# ---- part 2: per-token costs -----------------------------------------------------------------------------------

def save_random_qwen3(name: str, directory: Path) -> int:
    """A randomly initialised Qwen3 of the published shape, saved in bf16 (``from_pretrained`` loads it); returns
    its parameter count."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**QWEN3_COMMON, **QWEN3[name])
    with torch.device(device()):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    del model
    free_memory()
    return count


def random_batch(responses: int, prompt_tokens: int, response_tokens: int, vocab: int):
    from asyppo.core.batch import collate_rollouts

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (prompt_tokens,), generator=gen).tolist() for _ in range(responses)]
    response_ids = torch.randint(3, vocab, (responses, response_tokens), generator=gen)
    mask = torch.ones(responses, response_tokens)
    scores = (torch.rand(responses, generator=gen) > 0.5).float()
    return collate_rollouts(prompts, response_ids, mask, torch.full_like(mask, -math.log(vocab)), scores,
                            scores > 0, [f"p{i}" for i in range(responses)], 1, pad_id=0, weight_version=0)


def timed(fn):
    synchronize()
    start = time.perf_counter()
    value = fn()
    synchronize()
    return time.perf_counter() - start, value


def phase(seconds: float, tokens: int, flops_per_token: float, peak_tflops: float) -> dict:
    per_s = tokens / seconds
    return {"seconds": seconds, "tokens_per_s": per_s,
            "model_flops_utilisation": flops_per_token * per_s / (peak_tflops * 1e12),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def learner_costs(cfg, policy: str, directory: Path, batch, peak: float) -> dict:
    """The bf16 learner's old log-probs and update on ``batch``, each timed after one warm-up."""
    start = time.perf_counter()
    n_policy = save_random_qwen3(policy, directory)
    learner = make_learner(cfg, str(directory), "bfloat16")
    costs: dict = {"learner_setup_seconds": time.perf_counter() - start, "policy_params": n_policy,
                   "learner_zero_stage": learner.engine.zero_optimization_stage()}
    tokens = int(batch.attention_mask.sum())
    for step in (0, 1):  # step 0 warms up
        free_memory_stats()
        seconds, _ = timed(functools.partial(learner.compute_old_logprobs, batch))
        costs["learner_old_logprobs"] = phase(seconds, tokens, 2 * n_policy, peak)
        learner.compute_advantages(step, torch.zeros_like(batch.response_mask))
        free_memory_stats()
        seconds, stats = timed(functools.partial(learner.update, step))
        costs["learner_update"] = {**phase(seconds, tokens, 6 * n_policy, peak),
                                   "optimizer_steps": stats["optimizer_steps"]}
    return costs


def critic_costs(cfg, critic: str, directory: Path, batch, peak: float) -> dict:
    """One bf16 mini-critic's values and its training on the whole of ``batch``, each timed after one warm-up."""
    n_critic = save_random_qwen3(critic, directory)
    actor = make_critic(cfg, str(directory), 0, "bfloat16")
    costs: dict = {"critic_params": n_critic}
    tokens, rows = int(batch.attention_mask.sum()), list(range(batch.num_sequences))
    for step in (0, 1):
        free_memory_stats()
        seconds, values = timed(functools.partial(actor.values, batch))
        costs["critic_values"] = phase(seconds, tokens, 2 * n_critic, peak)
        free_memory_stats()
        seconds, stats = timed(functools.partial(actor.update, values + 0.5 * batch.response_mask, rows, step))
        costs["critic_train"] = {**phase(seconds, tokens, 6 * n_critic, peak), "skipped_steps": stats["skipped_steps"]}
    return costs


def per_token_costs(policy: str, critic: str, responses: int, prompt_tokens: int, response_tokens: int,
                    learner_micro: int, critic_micro: int, out: dict, save) -> None:
    cfg = job_config("chain", "learner.epochs=1", f"learner.mini_batch_size={responses}",
                     f"learner.micro_batch_size={learner_micro}", f"critics.micro_batch_size={critic_micro}",
                     "critics.epochs=1", f"rollout.prompts_per_step={responses}", "rollout.samples_per_prompt=1",
                     "algorithm.estimator=gae", "critics.num_critics=1", "algorithm.adv_mask_fraction=0",
                     "algorithm.entropy_filter_fraction=0")
    batch = random_batch(responses, prompt_tokens, response_tokens, QWEN3_COMMON["vocab_size"])
    costs: dict = {"policy": policy, "critic": critic, "responses": responses, "prompt_tokens": prompt_tokens,
                   "response_tokens": response_tokens, "sequence_tokens": int(batch.attention_mask.sum()),
                   "learner_micro_batch": learner_micro, "critic_micro_batch": critic_micro}
    out["costs"] = costs
    with tempfile.TemporaryDirectory() as tmp:
        for role, measure, model in (("learner", learner_costs, policy), ("critic", critic_costs, critic)):
            if torch.cuda.is_available():  # what an earlier role left allocated counts in this role's peak
                costs[f"{role}_memory_before_gib"] = torch.cuda.memory_allocated() / 2**30
            try:  # one role failing (out of memory, say) keeps the other's numbers
                costs.update(measure(cfg, model, Path(tmp) / role, batch, out["matmul_tflops"]))
            except Exception as error:
                costs[f"{role}_error"] = "".join(traceback.format_exception_only(error)).strip()
                traceback.print_exc()
            free_memory()  # the role's engine is gone with its function's frame
            save()
    print(f"per-token costs: {json.dumps(costs)}", flush=True)


def free_memory_stats() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and ZeRO-0 only: runs on any machine")
    parser.add_argument("--task", default="chain", choices=["chain", "arithmetic"], help="part 1's task")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--policy", default="Qwen3-4B", choices=sorted(QWEN3))
    parser.add_argument("--critic", default="Qwen3-0.6B", choices=sorted(QWEN3))
    parser.add_argument("--responses", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--response-tokens", type=int, default=2048)
    parser.add_argument("--learner-micro-batch", type=int, default=1)
    parser.add_argument("--critic-micro-batch", type=int, default=4)
    parser.add_argument("--skip", nargs="*", default=[], choices=["bf16", "costs"])
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "gpu.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.task, args.stages, args.policy, args.critic = "arithmetic", [0], "tiny", "tiny"
        args.responses, args.prompt_tokens, args.response_tokens, args.critic_micro_batch = 2, 8, 16, 2
    elif not torch.cuda.is_available():
        print("bench_gpu.py measures the GPU paths and needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2

    out: dict = {"machine": {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                             "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}}
    with contextlib.suppress(ImportError):
        import deepspeed
        import transformers

        out["machine"].update(deepspeed=deepspeed.__version__, transformers=transformers.__version__)

    def save() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=1) + "\n")

    out["matmul_tflops"] = matmul_tflops()
    print(f"matmul: {out['matmul_tflops']:.0f} TFLOP/s", flush=True)
    if "bf16" not in args.skip:
        bf16_against_fp32(args.task, args.stages, prompts=8, group=4, out=out, save=save)
    if "costs" not in args.skip:
        per_token_costs(args.policy, args.critic, args.responses, args.prompt_tokens, args.response_tokens,
                        args.learner_micro_batch, args.critic_micro_batch, out, save)
    save()
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
