"""Time per GB of the learner → rollout weight broadcast: the torch.distributed group (``WeightBroadcaster``)
versus the simple path through Ray's object store, on the same vLLM engine in the same run.

For each model size a random Qwen2 (float32, a small character vocabulary so that the layers hold the bytes) is
saved, one ``RolloutWorker`` actor loads it, and this process plays the learner's rank 0. ``--sizes smollm2`` takes
the real SmolLM2-135M-Instruct instead (the built-in pretrained model, 538 MB in float32, tied embeddings), each path
sending it with noise of its own added:

- ``process_group``: ``WeightBroadcaster.broadcast`` (plan through Ray, buckets through gloo, vLLM's in-place
  layerwise reload, ack). Its own ``seconds``: from sending the plan to the last ack.
- ``object_store``: ``ray.put`` of the state dict, then ``receive_weights_from_object_store`` on the worker (the
  actor fetches it, serialises it for vLLM's RPC, the vLLM worker loads it with the same reload). Timed from
  ``ray.put`` to the ack.
- ``raw``: the floor: plain ``torch.distributed.broadcast`` (gloo) of the same number of bytes, in buckets of the
  same size, from this process to one other process (a bare Ray actor, no vLLM) that preallocated its buffer;
  timed from the first bucket to a barrier after the last. No plan, no packing, no reload.

- ``engine_reload``: vLLM's in-place reload alone (``collective_rpc("reload_weights")`` from the checkpoint files,
  which the page cache holds): what any path pays to put weights into the engine once they have arrived. On the
  CPU build it includes re-packing every linear layer for oneDNN (``process_weights_after_loading``).

``process_group`` and ``object_store`` include the same reload, so their ratio is what the transport costs;
``raw / process_group`` is the share of the floor the project's broadcast reaches (goal ≥ 0.5), and
``raw / (process_group − engine_reload)`` the same share for what the broadcast adds on top of the engine's reload. One unmeasured warm-up of each,
then ``--repeats`` alternating measurements; the median is reported. Each path loads different weights, and after
its last measurement the engine's log-probs are compared with the learner model's, so a timing never counts a
load that did not happen.

    python benchmarks/bench_weight_sync.py                        # 10M, 30M, 100M params: ~3 min on 2 shared cores
    python benchmarks/bench_weight_sync.py --sizes 30M --repeats 5 --bucket-mb 16 --workers 2
    python benchmarks/bench_weight_sync.py --sizes 10M --repeats 1 --output /tmp/sync.json      # smoke
    python benchmarks/bench_weight_sync.py --sizes smollm2 --output benchmarks/results/weight_sync_smollm2.json

Writes ``benchmarks/results/weight_sync.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# name → (hidden, layers, intermediate, attention heads, kv heads); head_dim 64 throughout.
SIZES = {
    "10M": (256, 10, 1024, 4, 2),
    "30M": (512, 8, 2048, 8, 4),
    "100M": (768, 12, 3072, 12, 4),
    "300M": (1024, 24, 4096, 16, 4),
}


PRETRAINED = {"smollm2": "smollm2-135m-instruct"}  # --sizes name → built-in pretrained model (asyppo.tasks.pretrained)


def constant_reward(prompt: str, response: str, answer: str, row: dict, *, response_length: int,
                    truncated: bool) -> tuple[float, bool]:
    """The engine needs a reward function; nothing is generated here."""
    return 0.0, False


def build_tokenizer():
    from asyppo.tasks.tiny_models import char_tokenizer

    return char_tokenizer()


def build_model(size: str, vocab_size: int, seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, intermediate, heads, kv_heads = SIZES[size]
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def probe_logprobs(model, ids: list[int]) -> list[float]:
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
    return [float(logp[k, token]) for k, token in enumerate(ids[1:])]


def check_loaded(worker, model, probe: list[int], what: str) -> float:
    import ray

    got = ray.get(worker.prompt_logprobs.remote([probe]))[0]
    gap = max(abs(a - b) for a, b in zip(got, probe_logprobs(model, probe)))
    if gap > 1e-3:
        raise RuntimeError(f"{what}: the engine's log-probs differ from the learner's by {gap:.3g} after the load")
    return gap


class RawReceiver:
    """The other end of the ``raw`` baseline: joins a 2-rank gloo group and receives buckets into one buffer."""

    def join(self, address: str, port: int) -> None:
        import torch

        torch.distributed.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=1, world_size=2)

    def receive(self, bucket_numels: list[int]) -> float:
        import torch

        buffer = torch.empty(max(bucket_numels), dtype=torch.float32)
        for numel in bucket_numels:
            torch.distributed.broadcast(buffer[:numel], src=0)
        torch.distributed.barrier()
        return float(buffer[0])


def reload_from_checkpoint(worker) -> float:
    """Run inside a ``RolloutWorker`` actor (``__ray_call__``): seconds of vLLM's in-place reload from its files."""
    started = time.perf_counter()
    worker.llm.collective_rpc("reload_weights")
    return time.perf_counter() - started


