"""Peak memory of each role in a real job: the rollout workers (their vLLM engine's processes included), the learner
and every critic, while a job runs a few steps.

The job (default ``examples/smollm2.yaml``: SmolLM2-135M-Instruct, critics cut to 8 layers) runs in this process on
its embedded cluster. A thread looks every ``--interval`` seconds at every Ray actor process of the job (Ray names
them ``ray::<Class>``, ``ray::<Class>.<method>`` while they work) and its children, and keeps per actor:

- ``peak_rss_gib``: the largest resident memory of the actor's processes together at one look (a peak shorter than
  the interval can fall between looks);
- ``peak_hwm_gib``: the sum of each of its processes' own peak (``VmHWM``), an upper bound: those peaks need not
  have come at the same moment.

Float32 on CPU, as the job runs here; a GPU job holds the weights in GPU memory instead (``benchmarks/bench_gpu.py``
measures the learner there).

    python benchmarks/role_memory.py                                   # examples/smollm2.yaml, 2 steps: ~4 min
    python benchmarks/role_memory.py --config default --output /tmp/memory.json      # the default job: tiny models

Writes ``benchmarks/results/role_memory_smollm2.json`` (or ``--output``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
ROLES = {"RolloutWorker": "rollout", "Learner": "learner", "MiniCritic": "critic"}


def actor_of(process: psutil.Process) -> str | None:
    """The actor class a Ray worker process runs (from its title ``ray::Class`` or ``ray::Class.method``), if any."""
    try:
        title = " ".join(process.cmdline())
    except psutil.Error:
        return None
    if not title.startswith("ray::"):
        return None
    name = title.removeprefix("ray::").split()[0].split(".")[0]
    return name if name in ROLES else None


def peak_kib(process: psutil.Process) -> int:
    """A process's own peak resident memory (``VmHWM``), in KiB; 0 once it is gone."""
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


class Watcher(threading.Thread):
    """Looks at every actor process and its children every ``interval`` seconds until stopped."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.stop = threading.Event()
        self.peaks: dict[int, dict] = {}  # actor pid → {"role", "peak_rss", "hwm"}

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.look()

    def look(self) -> None:
        for process in psutil.process_iter():
            kind = actor_of(process)
            if kind is None:
                continue
            try:
                family = [process, *process.children(recursive=True)]
                rss = sum(member.memory_info().rss for member in family)
            except psutil.Error:
                continue
            entry = self.peaks.setdefault(process.pid, {"role": ROLES[kind], "peak_rss": 0, "hwm": {}})
            entry["peak_rss"] = max(entry["peak_rss"], rss)
            for member in family:
                entry["hwm"][member.pid] = max(entry["hwm"].get(member.pid, 0), peak_kib(member))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "examples" / "smollm2.yaml"),
                        help="a job file, or 'default' for the default job (no file)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between looks")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "role_memory_smollm2.json")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, as for `asyppo train`")
    args = parser.parse_args()

    from asyppo.cluster.driver import train
    from asyppo.common.config import load_config

    config = None if args.config == "default" else Path(args.config)
    watcher = Watcher(args.interval)
    with tempfile.TemporaryDirectory(prefix="role-memory-") as run_dir:
        cfg = load_config(config, overrides=[
            f"trainer.steps={args.steps}", f"trainer.run_dir={run_dir}", "logging.wandb_mode=disabled",
            "logging.console=false", *args.overrides])
        watcher.start()
        try:
            train(cfg)
        finally:
            watcher.stop.set()
            watcher.join()

    counts: dict[str, int] = {}
    rows = []
    for entry in sorted(watcher.peaks.values(), key=lambda e: (e["role"], -e["peak_rss"])):
        index = counts[entry["role"]] = counts.get(entry["role"], -1) + 1
        rows.append({"actor": f"{entry['role']}-{index}", "role": entry["role"],
                     "processes": len(entry["hwm"]), "peak_rss_gib": entry["peak_rss"] / 2**30,
                     "peak_hwm_gib": sum(entry["hwm"].values()) / 2**20})
    job = config.name if config else "the default job"
    print(f"\npeak memory per actor, {job}, {args.steps} steps, a look every {args.interval:g} s\n"
          "| actor | processes | peak resident, at one look | sum of its processes' own peaks |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['actor']} | {row['processes']} | {row['peak_rss_gib']:.2f} GiB | {row['peak_hwm_gib']:.2f} GiB |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "benchmark": "role_memory", "config": str(config.relative_to(REPO_ROOT) if config and config.is_relative_to(
            REPO_ROOT) else config or "default"), "steps": args.steps, "overrides": args.overrides,
        "interval_s": args.interval, "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform(),
                                                 "memory_gib": psutil.virtual_memory().total / 2**30},
        "actors": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
