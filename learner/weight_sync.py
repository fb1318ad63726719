"""Learner → rollout weight broadcast over a dedicated torch.distributed group (ARCHITECTURE.md "Data and weights").

The group joins the learner's rank 0 (rank 0 here) with every vLLM worker process of every rollout worker
(rank ``rank_offset + tp_rank``). It is built with vLLM's *stateless* process-group helper, so neither side's
default group is touched: DeepSpeed owns the learner's, vLLM owns its own. gloo on CPU, NCCL on GPU.

One broadcast, in order:

1. **Plan** (a plain dict, shipped through Ray with ``receive_weights.remote(plan, version)``): the wire dtype,
   the version stamp and, per bucket, every tensor's name, shape and offset in the bucket.
2. **Handshake**: one ``MIN`` all-reduce of an accept flag. Each receiver first checks the plan (version newer
   than what it holds, names and shapes equal to its checkpoint's); if any rank rejects, every rank stops here,
   nothing is loaded, and the group stays usable. Without this step a rejecting receiver would leave the sender
   blocked inside a broadcast nobody answers.
3. **Buckets**: each bucket is one flat contiguous tensor of the wire dtype, broadcast from rank 0; receivers
   stream the views into vLLM's layerwise reload (``actors/vllm_extension.py``).
4. **Acks**: the Ray return values of ``receive_weights``; each says the version now loaded.

Every collective has a timeout (the group's, and a deadline here); while waiting, the sender also watches the
workers' Ray calls, so a worker that dies or raises is reported at once, by index and actor, instead of after
the timeout. After a transport failure the group is marked broken; call :meth:`WeightBroadcaster.setup` again.

The wire format helpers at the top are plain torch (the receiving side imports them).
"""

from __future__ import annotations

import concurrent.futures
import math
import socket
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import ray
import torch

PLAN_FORMAT = 1
# Wire dtypes a plan may name. Weights are floating point; anything else is a caller mistake.
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class WeightSyncError(RuntimeError):
    """A weight broadcast or the group set-up failed; the message names the worker(s) and the phase."""


class WeightPlanRejected(WeightSyncError):
    """A receiver refused a plan before any tensor moved (stale or mismatched version, unknown names or shapes).

    Raised by the receiving side after the handshake, and by :meth:`WeightBroadcaster.broadcast` with every
    receiver's reason. Nothing was loaded and the group stays usable.
    """


# ---- wire format (plain torch) ---------------------------------------------------------------------------------


def wire_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype for ``dtype`` (a torch dtype or its name), restricted to the floating wire dtypes."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in WIRE_DTYPES:
            raise ValueError(f"weight sync dtype {dtype!r} is not one of {sorted(WIRE_DTYPES)}")
        return WIRE_DTYPES[name]
    if dtype not in WIRE_DTYPES.values():
        raise ValueError(f"weight sync dtype {dtype} is not one of {sorted(WIRE_DTYPES)}")
    return dtype


def wire_dtype_name(dtype: torch.dtype) -> str:
    """Inverse of :func:`wire_dtype` (plans carry the dtype as a string so they pickle and msgpack cleanly)."""
    return str(wire_dtype(dtype)).removeprefix("torch.")