def raw_broadcast_setup(bucket_mb: float):
    """This process as rank 0 of a 2-rank gloo group with a ``RawReceiver``; returns the receiver."""
    import ray
    import torch

    from asyppo.common.network import free_port

    receiver = ray.remote(RawReceiver).options(num_cpus=1, name="raw-broadcast-receiver").remote()
    address, port = "127.0.0.1", free_port()
    joined = receiver.join.remote(address, port)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=0, world_size=2)
    ray.get(joined)
    return receiver


def raw_broadcast(receiver, num_bytes: int, bucket_mb: float) -> float:
    """Seconds to broadcast ``num_bytes`` of float32 in ``bucket_mb`` buckets to the receiver (barrier included)."""
    import ray
    import torch

    bucket_numel = int(bucket_mb * 2**20) // 4
    total = num_bytes // 4
    numels = [min(bucket_numel, total - start) for start in range(0, total, bucket_numel)]
    payload = torch.randn(max(numels))
    done = receiver.receive.remote(numels)
    time.sleep(0.2)  # let the receiver enter its first broadcast, so its Ray call latency is not timed
    started = time.perf_counter()
    for numel in numels:
        torch.distributed.broadcast(payload[:numel], src=0)
    torch.distributed.barrier()
    seconds = time.perf_counter() - started
    if ray.get(done) != float(payload[0]):
        raise RuntimeError("raw broadcast: the receiver did not get the bytes sent")
    return seconds


def pretrained_dir_and_tokenizer(size: str):
    from transformers import AutoTokenizer

    from asyppo.tasks.model_cache import default_cache_dir
    from asyppo.tasks.pretrained import ensure_pretrained

    model_dir = ensure_pretrained(PRETRAINED[size], default_cache_dir(), log=print)
    return model_dir, AutoTokenizer.from_pretrained(model_dir)


