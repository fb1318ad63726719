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
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from asyppo.core.diagnostics import explained_variance
from asyppo.critics.value_model import ValueModel
from asyppo.tasks.chain import chain_solution
from asyppo.tasks.tiny_models import CHAIN_RECIPE, WarmupRecipe, ensure_builtin_models
from transformers import AutoTokenizer, GenerationConfig, Qwen2ForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"arithmetic": WarmupRecipe(), "chain": CHAIN_RECIPE}


def sample_rollouts(policy, tokenizer, problems, *, samples: int, max_new_tokens: int, seed: int, recipe):
    """``samples`` temperature-1 responses per problem: token ids (prompt, response + EOS) and 0/1 rewards."""
    generation = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    rows = []
    torch.manual_seed(seed)
    for start in range(0, len(problems), 64):
        chunk = [p for p in problems[start : start + 64] for _ in range(samples)]
        encoded = tokenizer([p.prompt for p in chunk], add_special_tokens=False, padding=True, padding_side="left",
                            return_tensors="pt")
        with torch.no_grad():
            output = policy.generate(**encoded, generation_config=generation)
        prompt_width = encoded["input_ids"].shape[1]
        for i, problem in enumerate(chunk):
            response = output[i, prompt_width:].tolist()
            if tokenizer.eos_token_id in response:  # keep the EOS (the rollout workers' responses end with it)
                response = response[: response.index(tokenizer.eos_token_id) + 1]
            response = [t for t in response if t != tokenizer.pad_token_id] or [tokenizer.eos_token_id]
            text = tokenizer.decode(response, skip_special_tokens=True)
            rows.append({
                "problem": problem.prompt, "prompt_ids": tokenizer(problem.prompt, add_special_tokens=False)["input_ids"],
                "response_ids": response, "text": text, "reward": float(recipe.verify(text, problem.answer)),
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
        values = model.response_values(ids, att, t)
        loss = 0.5 * (((values - returns) ** 2) * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(RECIPES), default="chain")
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
    common = dict(samples=args.samples, max_new_tokens=recipe.max_response_tokens, recipe=recipe)
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
