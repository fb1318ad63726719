"""How well can a critic fit the returns of a built-in task, given the data and the updates it gets?

The online diagnostics (docs/evidence.md) found the mini-critics' explained variance ≈ 0 on both built-in tasks.
This separates "the returns are not predictable" from "the critics are not trained enough": it samples rollouts
from the task's base policy once, then fits value models offline on them with plain Adam on the squared error to the
Monte-Carlo return (γ = λ = 1, so every token's return is the response's 0/1 reward) and reports the explained
variance on rollouts of other prompts after each number of optimizer steps.

A positive control fits the same value models to a fact of the prompt alone (does it start with an odd digit?), to
show that the fitting itself works. Two references bound what any critic could reach on the held-out rollouts:

* ``prompt-oracle``: each token gets the mean reward of the *other* samples of its prompt (leave-one-out): what a
  critic that knows every prompt's difficulty, and nothing about the response, would predict;
* ``prefix-oracle`` (``chain`` only): the mean reward, measured on the training rollouts, of responses whose first
  t tokens are the canonical solution's (per t), and 0-ish (the measured rate) for responses that left it: what a
  critic that checks every partial sum would predict.

    python benchmarks/critic_fit.py                      # chain, seed 0: ~15 min on 2 cores
    python benchmarks/critic_fit.py --task arithmetic
    python benchmarks/critic_fit.py --steps 2 --train-prompts 8 --test-prompts 8 --out /tmp/fit.json   # smoke

Writes ``benchmarks/results/critic_fit/<task>-seed-<k>.json`` (or ``--out``) and prints a table.

``--task words`` asks the question of a real pretrained model (docs/evidence.md, "Pretrained mini-critics"): the
rollouts are SmolLM2-135M-Instruct's answers to the ``words`` task through its chat template (temperature 0.7, as
examples/smollm2.yaml samples), and each *shape* is an ensemble of ``--critics`` value models trained as the critic
pool trains them, each on its own prompt shard (``asyppo.critics.sharding.prompt_shard``), all from the same start:

* ``pretrained-N``: the model's embeddings and first N of its 30 decoder layers (``model.critic_layers=N``);
* ``random-N``: the same shape, randomly initialised;
* ``tiny``: the shape of the tiny built-in critic (2 layers, hidden 16) with SmolLM2's vocabulary, random.

Per shape, on the held-out rollouts: each critic's explained variance, the ensemble mean's, and Spearman's ρ of the
critics' disagreement σ with the ensemble's error |V̄ − G| per token (what AsyPPO's masks assume is positive); and
the seconds and peak memory of a training step per token. Each shape runs in its own process (its peak memory is its
own) and writes its own file, skipped when present, so an interrupted study continues:

    python benchmarks/critic_fit.py --task words                                  # ~1 h on 2 cores
    python benchmarks/critic_fit.py --task words --shapes tiny,pretrained-2 --train-prompts 4 --test-prompts 4 \
        --samples 2 --steps 2 --out /tmp/words                                    # smoke

Writes ``benchmarks/results/critic_fit/words-seed-<k>/`` (or ``--out``): ``rollouts.json``, ``<shape>.json``,
``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from asyppo.core.diagnostics import explained_variance, rank_correlation
from asyppo.critics.sharding import prompt_shard
from asyppo.critics.value_model import ValueModel
from asyppo.tasks.chain import chain_solution
from asyppo.tasks.tiny_models import CHAIN_RECIPE, WarmupRecipe, ensure_builtin_models
from transformers import AutoTokenizer, GenerationConfig, Qwen2ForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"arithmetic": WarmupRecipe(), "chain": CHAIN_RECIPE}


def sample_rollouts(policy, tokenizer, problems, *, samples: int, max_new_tokens: int, seed: int,
                    verify: Callable[[str, str], bool], encode: Callable[[list[str]], list[list[int]]] | None = None,
                    temperature: float = 1.0):
    """``samples`` responses per problem at ``temperature`` (no top-k/top-p): token ids (prompt, response + EOS)
    and 0/1 rewards. ``encode`` turns prompt texts into ids (default: the raw text, no special tokens)."""
    encode = encode or (lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
    )
    rows = []
    torch.manual_seed(seed)
    for start in range(0, len(problems), 64):
        chunk = [p for p in problems[start : start + 64] for _ in range(samples)]
        prompt_ids = encode([p.prompt for p in chunk])
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
        with torch.no_grad():
            output = policy.generate(input_ids=input_ids, attention_mask=attention, generation_config=generation)
        for i, problem in enumerate(chunk):
            response = output[i, width:].tolist()
            if tokenizer.eos_token_id in response:  # keep the EOS (the rollout workers' responses end with it)
                response = response[: response.index(tokenizer.eos_token_id) + 1]
            else:
                response = [t for t in response if t != pad] or [tokenizer.eos_token_id]
            text = tokenizer.decode(response, skip_special_tokens=True)
            rows.append({
                "problem": problem.prompt, "problem_id": problem.id, "prompt_ids": prompt_ids[i],
                "response_ids": response, "text": text, "reward": float(verify(text, problem.answer)),
            })
    return rows


def to_batch(rows, pad_id: int):
    """Left-padded prompts and right-padded responses: ``input_ids``, ``attention_mask``, response ``mask``,
    per-token ``returns`` (the reward at every token) and the response length T (the project's batch layout)."""
    prompt_len = max(len(r["prompt_ids"]) for r in rows)
    response_len = max(len(r["response_ids"]) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, prompt_len + response_len), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    mask = torch.zeros(n, response_len)
    for i, r in enumerate(rows):
        p, s = r["prompt_ids"], r["response_ids"]
        input_ids[i, prompt_len - len(p) : prompt_len] = torch.tensor(p)
        input_ids[i, prompt_len : prompt_len + len(s)] = torch.tensor(s)
        attention[i, prompt_len - len(p) : prompt_len + len(s)] = 1
        mask[i, : len(s)] = 1
    returns = torch.tensor([r["reward"] for r in rows])[:, None] * mask
    return input_ids, attention, mask, returns, response_len


def predict(model: ValueModel, rows, pad_id: int, chunk: int = 256) -> torch.Tensor:
    values = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), chunk):
            ids, att, mask, _, t = to_batch(rows[start : start + chunk], pad_id)
            values.append(model.response_values(ids, att, t) * mask)
    width = max(v.shape[1] for v in values)
    return torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values])


