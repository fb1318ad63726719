"""The receiving half of the weight broadcast, in the rollout worker (``EngineWeights``) and inside each of its
vLLM worker processes (``WeightSyncExtension``). No Ray import: it follows ``asyppo.weight_sync.protocol``.

``RolloutWorker`` passes ``worker_extension_cls="asyppo.weight_sync.receiver.WeightSyncExtension"`` to ``vllm.LLM``;
every method of that class then runs inside each vLLM worker process (one per tensor-parallel rank) through
``LLM.collective_rpc``, which ``EngineWeights`` calls. Method and attribute names carry an ``asyppo_`` prefix
because vLLM refuses extensions whose names clash with its worker's (its worker already has ``update_weights``,
``reload_weights``, ...).

Loading uses vLLM's own in-place reload (``Worker.reload_weights``, the layerwise reload: each layer is
re-materialised, loaded with the model's ``load_weights`` from checkpoint-format HF names, re-processed, and copied
back into the original storage). One gap is patched here, see :func:`reprocess_tied_layers`.
"""

from __future__ import annotations

import glob
import os
from datetime import timedelta
from typing import Any

import torch

from asyppo.weight_sync.protocol import (
    REJECTED_MARKER,
    WeightPlanRejected,
    check_incoming_version,
    check_names_against_checkpoint,
    plan_shapes,
    rejection_from_engine_error,
    unpack_bucket,
    validate_weight_plan,
    wire_dtype,
)

EXTENSION = "asyppo.weight_sync.receiver.WeightSyncExtension"


class EngineWeights:
    """The rollout worker's side: which weight version its vLLM engine holds, whether the weights are whole, and
    the calls that make the engine's worker processes join the group and load a broadcast.

    ``valid`` is False after a transfer that failed half-way (layers may then hold a mix of versions); the worker
    refuses to sample until a broadcast succeeds.
    """

    def __init__(self, llm, worker_index: int, tensor_parallel_size: int):
        self.llm = llm
        self.worker_index = worker_index
        self.tensor_parallel_size = tensor_parallel_size
        self.version = 0
        self.valid = True
        self._sync_timeout_s: float | None = None  # set once in a weight-sync group

    def join(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int, backend: str,
        timeout_s: float,
    ) -> None:
        """Join the learner's weight-sync group (every tensor-parallel rank; ranks rank_offset … +tp−1)."""
        if rank_offset < 1 or rank_offset + self.tensor_parallel_size > world_size:
            raise ValueError(
                f"ranks {rank_offset}..{rank_offset + self.tensor_parallel_size - 1} of this worker do not fit in a "
                f"weight-sync world of {world_size} (rank 0 is the learner)"
            )
        self._sync_timeout_s = None  # the engine leaves any previous group first
        self.llm.collective_rpc(
            "asyppo_init_weight_sync", timeout=timeout_s + 30.0,
            args=(master_address, master_port, rank_offset, world_size, backend, timeout_s),
        )
        self._sync_timeout_s = timeout_s

    def leave(self) -> None:
        """Leave the weight-sync group (the learner is closing it)."""
        self.llm.collective_rpc("asyppo_close_weight_sync", timeout=60.0)
        self._sync_timeout_s = None

    def receive(self, plan: dict, version: int) -> int:
        """Receive weight ``version`` as described by ``plan`` (the learner broadcasts the buckets meanwhile).

        Raises ``WeightPlanRejected`` if the plan was refused (nothing changed), else ``RuntimeError`` on a failed
        transfer (then the weights are incomplete: the worker refuses to sample until a broadcast succeeds).
        """
        timeout_s = self._sync_timeout_s
        if timeout_s is None:
            raise RuntimeError("receive_weights before init_weight_sync: this worker is in no weight-sync group")
        buckets = len(plan.get("buckets", ())) if isinstance(plan, dict) else 0
        return self._load_on_workers(
            "asyppo_receive_weights", (plan, version), version, timeout=(buckets + 2) * timeout_s + 60.0
        )

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """The simple path: a whole state dict (e.g. through Ray's object store); same checks as a broadcast."""
        from safetensors.torch import save

        # vLLM's RPC serialises tensor arguments in a way its worker queue cannot pickle; plain bytes pass.
        blob = save({name: tensor.detach().contiguous() for name, tensor in state_dict.items()})
        return self._load_on_workers("asyppo_load_serialized_weights", (blob, version), version)

    def require_valid(self) -> None:
        if not self.valid:
            raise RuntimeError(
                f"rollout worker #{self.worker_index}: a weight transfer failed half-way, the engine holds a mix of "
                f"versions; broadcast the weights again (or restart the worker) before sampling"
            )

    def engine_states(self) -> list[dict[str, Any]] | None:
        """Each vLLM worker process's ``asyppo_weight_state``, or None when the engine does not answer."""
        try:
            return self.llm.collective_rpc("asyppo_weight_state", timeout=30.0)
        except Exception:  # noqa: BLE001 - whatever the failure, the engine does not answer
            return None

    def _load_on_workers(self, method: str, args: tuple, version: int, timeout: float | None = None) -> int:
        """Run a weight-loading RPC on every vLLM worker; a rejected plan keeps the old weights valid."""
        try:
            acks = self.llm.collective_rpc(method, timeout=timeout, args=args)
        except Exception as err:
            rejection = rejection_from_engine_error(err)
            if rejection is not None:
                raise rejection from None
            states = self.engine_states()
            # An engine that cannot say must be assumed broken.
            self.valid = states is not None and all(s["weights_valid"] for s in states)
            raise
        if any(ack != version for ack in acks):
            raise RuntimeError(
                f"rollout worker #{self.worker_index}: ranks acknowledged versions {acks}, not {version}"
            )
        # KV blocks cached under the old weights must not be reused.
        self.llm.reset_prefix_cache()
        self.version = version
        self.valid = True
        return version


