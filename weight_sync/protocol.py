"""The learner -> rollout weight broadcast protocol: plan, version stamp and wire format (no Ray import).

The group joins the learner's rank 0 (rank 0 here) with every vLLM worker process of every rollout worker
(rank ``1 + i·tp + tp_rank``). It is built with vLLM's *stateless* process-group helper, so neither side's
default group is touched: DeepSpeed owns the learner's, vLLM owns its own. gloo on CPU, NCCL on GPU.

One broadcast, in order:

1. **Plan** (a plain dict, shipped through Ray with ``receive_weights.remote(plan, version)``): the wire dtype,
   the version stamp and, per bucket, every tensor's name, shape and offset in the bucket (:func:`build_weight_plan`).
2. **Handshake**: one ``MIN`` all-reduce of an accept flag. Each receiver first checks the plan
   (:func:`validate_weight_plan`, :func:`check_incoming_version`: newer than what it holds;
   :func:`check_names_against_checkpoint`: names and shapes equal to its checkpoint's); if any rank rejects, every
   rank stops here, nothing is loaded, and the group stays usable. Without this step a rejecting receiver would
   leave the sender blocked inside a broadcast nobody answers.
3. **Buckets**: each bucket is one flat contiguous tensor of the wire dtype (:func:`pack_bucket`), broadcast from
   rank 0; receivers stream the views (:func:`unpack_bucket`) into vLLM's layerwise reload.
4. **Acks**: the Ray return values of ``receive_weights``; each says the version now loaded.

The sending half is ``asyppo.weight_sync.sender`` (learner rank 0, Ray), the receiving half
``asyppo.weight_sync.receiver`` (inside the rollout worker and its vLLM processes, no Ray). docs/architecture.md,
"Data and weights", shows where the protocol sits in a training step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

PLAN_FORMAT = 1
# Every rejection message starts with this, so that the rollout worker can recognise a rejection in the text that
# vLLM forwards from its worker processes (see rejection_from_engine_error).
REJECTED_MARKER = "weight plan rejected"
# Wire dtypes a plan may name. Weights are floating point; anything else is a caller mistake.
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class WeightSyncError(RuntimeError):
    """A weight broadcast or the group set-up failed; the message names the worker(s) and the phase."""


class WeightPlanRejected(WeightSyncError):
    """A receiver refused a plan before any tensor moved (stale or mismatched version, unknown names or shapes).

    Raised by the receiving side after the handshake, and by :meth:`WeightBroadcaster.broadcast` with every
    receiver's reason. Nothing was loaded and the group stays usable.
    """


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
    bucket of its own) and record where each tensor lives. docs/architecture.md, "Data and weights".

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



# ---- receiver-side checks --------------------------------------------------------------------------------------

def check_incoming_version(plan_version: Any, version: Any, current_version: int) -> None:
    """Accept only a plan stamped with the announced version, newer than the weights held now.

    Raises ``WeightPlanRejected`` (message starting with ``REJECTED_MARKER``) otherwise. A stale or repeated
    version means the sender and this worker disagree about what was loaded, so loading it could silently mix
    policies (docs/architecture.md, "Data and weights").
    """
    for label, value in (("plan version", plan_version), ("announced version", version)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise WeightPlanRejected(f"{REJECTED_MARKER}: {label} {value!r} is not an int")
    if plan_version != version:
        raise WeightPlanRejected(
            f"{REJECTED_MARKER}: the plan is stamped v{plan_version} but was announced as v{version}"
        )
    if version <= current_version:
        raise WeightPlanRejected(
            f"{REJECTED_MARKER}: stale weight version v{version}; this worker already holds v{current_version} "
            "(versions must increase)"
        )


def check_names_against_checkpoint(shapes: dict[str, list[int]], expected: dict[str, list[int]] | None) -> None:
    """The incoming tensors must be exactly the checkpoint's tensors (HF names), with the same shapes.

    ``expected`` is None when the engine's model directory has no safetensors files to compare with; the check is
    then skipped. Catches a sender with wrapped names (``module.…``), a different architecture, or a missing
    parameter, before anything is loaded.
    """
    if expected is None:
        return
    unknown = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes))
    if unknown or missing:
        raise WeightPlanRejected(
            f"{REJECTED_MARKER}: tensor names differ from the rollout checkpoint's: "
            f"{len(unknown)} unknown (e.g. {unknown[:3]}), {len(missing)} missing (e.g. {missing[:3]})"
        )
    wrong = [(name, shape, expected[name]) for name, shape in shapes.items() if list(shape) != list(expected[name])]
    if wrong:
        name, got, want = wrong[0]
        raise WeightPlanRejected(
            f"{REJECTED_MARKER}: {len(wrong)} tensors have other shapes than the rollout checkpoint's, "
            f"e.g. {name!r}: {got} vs {want}"
        )




def rejection_from_engine_error(err: Exception) -> WeightPlanRejected | None:
    """The ``WeightPlanRejected`` behind an engine error, or None if the error is something else.

    vLLM's ``collective_rpc`` forwards only the text of an exception raised in its worker processes, not its type;
    a rejection is recognised by ``REJECTED_MARKER`` and the part that says why is kept.
    """
    reason = str(err)
    if REJECTED_MARKER not in reason:
        return None
    return WeightPlanRejected(reason[reason.index(REJECTED_MARKER):].split("', please check the stack trace")[0])


def probe_mismatch(learner_logps: list[list[float]], engine_logps: list[list[list[float]]], tolerance: float) -> float:
    """The post-broadcast weight check: mean ``|Δ logπ|`` between the learner and each engine on the same probe
    sequences; returns the worst engine's figure.

    Raises:
        WeightSyncError: naming the first engine (``rollout-<i>``) whose figure is above ``tolerance`` or not a
            number (NaN weights on either side fail the check rather than pass it).
    """
    reference = np.concatenate([np.asarray(seq, dtype=np.float64) for seq in learner_logps])
    worst = 0.0
    for index, logps in enumerate(engine_logps):
        diff = float(np.abs(np.concatenate([np.asarray(seq, dtype=np.float64) for seq in logps]) - reference).mean())
        if not diff <= tolerance:
            raise WeightSyncError(
                f"rollout-{index} disagrees with the learner after the weight broadcast: mean |Δlogp| = {diff:.3g}, "
                f"above weight_sync.check_tolerance={tolerance}"
            )
        worst = max(worst, diff)
    return worst
