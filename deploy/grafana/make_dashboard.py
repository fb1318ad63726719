"""Writes deploy/grafana/asyppo-dashboard.json: a Grafana dashboard of the ``ray_asyppo_*`` gauges (docs/monitoring.md).

    python deploy/grafana/make_dashboard.py

The panels name metrics.jsonl keys; tests/unit/test_deploy.py checks that every one is a key the driver logs, so the
dashboard cannot drift from the code. Import the JSON in Grafana (Dashboards → New → Import) and pick the Prometheus
data source that scrapes the Ray cluster; the ``run`` variable selects a run (trainer.name).
"""

from __future__ import annotations

import json
from pathlib import Path

# (panel title, unit, [metrics.jsonl keys]); ``{m}`` expands to each critic 0..3.
PANELS = [
    ("Reward and accuracy", "none", ["reward_mean", "accuracy"]),
    ("Policy loss", "none", ["policy_loss", "pg_loss"]),
    ("Value loss per critic", "none", ["value_loss_critic_{m}"]),
    ("Critics' disagreement σ", "none", ["sigma_p10", "sigma_p50", "sigma_p90"]),
    ("AsyPPO masks and ERC", "percentunit", ["adv_mask_frac", "entropy_filter_frac", "erc_kept_frac", "clip_frac"]),
    ("Entropy and KL", "none", ["entropy_mean", "approx_kl", "offpolicy_kl"]),
    ("Response length", "none", ["response_length"]),
    ("Throughput (tokens/s)", "none", ["rollout_tokens_per_s", "learner_tokens_per_s", "critic_tokens_per_s"]),
    ("Step phases (s)", "s", ["time_rollout", "time_old_logprobs", "time_values", "time_update", "time_critic_train",
                              "time_weight_sync", "time_step"]),
    ("Weight broadcast", "s", ["weight_sync_seconds"]),
    ("Learning rate and gradient norm", "none", ["lr", "grad_norm"]),
    ("Skipped steps and restarts", "none", ["skipped_steps", "actor_restarts"]),
    ("The cluster: live nodes, rollout workers, critics taking part", "none",
     ["cluster_nodes", "rollout_workers", "critics_taking_part"]),
]
CRITICS_SHOWN = 4
OUTPUT = Path(__file__).with_name("asyppo-dashboard.json")


def panel_keys() -> list[str]:
    return [key.format(m=m) for _, _, keys in PANELS for key in keys
            for m in (range(CRITICS_SHOWN) if "{m}" in key else [None])]


def dashboard() -> dict:
    panels = []
    for number, (title, unit, keys) in enumerate(PANELS):
        expanded = [key.format(m=m) for key in keys for m in (range(CRITICS_SHOWN) if "{m}" in key else [None])]
        panels.append({
            "id": number + 1, "type": "timeseries", "title": title, "datasource": "${datasource}",
            "gridPos": {"h": 8, "w": 12, "x": 12 * (number % 2), "y": 8 * (number // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + i), "expr": f'ray_asyppo_{key}{{run=~"$run"}}', "legendFormat": key}
                        for i, key in enumerate(expanded)],
        })
    return {
        "title": "asyppo training", "uid": "asyppo-training", "schemaVersion": 39, "version": 1,
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s", "tags": ["asyppo", "ray"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "run", "type": "query", "datasource": "${datasource}", "label": "run (trainer.name)",
             "query": "label_values(ray_asyppo_reward_mean, run)", "includeAll": True, "multi": True, "refresh": 2},
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    OUTPUT.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(f"wrote {OUTPUT}")
