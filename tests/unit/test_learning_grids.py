"""The learning grids' definitions and the numbers they summarise (benchmarks/learning.py), without running one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from asyppo.common.config import build_config

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import learning  # noqa: E402


@pytest.mark.parametrize("experiment", [*sorted(learning.EXPERIMENTS), "bench_steps"])
def test_every_variant_of_every_experiment_is_a_valid_job(experiment):
    import bench_steps

    spec = bench_steps.EXPERIMENT if experiment == "bench_steps" else learning.EXPERIMENTS[experiment]
    for overrides in spec.variants.values():
        build_config(overrides=[*spec.common, *overrides])  # raises ConfigError naming the field


def test_mechanism_numbers_of_a_run_and_their_mean_over_seeds(tmp_path):
    """learning.mechanisms on a record with numbers worked out by hand: NaN and absent steps are left out, the
    explained variance is that of the last 10 steps, the entropy swing is the population std of the changes."""
    nan = float("nan")
    steps = 12
    per_step = {
        "erc_kept_frac": [0.5, 0.7, 0.9] + [0.8] * 9,               # mean (0.5 + 0.7 + 0.9 + 7.2) / 12 = 0.775
        "erc_grad_share_removed": [0.4] * 6 + [0.1] * 6,             # 0.25
        "adv_mask_grad_share_removed": [0.0] * steps,                # the masks step aside: 0
        "entropy_mean": [1.0, 1.2, 1.0, 1.2] + [1.2] * 8,           # changes +.2, -.2, +.2, then 8 zeros
        "value_explained_var": [-5.0, -5.0] + [0.1, 0.3] * 5,        # the last 10: mean 0.2
        "sigma_error_spearman": [nan, None] + [0.5] * 5 + [-0.5] * 5,  # 0 over the 10 defined steps
        "response_length": [30.0] * 6 + [40.0] * 6,                   # 35
    }
    record = {"variant": "v", "seed": 0, "base_accuracy": 0.3, "final_accuracy": 0.5,
              "eval": [{"step": -1, "accuracy": 0.3, "accuracy_greedy": 0.4}], "wall_seconds": 60.0,
              "per_step": {**per_step, "rollout_responses": [8] * steps}}
    got = learning.mechanisms(record)
    changes = [0.2, -0.2, 0.2] + [0.0] * 8
    mean_change = sum(changes) / len(changes)
    swing = (sum((c - mean_change) ** 2 for c in changes) / len(changes)) ** 0.5
    assert got == pytest.approx({"erc_kept": 0.775, "erc_grad_removed": 0.25, "adv_mask_grad_removed": 0.0,
                                 "entropy_change_std": swing, "explained_var_last10": 0.2,
                                 "sigma_error_spearman": 0.0, "response_length": 35.0})
    # A method without critics (no value metrics at all) has no such number, and the summary says so.
    no_critic = {**record, "seed": 1, "per_step": {k: v for k, v in record["per_step"].items()
                                                    if k not in ("value_explained_var", "sigma_error_spearman")}}
    assert learning.mechanisms(no_critic)["explained_var_last10"] is None

    spec = learning.Experiment(question="q", variants={"v": []})
    second = {**record, "seed": 1, "per_step": {**record["per_step"], "erc_kept_frac": [0.875] * steps}}
    row = learning.summarize(spec, [record, second])["v"]
    assert row["mechanisms"]["erc_kept"] == {"mean": pytest.approx(0.825),
                                             "std": pytest.approx(((0.05**2 + 0.05**2) / 1) ** 0.5)}
    assert learning.summarize(spec, [record, no_critic])["v"]["mechanisms"]["explained_var_last10"] is None
    assert "| v | 0.775 ± 0.000 |" in learning.mechanisms_table(learning.summarize(spec, [record]))

    # Paired by seed against the first variant, on the seeds both have: b's seed 0 gains 0.1 more than a's, its seed
    # 1 0.3 less; a has no seed 2, so b's seed 2 is not paired.
    def run(variant, seed, base, final):
        return {**record, "variant": variant, "seed": seed, "base_accuracy": base, "final_accuracy": final}

    pair = learning.Experiment(question="q", variants={"a": [], "b": []})
    rows = learning.summarize(pair, [run("a", 0, 0.3, 0.5), run("a", 1, 0.4, 0.8), run("b", 0, 0.3, 0.6),
                                     run("b", 1, 0.4, 0.5), run("b", 2, 0.2, 0.9)])
    assert rows["a"]["gain_minus_first_per_seed"] == {0: 0.0, 1: 0.0}
    assert rows["b"]["gain_minus_first_per_seed"] == pytest.approx({0: 0.1, 1: -0.3})
    assert "| +0.200, +0.400 | – |" in learning.markdown_table(rows)
    assert "| +0.100, -0.300 |" in learning.markdown_table(rows)
