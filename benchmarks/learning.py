"""Learning curves over seeds: variants of a job compared at equal rollout budgets, resumable run by run.

An experiment is a question and a few variants (config overrides on a common job). Every (variant, seed) run is a
whole training job; it writes one result file, ``<out>/<variant>/seed-<k>.json``, and a run whose file exists is
skipped, so an interrupted grid continues where it stopped (commit the files as they arrive). With every run of a
variant in, the summary gives held-out accuracy at the start and the end, the gain, and mean ± std over seeds, paired
by seed (every variant of a seed starts from the same bootstrapped base); ``curves.png`` plots the held-out accuracy
per evaluation with a band of ± one std over seeds.

    python benchmarks/learning.py critic-warmup                  # 2 variants × 3 seeds × 100 steps: ~25 min on 2 cores
    python benchmarks/learning.py critic-warmup --summary-only   # the table from the files already there
    python benchmarks/learning.py critic-warmup --steps 2 --seeds 0 --variants skip-masks --out /tmp/smoke  # smoke

Writes ``benchmarks/results/learning/<experiment>/`` (or ``--out``): the per-run files, ``summary.json``,
``summary.md``, ``curves.png`` (held-out accuracy per evaluation) and ``mechanisms.png`` (training reward, entropy, the
share of tokens ERC keeps and the critics' explained variance, per step).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from asyppo.common.config import PRESETS

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "learning"
# Per-step numbers kept in each result file (docs/algorithms.md §7), enough to redraw any curve without the run.
STEP_KEYS = ("reward_mean", "accuracy", "entropy_mean", "response_length", "erc_kept_frac", "adv_mask_frac",
             "entropy_filter_frac", "masks_skipped", "optimizer_steps", "policy_loss", "approx_kl", "time_step",
             "rollout_responses", "uniform_groups_frac", "dynamic_sampling_rounds", "value_explained_var",
             "sigma_error_spearman", "adv_mask_grad_share_removed", "erc_grad_share_removed", "clip_frac",
             "time_rollout", "time_old_logprobs", "time_values", "time_update", "time_critic_train",
             "time_weight_sync", "rollout_tokens_per_s",
             *(f"{mask}_frac_{third}_third" for mask in ("adv_mask", "entropy_filter", "erc_removed")
               for third in ("first", "middle", "last")))


@dataclass(frozen=True)
class Experiment:
    question: str
    variants: dict[str, list[str]]  # name → overrides on top of ``common``
    common: list[str] = field(default_factory=list)
    seeds: tuple[int, ...] = (0, 1, 2)
    config: str | None = None  # a job file of the repository under ``common`` (e.g. examples/smollm2.yaml)


# The chain task (examples/chain.yaml): its data, its built-in models, room for its longest response.
CHAIN = ["data.task=chain", "data.train=builtin:chain", "data.eval=builtin:chain", "rollout.max_new_tokens=48"]

EXPERIMENTS = {
    "critic-warmup": Experiment(
        question="At the start the critics' heads are zero, so σ is flat and the masks carry no information "
                 "(docs/algorithms.md §4). Is it better to skip the masks while σ is flat (the default) or to train "
                 "the critics alone for the first steps before the policy moves? Equal rollout budgets: the warm-up "
                 "steps count against the 100.",
        variants={
            "skip-masks": [],
            "critic-warmup-5": ["algorithm.critic_warmup_steps=5"],
        },
        common=["trainer.steps=100"],
    ),
    "chain-screen": Experiment(
        question="On the chain task (docs/tasks.md), GRPO gains quickly while the default AsyPPO preset loses accuracy. "
                 "Which part of AsyPPO is responsible? One seed, 30 steps each, to screen before the full grid.",
        variants={
            "asyppo": [],
            "asyppo-no-erc": ["algorithm.erc_band=null"],
            "asyppo-no-masks": ["algorithm.adv_mask_fraction=0", "algorithm.entropy_filter_fraction=0"],
            "ppo": ["preset=ppo"],
            "grpo": ["preset=grpo"],
        },
        common=[*CHAIN, "trainer.steps=30", "trainer.eval_every=10"],
        seeds=(0,),
    ),
    "erc-band": Experiment(
        question="ERC stops the gradient of tokens whose entropy moved outside [low, high] since the step began "
                 "(docs/algorithms.md §5). On the chain task its 0.95-1.05 band holds AsyPPO back. How wide must the "
                 "band be before it stops hurting, how much of the gradient does each band remove, and does it hurt "
                 "through the entropy bonus it leaves untouched?",
        variants={
            "band-0.95-1.05": [],
            "band-0.9-1.1": ["algorithm.erc_band=[0.9,1.1]"],
            "band-0.8-1.25": ["algorithm.erc_band=[0.8,1.25]"],
            "band-0.5-2": ["algorithm.erc_band=[0.5,2.0]"],
            "no-erc": ["algorithm.erc_band=null"],
            # Is it ERC alone, or ERC with the entropy bonus that it leaves untouched?
            "band-0.95-1.05-no-entropy-bonus": ["algorithm.entropy_coef=0"],
            "grpo-with-erc": ["preset=grpo", "algorithm.erc_band=[0.95,1.05]"],
        },
        common=[*CHAIN, "trainer.steps=30", "trainer.eval_every=10"],
        seeds=(0,),
    ),
    "erc-where": Experiment(
        question="Where in the response does ERC remove tokens, beside the advantage mask and the entropy filter? "
                 "erc-band's default variant again (the same job, so the same numbers), now that the removal is "
                 "logged by thirds of the response (docs/algorithms.md §7).",
        variants={"asyppo": []},
        common=[*CHAIN, "trainer.steps=30", "trainer.eval_every=10"],
        seeds=(0,),
    ),
    "critic-fit": Experiment(
        question="On the chain task the critics' values explain none of the return's variance (value_explained_var "
                 "≈ 0): σ and the masks then carry no information. Do more critic updates per step, or a critic "
                 "backbone that knows the task (the policy's own model), fit the returns?",
        variants={
            "asyppo": [],
            "critic-epochs-4": ["critics.epochs=4"],
            "critic-of-policy-model": ["model.critic=policy"],
            "critic-of-policy-model-epochs-4": ["model.critic=policy", "critics.epochs=4"],
        },
        common=[*CHAIN, "trainer.steps=30", "trainer.eval_every=10"],
        seeds=(0,),
    ),
    **{
        f"presets-{task}": Experiment(
            question=f"Every preset (docs/algorithms.md §6) on the {task} task, 3 seeds, 100 steps of the same batch "
                     "size (dapo-erc's dynamic sampling generates more responses per step: see that column).",
            variants={preset: [f"preset={preset}"] for preset in PRESETS},
            common=[*task_overrides, "trainer.steps=100"],
        )
        for task, task_overrides in (("arithmetic", []), ("chain", CHAIN))
    },
    "ablations-chain": Experiment(
        question="AsyPPO's parts on the chain task, each removed or changed alone from the default preset.",
        variants={
            "asyppo": [],
            "no-adv-mask": ["algorithm.adv_mask_fraction=0"],
            "no-entropy-filter": ["algorithm.entropy_filter_fraction=0"],
            "no-erc": ["algorithm.erc_band=null"],
            "critics-3": ["critics.num_critics=3"],
            "critics-4": ["critics.num_critics=4"],
            "response-split": ["algorithm.critic_split=response"],
        },
        common=[*CHAIN, "trainer.steps=100"],
    ),
    "masks-chain": Experiment(
        question="Do AsyPPO's masks help once ERC is gone? ablations-chain removed them from the default preset, "
                 "where ERC's seed-to-seed spread hides their effect; here they are removed from asyppo-only "
                 "(docs/algorithms.md §6: the ensemble and the masks, no ERC, symmetric clip).",
        variants={
            "asyppo-only": [],
            "no-adv-mask": ["algorithm.adv_mask_fraction=0"],
            "no-entropy-filter": ["algorithm.entropy_filter_fraction=0"],
            "no-masks": ["algorithm.adv_mask_fraction=0", "algorithm.entropy_filter_fraction=0"],
        },
        common=[*CHAIN, "trainer.steps=100", "preset=asyppo-only"],
    ),
    "methods-smollm2": Experiment(
        question="On a real pretrained model (SmolLM2-135M-Instruct, the words task, examples/smollm2.yaml: critics "
                 "cut to 8 of its 30 layers, learning rates of the papers' scale), do AsyPPO's parts help, and what "
                 "share of the tokens does ERC's [0.95, 1.05] band keep at such a learning rate? ~1 min a step.",
        variants={
            "asyppo": [],
            "asyppo-only": ["preset=asyppo-only"],
            "ppo": ["preset=ppo"],
            "grpo": ["preset=grpo"],
        },
        config="examples/smollm2.yaml",
        common=["trainer.steps=30", "trainer.eval_every=10"],
        seeds=(0, 1),
    ),
}


def run_one(experiment: str, spec: Experiment, variant: str, seed: int, steps: int | None, extra: list[str],
            scratch: Path) -> dict:
    """One whole training job; returns its result record."""
    from asyppo.common.config import build_config
    from asyppo.cluster.driver import train
    from asyppo.cluster.metrics import read_metrics

    overrides = [*spec.common, *spec.variants[variant], *extra, f"trainer.seed={seed}"]
    if steps is not None:
        overrides.append(f"trainer.steps={steps}")
    name = f"{variant}-seed{seed}"
    raw = yaml.safe_load((REPO_ROOT / spec.config).read_text()) if spec.config else None
    cfg = build_config(raw, overrides=[*overrides, f"trainer.run_dir={scratch}", f"trainer.name={name}",
                                  "logging.wandb_mode=disabled", "logging.console=false",
                                  "logging.ray_metrics=false", "trainer.checkpoint_every=0"])
    started = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - started
    run_path = Path(summary["run_dir"])
    lines = read_metrics(run_path / "metrics.jsonl")
    evals = read_metrics(run_path / "eval.jsonl")
    return {
        "experiment": experiment, "variant": variant, "seed": seed, "config": spec.config, "overrides": overrides,
        "steps": cfg.trainer.steps,
        "base_accuracy": summary.get("base_accuracy"), "final_accuracy": summary.get("final_accuracy"),
        "eval": [{"step": line["step"], "accuracy": line["eval_accuracy"],
                  "accuracy_greedy": line.get("eval_accuracy_greedy")} for line in evals],
        "per_step": {key: [line.get(key) for line in lines] for key in STEP_KEYS},
        "wall_seconds": seconds, "commit": _commit(), "machine": f"{platform.machine()}, {_cores()} cores",
    }


def run_missing(experiment: str, spec: Experiment, out: Path, variants: list[str], seeds: list[int],
                steps: int | None = None, extra: list[str] | None = None) -> None:
    """Run every (variant, seed) whose ``out/<variant>/seed-<seed>.json`` does not exist yet, writing each result
    as it finishes: an interrupted grid picks up where it stopped (benchmarks/bench_steps.py runs its variants the
    same way)."""
    todo = [(v, s) for s in seeds for v in variants if not (out / v / f"seed-{s}.json").exists()]
    print(f"{experiment}: {len(todo)} run(s) to do, {len(seeds) * len(variants) - len(todo)} already there ({out})",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="asyppo-learning-") as scratch:
        for number, (variant, seed) in enumerate(todo, 1):
            print(f"[{number}/{len(todo)}] {variant}, seed {seed} ...", end=" ", flush=True)
            record = run_one(experiment, spec, variant, seed, steps, extra or [], Path(scratch))
            target = out / variant / f"seed-{seed}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(record, indent=1) + "\n")
            step_s = statistics.mean(record["per_step"]["time_step"][1:] or record["per_step"]["time_step"])
            print(f"held-out {record['base_accuracy']:.3f} -> {record['final_accuracy']:.3f}, {step_s:.2f} s/step "
                  f"({record['wall_seconds'] / 60:.1f} min)", flush=True)


# What each mechanism did in a run (docs/algorithms.md §7 logs them per step); the column names of the summary.
MECHANISMS = {
    "erc_kept": "tokens ERC keeps",
    "erc_grad_removed": "gradient weight ERC removes",
    "adv_mask_grad_removed": "gradient weight the advantage mask removes",
    "entropy_change_std": "std of the per-step entropy change",
    "explained_var_last10": "critics' explained variance, last 10 steps",
    "sigma_error_spearman": "σ–error rank correlation",
    "response_length": "response length (tokens)",
}
DIGITS = {"entropy_change_std": 4, "response_length": 1}  # where 3 decimals would hide the differences


def mechanisms(record: dict) -> dict[str, float | None]:
    """One run's mechanism numbers, from its per-step metrics: the mean over steps of the share of tokens ERC keeps,
    of the gradient weight ``|A|·(1 − π(a))`` that ERC and the advantage mask remove, of σ's Spearman correlation
    with the ensemble's error and of the response length; the critics' explained variance averaged over the last
    10 steps; and the population std over steps of the step-to-step change of the mean entropy (how much entropy
    swings). Steps where a number is undefined (NaN: σ flat at step 0; absent: the method has no critic) are left
    out; a number no step defines is None."""
    per_step = record["per_step"]

    def finite(key: str, last: int | None = None) -> list[float]:
        values = per_step.get(key) or []
        if last:
            values = values[-last:]
        return [v for v in values if v is not None and math.isfinite(v)]

    def mean(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    entropy = finite("entropy_mean")
    changes = [after - before for before, after in zip(entropy, entropy[1:])]
    return {
        "erc_kept": mean(finite("erc_kept_frac")),
        "erc_grad_removed": mean(finite("erc_grad_share_removed")),
        "adv_mask_grad_removed": mean(finite("adv_mask_grad_share_removed")),
        "entropy_change_std": statistics.pstdev(changes) if len(changes) > 1 else None,
        "explained_var_last10": mean(finite("value_explained_var", last=10)),
        "sigma_error_spearman": mean(finite("sigma_error_spearman")),
        "response_length": mean(finite("response_length")),
    }


def summarize(spec: Experiment, records: list[dict]) -> dict:
    """Per variant: mean ± std over seeds of the held-out accuracy at the start and the end, of the gain and of each
    :func:`mechanisms` number; and the gain minus the first variant's, paired by seed."""
    rows = {}
    for variant in spec.variants:
        mine = sorted((r for r in records if r["variant"] == variant), key=lambda r: r["seed"])
        if not mine:
            continue
        gains = [r["final_accuracy"] - r["base_accuracy"] for r in mine]
        greedy = [r["eval"][-1].get("accuracy_greedy") for r in mine]
        responses = [sum(r["per_step"].get("rollout_responses") or [0]) for r in mine]
        each_run = [mechanisms(r) for r in mine]
        rows[variant] = {
            "seeds": [r["seed"] for r in mine],
            "base": _mean_std([r["base_accuracy"] for r in mine]),
            "final": _mean_std([r["final_accuracy"] for r in mine]),
            "gain": _mean_std(gains),
            "gain_per_seed": gains,
            "final_greedy": _mean_std(greedy) if None not in greedy else None,
            "responses_per_run": statistics.mean(responses) if all(responses) else None,
            "minutes_per_run": statistics.mean(r["wall_seconds"] for r in mine) / 60,
            "mechanisms": {key: _mean_std_or_none([m[key] for m in each_run]) for key in MECHANISMS},
        }
    # Paired by seed (every variant of a seed starts from the same base): each variant's gain minus the first
    # variant's, on the seeds both have. Seeds differ more than variants do, so this is the comparison that holds.
    if rows:
        first = next(iter(rows.values()))
        first_gain = dict(zip(first["seeds"], first["gain_per_seed"]))
        for row in rows.values():
            row["gain_minus_first_per_seed"] = {seed: gain - first_gain[seed] for seed, gain in
                                                zip(row["seeds"], row["gain_per_seed"]) if seed in first_gain}
    return rows


