"""The sending half of the weight broadcast: ``WeightBroadcaster`` on the learner's rank 0.

It forms the group with every rollout worker once (``setup``) and sends each new version (``broadcast``) following
``asyppo.weight_sync.protocol``. Every collective has a timeout (the group's, and a deadline here); while waiting,
the sender also watches the workers' Ray calls, so a worker that dies or raises is reported at once, by index and
actor, instead of after the timeout. After a transport failure the group is marked broken; call
:meth:`WeightBroadcaster.setup` again.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import ray
import torch

from asyppo.weight_sync.protocol import (
    WeightPlanRejected,
    WeightSyncError,
    build_weight_plan,
    pack_bucket,
    wire_dtype,
)


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
    ``bucket_mb``: size of one flat bucket (MiB). Each side holds two buckets at most: the sender packs the next
    while one is on the wire, and each receiver receives the next while vLLM loads the last.
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
            buckets = plan["buckets"]
            flat = pack_bucket(buckets[0], tensors, torch_dtype, self.device)
            for index in range(len(buckets)):
                work = self._group.broadcast([flat], self._options(torch.distributed.BroadcastOptions()))
                # Pack the next bucket while this one is on the wire (two buckets in memory at most).
                flat = pack_bucket(buckets[index + 1], tensors, torch_dtype, self.device) if index + 1 < len(buckets) else None
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