def pretrained_variant(model_dir: Path, seed: int):
    """The pretrained model with N(0, 1e-3²) added to every parameter: weights that differ from the engine's."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1e-3 * torch.randn(parameter.shape, generator=generator))
    return model


def bench_size(size: str, args, tokenizer, workdir: Path, raw_receiver) -> dict:
    import ray
    import torch

    from asyppo.actors.rollout_worker import RolloutWorker
    from asyppo.weight_sync.sender import WeightBroadcaster

    if size in PRETRAINED:
        model_dir, tokenizer = pretrained_dir_and_tokenizer(size)
        via_group, via_store = pretrained_variant(model_dir, seed=1), pretrained_variant(model_dir, seed=2)
    else:
        model_dir = workdir / size
        build_model(size, len(tokenizer), seed=0).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        via_group, via_store = build_model(size, len(tokenizer), seed=1), build_model(size, len(tokenizer), seed=2)
    num_params = sum(p.numel() for p in via_group.parameters())
    num_bytes = 4 * num_params
    probe = tokenizer.encode("12+34=46 ok")

    started = time.perf_counter()
    workers = [
        ray.remote(RolloutWorker).options(name=f"rollout-bench-{size}-{i}", num_cpus=1).remote(
            str(model_dir), reward_fn=constant_reward, worker_index=i, max_model_len=64,
            cpu_kv_cache_gib=args.kv_cache_gib,
        )
        for i in range(args.workers)
    ]
    ray.get([worker.health.remote() for worker in workers])
    engine_start = time.perf_counter() - started
    broadcaster = WeightBroadcaster("gloo", timeout_s=120.0, bucket_mb=args.bucket_mb)
    broadcaster.setup(workers, tensor_parallel_size=1)
    version = 0

    def process_group() -> float:
        nonlocal version
        version += 1
        return broadcaster.broadcast(via_group.named_parameters(), version, torch.float32)["seconds"]

    def object_store() -> float:
        nonlocal version
        version += 1
        begin = time.perf_counter()
        state = ray.put({name: p.detach().to(torch.float32) for name, p in via_store.named_parameters()})
        ray.get([worker.receive_weights_from_object_store.remote(state, version) for worker in workers])
        seconds = time.perf_counter() - begin
        del state
        return seconds

    def raw() -> float:
        return raw_broadcast(raw_receiver, num_bytes, args.bucket_mb)

    def engine_reload() -> float:
        return ray.get(workers[0].__ray_call__.remote(reload_from_checkpoint))

    paths = (process_group, object_store, raw, engine_reload)
    try:
        for path in paths:  # warm-up: first-touch of buffers, code paths
            path()
        times: dict[str, list[float]] = {path.__name__: [] for path in paths}
        for repeat in range(args.repeats):
            order = paths if repeat % 2 == 0 else paths[::-1]
            for path in order:
                times[path.__name__].append(path())
                # Check each path's weights right after its final measurement, before the other overwrites them.
                if repeat == args.repeats - 1 and path is process_group:
                    gap_group = max(check_loaded(w, via_group, probe, f"{size} process group") for w in workers)
                elif repeat == args.repeats - 1 and path is object_store:
                    gap_store = max(check_loaded(w, via_store, probe, f"{size} object store") for w in workers)
    finally:
        broadcaster.close()
        for worker in workers:
            ray.kill(worker)

    group_s, store_s = statistics.median(times["process_group"]), statistics.median(times["object_store"])
    raw_s, reload_s = statistics.median(times["raw"]), statistics.median(times["engine_reload"])
    return {
        "size": size,
        "rollout_workers": args.workers,
        "params": num_params,
        "bytes": num_bytes,
        "engine_start_s": engine_start,
        "process_group_s": times["process_group"],
        "object_store_s": times["object_store"],
        "process_group_median_s": group_s,
        "object_store_median_s": store_s,
        "process_group_s_per_gb": group_s / (num_bytes / 1e9),
        "object_store_s_per_gb": store_s / (num_bytes / 1e9),
        "raw_s": times["raw"],
        "raw_median_s": raw_s,
        "raw_s_per_gb": raw_s / (num_bytes / 1e9),
        "speedup_vs_object_store": store_s / group_s,
        "fraction_of_raw": raw_s / group_s,
        "engine_reload_s": times["engine_reload"],
        "engine_reload_median_s": reload_s,
        "fraction_of_raw_beyond_reload": raw_s / max(group_s - reload_s, 1e-9),
        "max_logprob_gap": {"process_group": gap_group, "object_store": gap_store},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["10M", "30M", "100M"], choices=[*SIZES, *PRETRAINED])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=1, help="rollout workers receiving the broadcast")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "weight_sync.json")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    import ray
    import torch
    import vllm

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(num_cpus=4, object_store_memory=2 * 2**30, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    tokenizer = build_tokenizer()
    results = []
    try:
        raw_receiver = raw_broadcast_setup(args.bucket_mb)
        with tempfile.TemporaryDirectory(prefix="bench-weight-sync-") as workdir:
            for size in args.sizes:
                results.append(bench_size(size, args, tokenizer, Path(workdir), raw_receiver))
                row = results[-1]
                print(f"{size}: {row['params'] / 1e6:.1f}M params, group {row['process_group_median_s']:.3f}s, "
                      f"object store {row['object_store_median_s']:.3f}s, raw {row['raw_median_s']:.3f}s, "
                      f"reload alone {row['engine_reload_median_s']:.3f}s", flush=True)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        ray.shutdown()

    print("\n| size | MB | process group s/GB | object store s/GB | raw broadcast s/GB | vLLM reload alone s/GB | "
          "vs object store | share of raw (goal >= 0.5) | share of raw beyond the reload |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for row in results:
        gb = row["bytes"] / 1e9
        print(f"| {row['size']} | {row['bytes'] / 1e6:.1f} | {row['process_group_s_per_gb']:.2f} | "
              f"{row['object_store_s_per_gb']:.2f} | {row['raw_s_per_gb']:.2f} | "
              f"{row['engine_reload_median_s'] / gb:.2f} | {row['speedup_vs_object_store']:.2f}x | "
              f"{row['fraction_of_raw']:.2f} | {row['fraction_of_raw_beyond_reload']:.2f} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "weight_sync",
        "backend": "gloo",
        "dtype": "float32",
        "bucket_mb": args.bucket_mb,
        "repeats": args.repeats,
        "statistic": "median",
        "speedup": "object_store seconds / process_group seconds (same engine, same run)",
        "fraction_of_raw": "raw seconds / process_group seconds (raw: torch.distributed.broadcast of the same bytes "
                           "between two processes, no reload)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "vllm": vllm.__version__, "ray": ray.__version__},
        "results": results,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