def build_weight_plan(
    named_shapes: Sequence[tuple[str, Sequence[int]]], dtype: torch.dtype | str, bucket_bytes: int, version: int
) -> dict[str, Any]:
    """Group tensors, in the given order, into buckets of at most ``bucket_bytes`` (one larger tensor gets a
    bucket of its own) and record where each tensor lives. ARCHITECTURE.md "Data and weights".

    Returns ``{"format", "version", "dtype", "num_tensors", "total_numel", "buckets": [{"numel", "tensors":
    [{"name", "shape", "offset", "numel"}, ...]}, ...]}``; offsets and sizes count elements of ``dtype``.
    """
    torch_dtype = wire_dtype(dtype)
    if not isinstance(version, int) or isinstance(version, bool):
        raise TypeError(f"weight version must be an int, got {type(version).__name__}")
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    if not named_shapes:
        raise ValueError("no tensors to send: the weight plan would be empty")
    element_size = torch.empty((), dtype=torch_dtype).element_size()
    bucket_capacity = max(1, bucket_bytes // element_size)
    seen: set[str] = set()
    buckets: list[dict[str, Any]] = []
    current: dict[str, Any] = {"numel": 0, "tensors": []}
    for name, shape in named_shapes:
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in the weights to send")
        seen.add(name)
        shape = [int(size) for size in shape]
        numel = math.prod(shape)
        if current["tensors"] and current["numel"] + numel > bucket_capacity:
            buckets.append(current)
            current = {"numel": 0, "tensors": []}
        current["tensors"].append({"name": name, "shape": shape, "offset": current["numel"], "numel": numel})
        current["numel"] += numel
    buckets.append(current)
    return {
        "format": PLAN_FORMAT,
        "version": version,
        "dtype": wire_dtype_name(torch_dtype),
        "num_tensors": len(seen),
        "total_numel": sum(bucket["numel"] for bucket in buckets),
        "buckets": buckets,
    }


def validate_weight_plan(plan: Any) -> None:
    """Raise ``ValueError`` unless ``plan`` is a well-formed plan from :func:`build_weight_plan`: known format and
    dtype, and in every bucket tensors that tile it exactly (offset = running sum, numel = prod(shape))."""
    if not isinstance(plan, dict):
        raise TypeError(f"weight plan must be a dict, got {type(plan).__name__}")
    missing = {"format", "version", "dtype", "num_tensors", "total_numel", "buckets"} - plan.keys()
    if missing:
        raise ValueError(f"weight plan lacks {sorted(missing)}")
    if plan["format"] != PLAN_FORMAT:
        raise ValueError(f"weight plan format {plan['format']!r}, this receiver reads format {PLAN_FORMAT}")
    wire_dtype(plan["dtype"])
    names: set[str] = set()
    total = 0
    for index, bucket in enumerate(plan["buckets"]):
        running = 0
        for entry in bucket["tensors"]:
            where = f"weight plan bucket {index}, tensor {entry.get('name')!r}"
            if entry["offset"] != running:
                raise ValueError(f"{where}: offset {entry['offset']}, expected {running}")
            if entry["numel"] != math.prod(entry["shape"]):
                raise ValueError(f"{where}: numel {entry['numel']} does not match shape {entry['shape']}")
            if entry["name"] in names:
                raise ValueError(f"{where}: name appears twice")
            names.add(entry["name"])
            running += entry["numel"]
        if running != bucket["numel"] or running == 0:
            raise ValueError(
                f"weight plan bucket {index}: tensors cover {running} elements, bucket has {bucket['numel']}"
            )
        total += running
    if len(names) != plan["num_tensors"] or total != plan["total_numel"]:
        raise ValueError(
            f"weight plan totals disagree: {len(names)} tensors / {total} elements listed, "
            f"header says {plan['num_tensors']} / {plan['total_numel']}"
        )


def plan_shapes(plan: dict[str, Any]) -> dict[str, list[int]]:
    """Name → shape for every tensor of a plan, in plan order."""
    return {entry["name"]: entry["shape"] for bucket in plan["buckets"] for entry in bucket["tensors"]}


def pack_bucket(
    bucket: dict[str, Any], tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """One flat contiguous tensor holding a bucket's tensors back to back, cast to ``dtype`` on ``device``."""
    flat = torch.empty(bucket["numel"], dtype=dtype, device=device)
    with torch.no_grad():
        for entry in bucket["tensors"]:
            source = tensors[entry["name"]]
            if list(source.shape) != entry["shape"]:
                raise ValueError(
                    f"tensor {entry['name']!r} has shape {list(source.shape)}, the plan says {entry['shape']}"
                )
            # copy_ casts and moves in one pass, without an intermediate tensor.
            flat[entry["offset"]: entry["offset"] + entry["numel"]].copy_(source.detach().reshape(-1))
    return flat


def unpack_bucket(flat: torch.Tensor, bucket: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """Views into a received flat bucket, one ``(name, tensor)`` per plan entry (no copies)."""
    if flat.dim() != 1 or flat.numel() != bucket["numel"]:
        raise ValueError(f"received bucket has shape {list(flat.shape)}, the plan says [{bucket['numel']}]")
    return [
        (entry["name"], flat[entry["offset"]: entry["offset"] + entry["numel"]].view(entry["shape"]))
        for entry in bucket["tensors"]
    ]


# ---- sender (learner rank 0) -----------------------------------------------------------------------------------


def _describe(index: int, worker: Any) -> str:
    return f"rollout worker #{index} ({worker!r})"


def _reason(err: BaseException) -> str:
    """The worker-side exception behind a Ray error, without Ray's remote traceback."""
    cause = getattr(err, "cause", None) if isinstance(err, ray.exceptions.RayTaskError) else None
    if cause is None:
        return f"{type(err).__name__}: {err}"
    return f"{type(cause).__name__}: {cause}"


class WeightBroadcaster:
    """Rank 0 of the learner → rollout-worker weight group. ``setup`` once, ``broadcast`` after every update.

    ``backend``: ``"gloo"`` (tensors travel through host memory) or ``"nccl"`` (learner and vLLM workers on GPU).
    ``timeout_s`` bounds every collective, the group's formation and the wait for acknowledgements; note that a
    worker only joins a broadcast once its current Ray call (e.g. a ``generate``) has returned.
    ``bucket_mb``: size of one flat bucket (MiB); bounds the extra memory on both sides.
    """

    def __init__(self, backend: str, timeout_s: float, bucket_mb: float):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight sync backend must be 'gloo' or 'nccl', got {backend!r}")
        if not timeout_s > 0:
            raise ValueError(f"weight sync timeout must be positive, got {timeout_s}")
        if not bucket_mb > 0:
            raise ValueError(f"weight sync bucket size must be positive, got {bucket_mb} MiB")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("weight sync backend 'nccl' needs a GPU in the learner process; use 'gloo'")
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._group = None
        self._workers: list = []
        self._broken: str | None = None

    # -- group --

    def setup(self, workers: list, tensor_parallel_size: int) -> None:
        """Form the group: a free port on this node, every worker's ``init_weight_sync`` (ranks
        ``1 + i·tp … 1 + i·tp + tp − 1``), rank 0 here; returns once all ranks have joined."""
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        if not workers:
            raise ValueError("weight sync setup needs at least one rollout worker")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self.close()
        world_size = 1 + len(workers) * tensor_parallel_size
        address = ray.util.get_node_ip_address()
        # Binding port 0 here and handing the bound socket to the store avoids a race for the port.
        listen_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listen_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listen_socket.bind((address, 0))
        listen_socket.listen()
        port = listen_socket.getsockname()[1]
        calls = {
            index: worker.init_weight_sync.remote(
                address, port, 1 + index * tensor_parallel_size, world_size, self.backend, self.timeout_s
            )
            for index, worker in enumerate(workers)
        }
        # Rank 0 blocks until every rank has joined; run it aside so that a worker failing meanwhile is reported
        # at once rather than after the timeout.
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync-join")
        join = pool.submit(
            stateless_init_torch_distributed_process_group,
            address, port, 0, world_size, self.backend,
            listen_socket=listen_socket, timeout=timedelta(seconds=self.timeout_s),
        )
        pool.shutdown(wait=False)
        deadline = time.monotonic() + self.timeout_s + 5.0
        what = f"forming the weight-sync group ({world_size} ranks, {self.backend}, {address}:{port})"
        try:
            self._wait(join.done, workers, calls, what, deadline)
            group = join.result()
        except WeightSyncError:
            raise
        except Exception as err:
            pending = [_describe(i, workers[i]) for i, ref in calls.items() if not ray.wait([ref], timeout=0)[0]]
            raise WeightSyncError(f"{what} failed: {err}; not joined: {pending or 'none'}") from err
        self._collect(workers, calls, what, deadline)
        self._group = group
        self._workers = list(workers)
        self._broken = None

    def close(self) -> None:
        """Leave the group (idempotent); workers drop their side when told (best effort) or on their next init."""
        group, workers = self._group, self._workers
        self._group, self._workers = None, []
        if group is None:
            return
        calls = [worker.close_weight_sync.remote() for worker in workers]
        try:
            ray.wait(calls, num_returns=len(calls), timeout=min(self.timeout_s, 10.0))
        finally:
            try:
                group.shutdown()
            except RuntimeError:  # a group whose peers died may not shut down cleanly; it is gone
                pass

    # -- broadcast --

    def broadcast(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, dtype: torch.dtype | str
    ) -> dict[str, float]:
        """Send ``named_tensors`` (HF names, e.g. from ``model.named_parameters()``), cast to ``dtype``, to every
        worker as weight ``version``. Returns ``bytes``, ``seconds``, ``gb_per_s``, ``num_buckets``.

        The iterable is read once into a list of references (the plan needs every shape before the first byte
        moves); each bucket is packed only when it is sent.
        """
        if self._group is None:
            raise WeightSyncError("broadcast() before setup(): there is no weight-sync group")
        if self._broken is not None:
            raise WeightSyncError(f"the weight-sync group is broken ({self._broken}); call setup() again")
        torch_dtype = wire_dtype(dtype)
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in named_tensors:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            if not tensor.is_floating_point():
                raise TypeError(f"weight {name!r} has dtype {tensor.dtype}; only floating tensors are sent")
            if name in tensors:
                raise ValueError(f"weight {name!r} appears twice")
            tensors[name] = tensor
        plan = build_weight_plan([(n, t.shape) for n, t in tensors.items()], torch_dtype, self.bucket_bytes, version)
        workers = self._workers
        started = time.perf_counter()
        calls = {index: worker.receive_weights.remote(plan, version) for index, worker in enumerate(workers)}
        what = f"weight broadcast v{version}"
        try:
            if not self._handshake(workers, calls, what):
                raise WeightPlanRejected(f"{what} rejected: {self._rejections(workers, calls)}")
            for index, bucket in enumerate(plan["buckets"]):
                flat = pack_bucket(bucket, tensors, torch_dtype, self.device)
                work = self._group.broadcast([flat], self._options(torch.distributed.BroadcastOptions()))
                self._wait(work.is_completed, workers, calls, f"{what}, bucket {index}",
                           time.monotonic() + self.timeout_s)
                work.wait()
            acks = self._collect(workers, calls, what, time.monotonic() + self.timeout_s)
        except WeightPlanRejected:
            raise
        except WeightSyncError as err:
            self._broken = str(err)
            raise
        except Exception as err:  # a collective raised (peer gone, timeout)
            self._broken = f"{what}: {err}"
            raise WeightSyncError(f"{what} failed: {err}") from err
        seconds = time.perf_counter() - started
        for index, ack in acks.items():
            if ack != version:
                raise WeightSyncError(f"{what}: {_describe(index, workers[index])} acknowledged version {ack}")
        num_bytes = plan["total_numel"] * torch.empty((), dtype=torch_dtype).element_size()
        return {
            "bytes": float(num_bytes),
            "seconds": seconds,
            "gb_per_s": num_bytes / 1e9 / max(seconds, 1e-9),
            "num_buckets": float(len(plan["buckets"])),
        }

    def _options(self, options):
        options.rootRank = 0
        options.timeout = timedelta(seconds=self.timeout_s)
        return options

    def _handshake(self, workers: list, calls: dict, what: str) -> bool:
        """All-reduce (MIN) of the accept flags: True when every receiver accepted the plan."""
        flag = torch.ones(1, dtype=torch.int32, device=self.device)
        options = torch.distributed.AllreduceOptions()
        options.reduceOp = torch.distributed.ReduceOp.MIN
        options.timeout = timedelta(seconds=self.timeout_s)
        work = self._group.allreduce([flag], options)
        # A receiver that rejects the plan still joins the all-reduce, then raises WeightPlanRejected; its call may
        # finish before this side sees the all-reduce complete, so that error is not a transport failure.
        self._wait(work.is_completed, workers, calls, f"{what}, handshake", time.monotonic() + self.timeout_s,
                   tolerate=WeightPlanRejected)
        work.wait()
        return bool(flag.item() == 1)

    def _wait(
        self, done, workers: list, calls: dict, what: str, deadline: float, tolerate: type | None = None
    ) -> None:
        """Poll ``done()`` until true; raise at once if a worker's call fails (unless with ``tolerate``), or at
        ``deadline``."""
        pending = dict(calls)
        pause = 1e-4
        while not done():
            if pending:
                ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0)
                for index in [i for i, ref in pending.items() if ref in ready]:
                    try:
                        ray.get(pending.pop(index))
                    except Exception as err:
                        if tolerate is not None and isinstance(err, tolerate):
                            continue
                        failed = _describe(index, workers[index])
                        raise WeightSyncError(f"{what}: {failed} failed: {_reason(err)}") from err
            if time.monotonic() > deadline:
                waiting = [_describe(i, workers[i]) for i in pending] or "the collective itself"
                raise WeightSyncError(f"{what}: timed out after {self.timeout_s:.0f}s waiting for {waiting}")
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _collect(self, workers: list, calls: dict, what: str, deadline: float) -> dict[int, Any]:
        """Every worker's return value, naming the first that failed or did not answer by ``deadline``."""
        results = {}
        for index, ref in calls.items():
            try:
                results[index] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError as err:
                raise WeightSyncError(
                    f"{what}: {_describe(index, workers[index])} did not answer within {self.timeout_s:.0f}s"
                ) from err
            except Exception as err:
                raise WeightSyncError(f"{what}: {_describe(index, workers[index])} failed: {_reason(err)}") from err
        return results

    def _rejections(self, workers: list, calls: dict) -> str:
        """The reasons the receivers gave for refusing a plan (each raised after the handshake)."""
        reasons = []
        for index, ref in calls.items():
            try:
                ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.RayError as err:
                reasons.append(f"{_describe(index, workers[index])}: {_reason(err)}")
        return "; ".join(reasons) or "a receiver refused without a reason"