def checkpoint_tensor_shapes(model_dir: str) -> dict[str, list[int]] | None:
    """Name → shape of every tensor in a local safetensors checkpoint (headers only), or None if there is none."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                shapes[name] = list(handle.get_slice(name).get_shape())
    return shapes


@torch.no_grad()
def reprocess_tied_layers(model: torch.nn.Module) -> list[str]:
    """Re-run weight post-processing for every module that shares a parameter with an earlier module.

    vLLM's layerwise reload processes a shared (tied) parameter only in its first owner (documented limitation 2
    in ``vllm/model_executor/model_loader/reload``). On CPU the LM head keeps a pre-packed copy of the weight made
    by that processing, so a tied LM head would go on computing logits from the *old* embedding matrix. Returns
    the names of the modules reprocessed.
    """
    owner: dict[int, str] = {}
    reprocessed = []
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            first = owner.setdefault(id(param), module_name)
            if first != module_name:
                quant_method = getattr(module, "quant_method", None)
                if quant_method is not None:
                    quant_method.process_weights_after_loading(module)
                    reprocessed.append(module_name)
                break
    return reprocessed


class _SyncGroup:
    """This worker's side of the learner's weight-sync group."""

    def __init__(self, group, rank: int, world_size: int, backend: str, timeout_s: float, device: torch.device):
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_s)
        self.device = device

    def handshake(self, accept: bool) -> bool:
        """MIN all-reduce of the accept flags (see ``asyppo.weight_sync.protocol``): True if every rank accepted."""
        flag = torch.tensor([1 if accept else 0], dtype=torch.int32, device=self.device)
        options = torch.distributed.AllreduceOptions()
        options.reduceOp = torch.distributed.ReduceOp.MIN
        options.timeout = self.timeout
        self.group.allreduce([flag], options).wait()
        return bool(flag.item() == 1)

    def start_receive(self, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """Post the receive of the next bucket into a new buffer; :meth:`finish_receive` waits for it."""
        flat = torch.empty(numel, dtype=dtype, device=self.device)
        options = torch.distributed.BroadcastOptions()
        options.rootRank = 0
        options.timeout = self.timeout
        return flat, self.group.broadcast([flat], options)

    @staticmethod
    def finish_receive(pending: tuple[torch.Tensor, Any]) -> torch.Tensor:
        flat, work = pending
        work.wait()
        return flat

    def shutdown(self) -> None:
        try:
            self.group.shutdown()
        except RuntimeError:  # the peers may be gone; the group is unusable either way
            pass


class WeightSyncExtension:
    """Mixed into vLLM's worker class. Holds the sync group, the loaded weight version and whether the weights are
    whole (False after a transfer that failed half-way: layers may then hold a mix of versions)."""

    # -- state (instance attributes appear on first use: vLLM mixes this class in without calling __init__) --

    def _asyppo_state(self) -> dict[str, Any]:
        state = self.__dict__.get("_asyppo_sync_state")
        if state is None:
            state = {"group": None, "version": 0, "weights_valid": True, "checkpoint_shapes": False}
            self.__dict__["_asyppo_sync_state"] = state
        return state

    def _asyppo_expected_shapes(self) -> dict[str, list[int]] | None:
        state = self._asyppo_state()
        if state["checkpoint_shapes"] is False:  # not read yet (None means: nothing to compare with)
            state["checkpoint_shapes"] = checkpoint_tensor_shapes(self.model_config.model)
        return state["checkpoint_shapes"]

    def asyppo_weight_state(self) -> dict[str, Any]:
        """Version held, whether the weights are whole, and this rank in the sync group (None if not joined)."""
        state = self._asyppo_state()
        group = state["group"]
        return {
            "version": state["version"],
            "weights_valid": state["weights_valid"],
            "sync_rank": None if group is None else group.rank,
        }

    # -- group --

    def asyppo_init_weight_sync(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int, backend: str,
        timeout_s: float,
    ) -> int:
        """Join the learner's group as rank ``rank_offset + tp_rank`` (replacing any previous group); returns it."""
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        if get_pp_group().world_size != 1:
            raise NotImplementedError("weight sync supports tensor parallelism only (pipeline_parallel_size == 1)")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight sync backend must be 'gloo' or 'nccl', got {backend!r}")
        rank = rank_offset + get_tp_group().rank_in_group
        if not 1 <= rank < world_size:
            raise ValueError(f"weight sync rank {rank} (offset {rank_offset}) outside 1..{world_size - 1}")
        self.asyppo_close_weight_sync()
        device = self.device if backend == "nccl" else torch.device("cpu")
        group = stateless_init_torch_distributed_process_group(
            master_address, master_port, rank, world_size, backend, timeout=timedelta(seconds=timeout_s)
        )
        self._asyppo_state()["group"] = _SyncGroup(group, rank, world_size, backend, timeout_s, device)
        return rank

    def asyppo_close_weight_sync(self) -> None:
        state = self._asyppo_state()
        if state["group"] is not None:
            state["group"].shutdown()
            state["group"] = None

    # -- loading --

    def asyppo_receive_weights(self, plan: dict[str, Any], version: int) -> int:
        """Check the plan, take part in the handshake, then receive every bucket straight into the model.

        Returns the version now loaded. Raises ``WeightPlanRejected`` (nothing loaded, group intact) or, if the
        transfer itself fails, ``RuntimeError`` after leaving the group and marking the weights incomplete.
        """
        state = self._asyppo_state()
        sync: _SyncGroup | None = state["group"]
        if sync is None:
            raise RuntimeError("receive_weights before init_weight_sync: this worker is in no weight-sync group")
        rejection = None
        try:
            validate_weight_plan(plan)
            check_incoming_version(plan["version"], version, state["version"])
            check_names_against_checkpoint(plan_shapes(plan), self._asyppo_expected_shapes())
        except (ValueError, TypeError, KeyError) as err:  # WeightPlanRejected is neither; caught below
            rejection = WeightPlanRejected(f"{REJECTED_MARKER}: malformed plan: {err}")
        except WeightPlanRejected as err:
            rejection = err
        try:
            accepted = sync.handshake(rejection is None)
        except Exception as err:
            self.asyppo_close_weight_sync()
            raise RuntimeError(f"weight v{version}: handshake with the learner failed: {err}") from err
        if rejection is not None:
            raise rejection
        if not accepted:
            raise WeightPlanRejected(f"{REJECTED_MARKER}: v{version} was refused by another receiver")

        dtype = wire_dtype(plan["dtype"])
        received = 0

        def stream():
            # Double-buffered: the next bucket is received while vLLM loads this one. Each bucket gets a buffer of
            # its own, since the loader may keep the yielded views until a layer is complete.
            nonlocal received
            buckets = plan["buckets"]
            pending = sync.start_receive(buckets[0]["numel"], dtype)
            for index, bucket in enumerate(buckets):
                flat = sync.finish_receive(pending)
                received += 1
                if index + 1 < len(buckets):
                    pending = sync.start_receive(buckets[index + 1]["numel"], dtype)
                yield from unpack_bucket(flat, bucket)

        state["weights_valid"] = False
        try:
            self._asyppo_load(stream())
        except Exception as err:
            self.asyppo_close_weight_sync()
            raise RuntimeError(
                f"weight v{version}: transfer failed after {received}/{len(plan['buckets'])} buckets ({err}); "
                f"this worker's weights are now incomplete and it left the sync group"
            ) from err
        if received != len(plan["buckets"]):
            self.asyppo_close_weight_sync()
            raise RuntimeError(
                f"weight v{version}: the model consumed {received}/{len(plan['buckets'])} buckets; group left"
            )
        state["version"] = version
        state["weights_valid"] = True
        return version

    def asyppo_load_serialized_weights(self, blob: bytes, version: int) -> int:
        """The simple path: weights as safetensors bytes (via Ray's object store and this RPC), same checks."""
        from safetensors.torch import load

        state = self._asyppo_state()
        tensors = load(blob)
        check_incoming_version(version, version, state["version"])
        check_names_against_checkpoint({n: list(t.shape) for n, t in tensors.items()}, self._asyppo_expected_shapes())
        state["weights_valid"] = False
        self._asyppo_load(iter(tensors.items()))
        state["version"] = version
        state["weights_valid"] = True
        return version

    def _asyppo_load(self, weights) -> None:
        from vllm.config import set_current_vllm_config

        self.reload_weights(weights_iterator=weights)
        with set_current_vllm_config(self.vllm_config):
            reprocess_tied_layers(self.model_runner.get_model())