def markdown_table(rows: dict) -> str:
    first = next(iter(rows), "")
    lines = ["| variant | seeds | held-out at start | after training | gain | gain per seed | gain minus "
             f"{first}'s, per seed | greedy after training | responses generated | minutes per run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, row in rows.items():
        per_seed = ", ".join(f"{gain:+.3f}" for gain in row["gain_per_seed"])
        paired = ", ".join(f"{difference:+.3f}" for difference in row["gain_minus_first_per_seed"].values())
        greedy = _fmt(row["final_greedy"]) if row.get("final_greedy") else "–"
        responses = f"{row['responses_per_run']:,.0f}" if row.get("responses_per_run") else "–"
        lines.append(f"| {variant} | {len(row['seeds'])} | {_fmt(row['base'])} | {_fmt(row['final'])} | "
                     f"{_fmt(row['gain'], sign=True)} | {per_seed} | {paired if variant != first else '–'} | "
                     f"{greedy} | {responses} | {row['minutes_per_run']:.1f} |")
    return "\n".join(lines)


def mechanisms_table(rows: dict) -> str:
    """Per variant, each mechanism number as mean ± std over its seeds ("–": the variant has no such mechanism)."""
    lines = ["| variant | " + " | ".join(MECHANISMS.values()) + " |", "|---" * (len(MECHANISMS) + 1) + "|"]
    for variant, row in rows.items():
        cells = [_fmt(row["mechanisms"][key], digits=DIGITS.get(key, 3))
                 if row["mechanisms"].get(key) else "–" for key in MECHANISMS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(spec: Experiment, records: list[dict], path: Path, title: str) -> None:
    """Held-out accuracy per evaluation, mean over seeds with a ± one std band, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for variant in spec.variants:
        mine = [r for r in records if r["variant"] == variant]
        if not mine:
            continue
        steps = [point["step"] for point in mine[0]["eval"]]
        values = np.array([[point["accuracy"] for point in r["eval"]] for r in mine if len(r["eval"]) == len(steps)])
        mean, std = values.mean(0), values.std(0)
        axes.plot(steps, mean, marker="o", label=f"{variant} ({len(values)} seeds)")
        axes.fill_between(steps, mean - std, mean + std, alpha=0.2)
    axes.set_xlabel("step (held-out evaluation after it; the first point is before training)")
    axes.set_ylabel("held-out accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_mechanisms(spec: Experiment, records: list[dict], path: Path, title: str) -> None:
    """Per step, mean over seeds with a ± one std band: training reward, entropy, the share of tokens ERC keeps and
    the critics' explained variance (a panel stays empty for variants without that mechanism)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = {"reward_mean": "training reward", "entropy_mean": "mean entropy (nats)",
              "erc_kept_frac": "tokens ERC keeps", "value_explained_var": "critics' explained variance"}
    figure, grid = plt.subplots(2, 2, figsize=(10, 6.4), sharex=True)
    for axes, (key, label) in zip(grid.flat, panels.items()):
        for variant in spec.variants:
            series = [[np.nan if v is None else v for v in r["per_step"].get(key) or []]
                      for r in records if r["variant"] == variant]
            series = [s for s in series if s and not np.all(np.isnan(s))]
            if not series or len({len(s) for s in series}) != 1:
                axes.plot([], [])  # keep each variant's colour the same in every panel
                continue
            values = np.array(series, dtype=float)
            mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
            steps = np.arange(values.shape[1])
            axes.plot(steps, mean, label=variant, linewidth=1)
            axes.fill_between(steps, mean - std, mean + std, alpha=0.15)
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    for axes in grid[1]:
        axes.set_xlabel("step")
    grid[0, 0].legend(fontsize="x-small", loc="best")
    figure.suptitle(f"{title}: mean ± std over seeds, per step")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the experiment's seeds")
    parser.add_argument("--variants", nargs="+", help="default: all of the experiment's variants")
    parser.add_argument("--steps", type=int, help="override trainer.steps (a smoke run; use another --out)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/learning/<experiment>")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more config overrides for every run (a smaller smoke run; use another --out)")
    parser.add_argument("--summary-only", action="store_true", help="run nothing; summarise the files there")
    args = parser.parse_args(argv)

    spec = EXPERIMENTS[args.experiment]
    out = args.out or RESULTS / args.experiment
    seeds = args.seeds or list(spec.seeds)
    variants = args.variants or list(spec.variants)
    unknown = sorted(set(variants) - set(spec.variants))
    if unknown:
        parser.error(f"--variants: {unknown} not in {sorted(spec.variants)}")

    if not args.summary_only:
        run_missing(args.experiment, spec, out, variants, seeds, args.steps, args.set)

    records = [json.loads(path.read_text()) for path in sorted(out.glob("*/seed-*.json"))]
    if not records:
        print(f"no results under {out}")
        return 1
    rows = summarize(spec, records)
    table = markdown_table(rows)
    mechanism_table = mechanisms_table(rows)
    (out / "summary.json").write_text(json.dumps({"question": spec.question, "variants": rows}, indent=1) + "\n")
    (out / "summary.md").write_text(f"{spec.question}\n\n{table}\n\nWhat each mechanism did (mean over steps, "
                                    f"then mean ± std over seeds):\n\n{mechanism_table}\n\nCommand: `python "
                                    f"benchmarks/learning.py {args.experiment}`\n")
    plot_curves(spec, records, out / "curves.png", args.experiment)
    plot_mechanisms(spec, records, out / "mechanisms.png", args.experiment)
    print(table)
    print(mechanism_table)
    print(f"wrote {out / 'summary.md'}, {out / 'summary.json'}, {out / 'curves.png'}, {out / 'mechanisms.png'}")
    return 0


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _mean_std_or_none(values: list[float | None]) -> dict[str, float] | None:
    return None if None in values else _mean_std(values)


def _fmt(stat: dict[str, float], sign: bool = False, digits: int = 3) -> str:
    mean = f"{stat['mean']:+.{digits}f}" if sign else f"{stat['mean']:.{digits}f}"
    return f"{mean} ± {stat['std']:.{digits}f}"


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
