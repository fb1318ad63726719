"""Peak memory and time of chunked vs naive log-prob + entropy (forward + backward), on CPU.

The chunked variant is ``asyppo.core.logprobs.logprobs_and_entropy`` (checkpointed chunks of ``--chunk-size``
positions). The naive variant materialises the full ``[N, T, vocab]`` float32 logits. Both compute
``logp`` with a graph and the entropy without one (what the learner's PPO step does), then backpropagate
``Σ w·logp`` into the hidden states and the LM head.

Every measurement runs in its own fresh Python process, so none inherits another's allocations; each
(size, variant) gets one process for time and one for memory. Both first run one unmeasured pass, which pages
in the kernels' code and the threads' stacks.

- Time: ``--repeats`` timed passes with the allocator as it normally behaves; the minimum is reported.
- Memory: the process starts with ``MALLOC_MMAP_THRESHOLD_=131072``, a fixed glibc mmap threshold (which
  also turns off glibc's adaptive threshold), so every tensor above 128 KiB is mmapped: its pages enter the
  RSS when touched and leave it when freed, instead of being recycled unseen from heap memory already
  counted. The resident-set high-water mark (Linux ``VmHWM``) is reset by writing ``5`` to
  ``/proc/self/clear_refs``, one pass runs, and ``peak_extra_mib = VmHWM − VmRSS before the pass``. Where
  the reset is not permitted, ``ru_maxrss`` from ``resource.getrusage`` is used instead (an earlier transient
  could then hide a smaller peak); the JSON records which method ran. Time is not taken in this process
  because mmap-per-tensor faults in fresh zeroed pages on every allocation, which would distort it (most for
  the chunked variant, which allocates many smaller tensors).

    python benchmarks/bench_logprobs.py                               # default sizes: ~1 min on 2 idle cores, ~2 min when shared
    python benchmarks/bench_logprobs.py --size 8 1024 151936 --hidden 896 --chunk-size 1024

Writes ``benchmarks/results/logprobs.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import os
import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = ((2, 512, 32000), (8, 512, 32000))
VARIANTS = ("naive", "chunked")
MIB = 2**20
MMAP_THRESHOLD_BYTES = 128 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _run_worker(args: argparse.Namespace) -> None:
    """Measure one variant at one size in this (fresh) process; print one JSON line."""
    import resource

    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from asyppo.core.logprobs import logprobs_and_entropy
    from asyppo.core.losses import entropy_from_logits

    num_rows, length, vocab = args.worker_size
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(args.hidden, vocab, bias=False)
    hidden = torch.randn(num_rows, length, args.hidden, requires_grad=True)
    tokens = torch.randint(0, vocab, (num_rows, length))
    weights = torch.randn(num_rows, length)

    def naive_step() -> None:
        logits = lm_head(hidden).float() / args.temperature
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
        (weights * logp).sum().backward()
        del entropy

    def chunked_step() -> None:
        logp, entropy = logprobs_and_entropy(
            hidden, lm_head, tokens, temperature=args.temperature, chunk_size=args.chunk_size
        )
        (weights * logp).sum().backward()
        del entropy

    step = naive_step if args.worker_variant == "naive" else chunked_step
    # Gradients of the inputs and of the head exist in both variants alike; allocate them before measuring.
    hidden.grad = torch.zeros_like(hidden)
    lm_head.weight.grad = torch.zeros_like(lm_head.weight)

    step()
    result = {
        "variant": args.worker_variant,
        "num_rows": num_rows,
        "length": length,
        "vocab": vocab,
        "hidden": args.hidden,
        "chunk_size": args.chunk_size,
        "threads": torch.get_num_threads(),
    }
    if args.worker_mode == "time":
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        result.update(seconds_min=min(seconds), seconds_all=seconds)
    else:
        rss_before_kib = _status_kib("VmRSS")
        if _reset_peak_rss():
            step()
            peak_kib, method = _status_kib("VmHWM"), "VmHWM after /proc/self/clear_refs reset"
        else:
            step()
            peak_kib, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss (no reset)"
        result.update(
            rss_before_mib=rss_before_kib / 1024,
            peak_rss_mib=peak_kib / 1024,
            peak_extra_mib=(peak_kib - rss_before_kib) / 1024,
            memory_method=method + f", MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}",
        )
    print(json.dumps(result))


def _run_in_fresh_process(args: argparse.Namespace, size: tuple[int, int, int], variant: str, mode: str) -> dict:
    command = [
        sys.executable, __file__, "--worker-variant", variant, "--worker-mode", mode,
        "--worker-size", *map(str, size), "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size),
        "--temperature", str(args.temperature), "--repeats", str(args.repeats),
    ]
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD_BYTES)
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} worker {variant} {size} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _measure(args: argparse.Namespace, size: tuple[int, int, int], variant: str) -> dict:
    timing = _run_in_fresh_process(args, size, variant, "time")
    memory = _run_in_fresh_process(args, size, variant, "memory")
    return {**timing, **memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", nargs=3, type=int, action="append", metavar=("N", "T", "VOCAB"),
        help="one (rows, response length, vocab) size; repeat the flag for several (default: "
        + ", ".join("x".join(map(str, s)) for s in DEFAULT_SIZES) + ")",
    )
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the LM head input")
    parser.add_argument("--chunk-size", type=int, default=256, help="positions per chunk for the chunked variant")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=1, help="timed forward+backward passes per process")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "logprobs.json")
    parser.add_argument("--worker-variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-size", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-mode", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker_variant is not None:
        _run_worker(args)
        return
    if args.chunk_size < 1 or args.repeats < 1 or args.hidden < 1:
        parser.error("--chunk-size, --repeats and --hidden must be >= 1")

    sizes = [tuple(size) for size in (args.size or DEFAULT_SIZES)]
    rows, comparisons = [], []
    header = (
        f"{'N':>3} {'T':>6} {'vocab':>7} {'full logits MiB':>16} {'variant':>8} {'peak extra MiB':>15} "
        f"{'seconds':>8}"
    )
    print(header)
    print("-" * len(header))
    for size in sizes:
        results = {variant: _measure(args, size, variant) for variant in VARIANTS}
        full_logits_mib = size[0] * size[1] * size[2] * 4 / MIB
        for variant in VARIANTS:
            result = results[variant]
            rows.append(result)
            print(
                f"{size[0]:>3} {size[1]:>6} {size[2]:>7} {full_logits_mib:>16.1f} {variant:>8} "
                f"{result['peak_extra_mib']:>15.1f} {result['seconds_min']:>8.2f}"
            )
        memory_ratio = results["naive"]["peak_extra_mib"] / max(results["chunked"]["peak_extra_mib"], 1e-9)
        time_ratio = results["naive"]["seconds_min"] / results["chunked"]["seconds_min"]
        comparisons.append(
            {
                "num_rows": size[0],
                "length": size[1],
                "vocab": size[2],
                "full_logits_mib": full_logits_mib,
                "peak_extra_ratio_naive_over_chunked": memory_ratio,
                "time_ratio_naive_over_chunked": time_ratio,
            }
        )
        print(f"    naive/chunked: peak memory x{memory_ratio:.2f}, time x{time_ratio:.2f}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "logprobs_and_entropy forward+backward, CPU",
        "memory_method": rows[0]["memory_method"] if rows else None,
        "settings": {
            "hidden": args.hidden,
            "chunk_size": args.chunk_size,
            "temperature": args.temperature,
            "repeats": args.repeats,
        },
        "measurements": rows,
        "comparisons": comparisons,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