def padded_targets(rows, pad_id: int):
    _, _, mask, returns, _ = to_batch(rows, pad_id)
    return mask, returns


def prompt_oracle(rows, mask: torch.Tensor) -> torch.Tensor:
    """Leave-one-out mean reward of the other samples of each row's prompt, at every token of the row."""
    by_problem: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_problem.setdefault(r["problem"], []).append(i)
    values = torch.zeros(len(rows))
    for members in by_problem.values():
        rewards = torch.tensor([rows[i]["reward"] for i in members])
        for j, i in enumerate(members):
            others = torch.cat([rewards[:j], rewards[j + 1 :]])
            values[i] = others.mean() if len(others) else rewards.mean()
    return values[:, None] * mask


def _on_canonical_path(row, tokenizer) -> list[bool]:
    """For each response position t: are the first t tokens (the state before token t) the canonical solution's?"""
    canonical = tokenizer(chain_solution(row["problem"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    flags, on_path = [], True
    for t, token in enumerate(row["response_ids"]):
        flags.append(on_path)
        on_path = on_path and t < len(canonical) and token == canonical[t]
    return flags


def prefix_oracle(train_rows, test_rows, mask: torch.Tensor, tokenizer) -> torch.Tensor:
    """Mean training reward per (position, on the canonical path or not), applied to the test rows' tokens."""
    sums: dict[tuple[int, bool], list[float]] = {}
    for row in train_rows:
        for t, on_path in enumerate(_on_canonical_path(row, tokenizer)):
            total = sums.setdefault((t, on_path), [0.0, 0.0])
            total[0] += row["reward"]
            total[1] += 1
    overall = sum(r["reward"] for r in train_rows) / len(train_rows)
    values = torch.zeros_like(mask)
    for i, row in enumerate(test_rows):
        for t, on_path in enumerate(_on_canonical_path(row, tokenizer)):
            total = sums.get((t, on_path))
            values[i, t] = total[0] / total[1] if total else overall
    return values * mask


def regression_step(model: ValueModel, optimizer, ids, att, mask, returns, response_len: int) -> None:
    """One Adam step on ``0.5·token-mean((V − y)²)`` over a batch, gradients clipped at norm 1."""
    values = model.response_values(ids, att, response_len)
    loss = 0.5 * (((values - returns) ** 2) * mask).sum() / mask.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def fit(model: ValueModel, train_rows, test_rows, *, steps: int, batch_size: int, lr: float, pad_id: int, seed: int,
        report_at: list[int], test_mask, test_returns, train_targets=None) -> list[dict[str, float]]:
    """Adam on ``0.5·token-mean((V − y)²)`` over random training mini-batches, ``y`` the return (or, with
    ``train_targets[i]``, that row's per-token targets); at each ``report_at`` step the EV against the real returns
    of the test rows and of the first 2048 training rows (what it fits vs what generalises)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    seen_rows = train_rows[:2048]
    seen_mask, seen_returns = padded_targets(seen_rows, pad_id)
    curve = []
    for step in range(steps + 1):
        if step in report_at:
            ev = explained_variance(predict(model, test_rows, pad_id), test_returns, test_mask)
            train_ev = explained_variance(predict(model, seen_rows, pad_id), seen_returns, seen_mask)
            curve.append({"step": step, "test_explained_var": ev, "train_explained_var": train_ev})
            print(f"    step {step:5d}  test EV {ev:+.3f}  train EV {train_ev:+.3f}", flush=True)
        if step == steps:
            break
        model.train()
        picked = torch.randint(len(train_rows), (batch_size,), generator=generator).tolist()
        ids, att, mask, returns, t = to_batch([train_rows[i] for i in picked], pad_id)
        if train_targets is not None:
            returns = torch.stack([torch.nn.functional.pad(train_targets[i], (0, t - len(train_targets[i])))[:t]
                                   for i in picked]) * mask
        regression_step(model, optimizer, ids, att, mask, returns, t)
    return curve


# ---- pretrained mini-critics: the words task on SmolLM2-135M-Instruct ----------------------------------------------

PRETRAINED = "smollm2-135m-instruct"
WORDS_SHAPES = ("tiny", "random-4", "pretrained-4", "random-8", "pretrained-8", "random-30", "pretrained-30")


def words_rollouts(out: Path, *, train_prompts: int | None, test_prompts: int | None, samples: int, seed: int,
                   temperature: float, max_new_tokens: int) -> dict:
    """SmolLM2's sampled answers to the words task's train and held-out problems, made once and kept in
    ``out/rollouts.json`` (the shapes all fit the same rollouts)."""
    path = out / "rollouts.json"
    if path.exists():
        return json.loads(path.read_text())
    from transformers import AutoModelForCausalLM

    from asyppo.tasks.model_cache import default_cache_dir
    from asyppo.tasks.pretrained import ensure_pretrained
    from asyppo.tasks.prompts import PromptFormat, encode_prompts
    from asyppo.tasks.registry import TASKS

    model_dir = ensure_pretrained(PRETRAINED, default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    task = TASKS["words"]
    chat = PromptFormat(chat_template=True)  # examples/smollm2.yaml's prompts: the model's chat template

    def sample(split: str, count: int | None, split_seed: int) -> list[dict]:
        return sample_rollouts(policy, tokenizer, task.builtin_problems(count, split=split, seed=seed),
                               samples=samples, max_new_tokens=max_new_tokens, seed=split_seed, verify=task.verify,
                               encode=lambda texts: encode_prompts(tokenizer, texts, chat), temperature=temperature)

    started = time.perf_counter()
    rollouts = {"model": str(model_dir), "temperature": temperature, "samples_per_prompt": samples,
                "max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                "train": sample("train", train_prompts, seed), "test": sample("eval", test_prompts, seed + 1)}
    rollouts["seconds"] = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rollouts) + "\n")
    return rollouts


def build_shape(shape: str, model_dir: str, seed: int) -> ValueModel:
    """One critic of ``shape`` (module docstring); every critic of a shape starts from the same weights, as the
    pool's critics do (a zero head on the same backbone: they differ by their data alone)."""
    from transformers import AutoConfig

    torch.manual_seed(seed)
    if shape == "tiny":
        tiny = AutoConfig.from_pretrained(ensure_builtin_models(seed=0, log=lambda line: None).critic_dir)
        smol = AutoConfig.from_pretrained(model_dir)
        tiny.vocab_size, tiny.pad_token_id = smol.vocab_size, smol.pad_token_id
        tiny.bos_token_id, tiny.eos_token_id = smol.bos_token_id, smol.eos_token_id
        tiny.max_position_embeddings = smol.max_position_embeddings
        return ValueModel.from_config(tiny)
    init, layers = shape.rsplit("-", 1)
    if init == "pretrained":
        return ValueModel.from_pretrained(model_dir, num_layers=int(layers))
    if init == "random":
        return ValueModel.from_config(AutoConfig.from_pretrained(model_dir), num_layers=int(layers))
    raise ValueError(f"unknown shape {shape!r}: one of {', '.join(WORDS_SHAPES)} (any N of the 30 layers)")


def train_critic(model: ValueModel, rows: list[dict], *, steps: int, batch_size: int, lr: float, head_lr: float,
                 pad_id: int, seed: int) -> dict:
    """Adam on ``0.5·token-mean((V − G)²)`` over random mini-batches of ``rows``: the backbone at ``lr``, the value
    head's weight at ``head_lr`` and its bias at ``10·head_lr`` (a zero head must reach the returns' scale, and
    their mean, within a few dozen steps); returns the seconds and tokens of the training steps."""
    optimizer = torch.optim.Adam([{"params": model.backbone.parameters(), "lr": lr},
                                  {"params": [model.value_head.weight], "lr": head_lr},
                                  {"params": [model.value_head.bias], "lr": 10 * head_lr}])
    generator = torch.Generator().manual_seed(seed)
    model.train()
    seconds, tokens = 0.0, 0
    for _ in range(steps):
        picked = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
        ids, att, mask, returns, t = to_batch([rows[i] for i in picked], pad_id)
        started = time.perf_counter()
        regression_step(model, optimizer, ids, att, mask, returns, t)
        seconds += time.perf_counter() - started
        tokens += int(att.sum())
    return {"train_seconds": seconds, "train_tokens": tokens}


def peak_rss_gib() -> float:
    """This process's peak resident memory (``VmHWM``: unlike ``getrusage``'s ``ru_maxrss``, which Linux carries
    over from the parent through fork and exec, it starts afresh with the program)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def ensemble_report(values: list[torch.Tensor], returns: torch.Tensor, mask: torch.Tensor) -> dict:
    """What the masks rely on, on held-out tokens: each critic's explained variance, the ensemble mean V̄'s, and
    Spearman's ρ of σ (the critics' per-token std) with |V̄ − G|."""
    stacked = torch.stack(values)
    mean, sigma = stacked.mean(0), stacked.std(0, unbiased=False)
    valid = mask > 0
    return {
        "critic_explained_var": [explained_variance(v, returns, mask) for v in values],
        "ensemble_explained_var": explained_variance(mean, returns, mask),
        "sigma_error_spearman": rank_correlation(sigma, (mean - returns).abs(), mask),
        "sigma_p50": float(sigma[valid].median()), "sigma_p90": float(sigma[valid].quantile(0.9)),
        "abs_error_mean": float((mean - returns).abs()[valid].mean()),
    }


def fit_shape(shape: str, rollouts: dict, *, critics: int, steps: int, batch_size: int, lr: float, head_lr: float,
              seed: int) -> dict:
    """``critics`` critics of ``shape``, each trained on its prompt shard of the training rollouts, then scored on
    the held-out ones (this process's peak memory is the shape's)."""
    train, test = rollouts["train"], rollouts["test"]
    pad = rollouts["pad_token_id"]
    test_mask, test_returns = padded_targets(test, pad)
    values, costs, parameters = [], [], 0
    for index in range(critics):
        shard = [row for row in train if prompt_shard(row["problem_id"], critics) == index]
        if not shard:
            raise SystemExit(f"critic {index} of {critics} has no training prompt in its shard: more --train-prompts")
        model = build_shape(shape, rollouts["model"], seed)
        parameters = sum(p.numel() for p in model.parameters())
        print(f"  {shape}: critic {index} on {len(shard)} responses", flush=True)
        costs.append(train_critic(model, shard, steps=steps, batch_size=batch_size, lr=lr, head_lr=head_lr,
                                  pad_id=pad, seed=seed + index))
        values.append(predict(model, test, pad))
    seconds = sum(c["train_seconds"] for c in costs)
    tokens = sum(c["train_tokens"] for c in costs)
    return {
        "shape": shape, "parameters": parameters, "critics": critics, "steps": steps, "batch_size": batch_size,
        "lr": lr, "head_lr": head_lr, **ensemble_report(values, test_returns, test_mask),
        "train_ms_per_token": 1000 * seconds / tokens,
        "peak_rss_gib": peak_rss_gib(),
    }


def words_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="pretrained mini-critics on the words task (module docstring)")
    parser.add_argument("--task", choices=["words"], default="words")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", default=",".join(WORDS_SHAPES))
    parser.add_argument("--critics", type=int, default=2, help="critics per ensemble (critics.num_critics)")
    parser.add_argument("--train-prompts", type=int, help="training problems (default: the whole train split)")
    parser.add_argument("--test-prompts", type=int, help="held-out problems (default: the whole eval split)")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt (examples/smollm2.yaml's)")
    parser.add_argument("--steps", type=int, default=60, help="Adam steps of each critic")
    parser.add_argument("--batch-size", type=int, default=16, help="responses per step")
    parser.add_argument("--lr", type=float, default=3e-5, help="the backbone's learning rate, pretrained shapes")
    parser.add_argument("--random-lr", type=float, default=3e-4, help="the backbone's, randomly initialised shapes")
    parser.add_argument("--head-lr", type=float, default=1e-3, help="the value head's weight's (its bias: 10x)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one-shape", help=argparse.SUPPRESS)  # the per-shape child process
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()  # a cut model's load report lists the layers it leaves out
    transformers.logging.disable_progress_bar()
    out = args.out or REPO_ROOT / "benchmarks" / "results" / "critic_fit" / f"words-seed-{args.seed}"
    rollouts = words_rollouts(out, train_prompts=args.train_prompts, test_prompts=args.test_prompts,
                              samples=args.samples, seed=args.seed, temperature=0.7, max_new_tokens=16)
    if args.one_shape:
        shape = args.one_shape
        lr = args.lr if shape.startswith("pretrained") else args.random_lr
        result = fit_shape(shape, rollouts, critics=args.critics, steps=args.steps, batch_size=args.batch_size,
                           lr=lr, head_lr=args.head_lr, seed=args.seed)
        (out / f"{shape}.json").write_text(json.dumps(result, indent=2) + "\n")
        return

    train, test = rollouts["train"], rollouts["test"]
    print(f"rollouts: {len(train)} train, {len(test)} held-out responses, mean reward "
          f"{sum(r['reward'] for r in train) / len(train):.3f} / {sum(r['reward'] for r in test) / len(test):.3f}")
    shapes = args.shapes.split(",")
    for shape in shapes:
        if (out / f"{shape}.json").exists():
            continue
        child = [arg for arg in argv if not arg.startswith("--one-shape")]
        subprocess.run([sys.executable, __file__, *child, "--out", str(out), "--one-shape", shape], check=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    mask, returns = padded_targets(test, rollouts["pad_token_id"])
    summary = {
        "rollouts": {"train_responses": len(train), "test_responses": len(test),
                     "train_reward_mean": sum(r["reward"] for r in train) / len(train),
                     "test_reward_mean": sum(r["reward"] for r in test) / len(test),
                     "temperature": rollouts["temperature"], "samples_per_prompt": rollouts["samples_per_prompt"]},
        "prompt_oracle_explained_var": explained_variance(prompt_oracle(test, mask), returns, mask),
        "shapes": [json.loads((out / f"{shape}.json").read_text()) for shape in shapes],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| critics | parameters | held-out EV per critic | EV of V̄ | ρ(σ, abs(V̄ − G)) | σ p50 | ms per token "
             "(train) | peak memory |", "|---|---|---|---|---|---|---|---|"]
    for row in summary["shapes"]:
        lines.append(f"| {row['critics']} × {row['shape']} | {row['parameters'] / 1e6:.1f}M | "
                     + ", ".join(f"{ev:+.3f}" for ev in row["critic_explained_var"])
                     + f" | {row['ensemble_explained_var']:+.3f} | {row['sigma_error_spearman']:+.3f} | "
                     f"{row['sigma_p50']:.4f} | {row['train_ms_per_token']:.2f} | {row['peak_rss_gib']:.1f} GiB |")
    lines.append(f"| reference: prompt-oracle | | | {summary['prompt_oracle_explained_var']:+.3f} | | | | |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n\nwrote {out}")


def main() -> None:
    if "--task" in sys.argv and sys.argv[sys.argv.index("--task") + 1:][:1] == ["words"]:
        words_main(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=[*sorted(RECIPES), "words"], default="chain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-prompts", type=int, default=1024)
    parser.add_argument("--test-prompts", type=int, default=256)
    parser.add_argument("--samples", type=int, default=8, help="responses per prompt (the rollout's group size)")
    parser.add_argument("--steps", type=int, default=700, help="Adam steps of each fit")
    parser.add_argument("--batch-size", type=int, default=128, help="responses per step (one critic's shard of a "
                        "default rollout step: 32 prompts x 8 / 2 critics)")
    parser.add_argument("--lrs", default="1e-3,3e-3", help="comma-separated learning rates")
    parser.add_argument("--backbones", default="critic,policy", help="value models to fit: the built-in critic "
                        "checkpoint and/or the policy checkpoint (the policy-sized critic)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    recipe = RECIPES[args.task]
    out = args.out or REPO_ROOT / "benchmarks" / "results" / "critic_fit" / f"{args.task}-seed-{args.seed}.json"

    models = ensure_builtin_models(seed=args.seed, recipe=recipe, log=lambda line: None)
    tokenizer = AutoTokenizer.from_pretrained(models.policy_dir)
    policy = Qwen2ForCausalLM.from_pretrained(models.policy_dir).eval()
    started = time.perf_counter()
    train_problems = recipe.problems(args.train_prompts, "train", args.seed)
    test_problems = recipe.problems(args.test_prompts, "eval", args.seed)
    common = dict(samples=args.samples, max_new_tokens=recipe.max_response_tokens, verify=recipe.verify)
    train_rows = sample_rollouts(policy, tokenizer, train_problems, seed=args.seed, **common)
    test_rows = sample_rollouts(policy, tokenizer, test_problems, seed=args.seed + 1, **common)
    print(f"rollouts: {len(train_rows)} train, {len(test_rows)} test, mean reward "
          f"{sum(r['reward'] for r in train_rows) / len(train_rows):.3f} / "
          f"{sum(r['reward'] for r in test_rows) / len(test_rows):.3f} ({time.perf_counter() - started:.0f} s)")

    pad = tokenizer.pad_token_id
    test_mask, test_returns = padded_targets(test_rows, pad)
    references = {  # (a constant prediction has EV 0 whatever the constant: EV ignores bias)
        "prompt-oracle": explained_variance(prompt_oracle(test_rows, test_mask), test_returns, test_mask),
    }
    if args.task == "chain":
        references["prefix-oracle"] = explained_variance(
            prefix_oracle(train_rows, test_rows, test_mask, tokenizer), test_returns, test_mask)
    for name, ev in references.items():
        print(f"  reference {name:30s} test EV {ev:+.3f}")

    report_at = sorted({s for s in (0, 25, 50, 100, 200, 400, 700, 1000, args.steps) if s <= args.steps})
    targets = {"returns": None}
    if args.task == "chain":
        # Regressing to the prefix oracle's values instead of the 0/1 returns: can the value model represent (and
        # learn from this much data) what the oracle knows, once the labels carry no sampling noise?
        train_mask, _ = padded_targets(train_rows, pad)
        oracle = prefix_oracle(train_rows, train_rows, train_mask, tokenizer)
        targets["prefix-oracle values"] = [oracle[i, : len(r["response_ids"])] for i, r in enumerate(train_rows)]
    backbones = {"critic checkpoint": models.critic_dir, "policy checkpoint": models.policy_dir}
    fits = []
    for target_name, train_targets in targets.items():
        for backbone in args.backbones.split(","):
            for lr in (float(x) for x in args.lrs.split(",")):
                if train_targets is not None and lr != float(args.lrs.split(",")[0]):
                    continue  # the noise-free target needs one learning rate only
                name = f"{backbone} checkpoint"
                print(f"  fitting a value model on the {name} to the {target_name}, lr {lr:g}", flush=True)
                torch.manual_seed(args.seed)
                model = ValueModel.from_pretrained(backbones[name])
                fit_started = time.perf_counter()
                curve = fit(model, train_rows, test_rows, steps=args.steps, batch_size=args.batch_size, lr=lr,
                            pad_id=pad, seed=args.seed, report_at=report_at, test_mask=test_mask,
                            test_returns=test_returns, train_targets=train_targets)
                fits.append({"backbone": name, "target": target_name, "lr": lr,
                             "parameters": sum(p.numel() for p in model.parameters()),
                             "seconds": round(time.perf_counter() - fit_started, 1), "curve": curve})

    # Positive control: the same fit with the reward replaced by a fact of the prompt alone (does it start with an
    # odd digit?), scored against that target. A value model that learns it shows the fitting pipeline works.
    def control(rows):
        return [{**r, "reward": float(ord(r["problem"][0]) % 2)} for r in rows]

    control_train, control_test = control(train_rows), control(test_rows)
    control_mask, control_returns = padded_targets(control_test, pad)
    control_steps = min(200, args.steps)
    controls = []
    for backbone in args.backbones.split(","):
        name = f"{backbone} checkpoint"
        print(f"  positive control: the {name} fitted to 'does the prompt start with an odd digit?'", flush=True)
        torch.manual_seed(args.seed)
        model = ValueModel.from_pretrained(backbones[name])
        curve = fit(model, control_train, control_test, steps=control_steps, batch_size=args.batch_size,
                    lr=float(args.lrs.split(",")[0]), pad_id=pad, seed=args.seed,
                    report_at=[s for s in report_at if s <= control_steps], test_mask=control_mask,
                    test_returns=control_returns)
        controls.append({"backbone": name, "target": "1 if the prompt's first character has an odd code point",
                         "curve": curve})

    result = {
        "task": args.task, "seed": args.seed, "train_responses": len(train_rows), "test_responses": len(test_rows),
        "samples_per_prompt": args.samples, "batch_size": args.batch_size, "steps": args.steps,
        "train_reward_mean": sum(r["reward"] for r in train_rows) / len(train_rows),
        "test_reward_mean": sum(r["reward"] for r in test_rows) / len(test_rows),
        "references": references, "fits": fits, "positive_controls": controls,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\nexplained variance of the held-out returns (train rows' in brackets) after each number of Adam steps")
    print("| value model | fitted to | lr | " + " | ".join(f"{p['step']}" for p in fits[0]["curve"]) + " |")
    print("|---|---|---|" + "---|" * len(fits[0]["curve"]))
    for f in fits:
        print(f"| {f['backbone']} ({f['parameters'] / 1e6:.2f}M) | {f['target']} | {f['lr']:g} | " + " | ".join(
            f"{p['test_explained_var']:+.3f} ({p['train_explained_var']:+.2f})" for p in f["curve"]) + " |")
    for name, ev in references.items():
        print(f"| {name} | | | {ev:+.3f} |")
    for c in controls:
        print(f"| positive control: {c['backbone']} | odd first digit? | | " + " | ".join(
            f"{p['test_explained_var']:+.3f}" for p in c["curve"]) + " |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
