"""DeepSpeed plumbing shared by the learner and the mini-critics (no Ray here).

Each learner rank and each mini-critic owns a DeepSpeed engine. A critic is its own data-parallel world of size 1
(its own optimizer, its own shard), so every actor process initialises its own default process group.

Gradient accumulation is caller-owned (``managed_gradient_accumulation: false``): the caller runs ``backward`` on
each micro-batch with a loss already normalised by the whole mini-batch's denominator (docs/algorithms.md §5,
token-mean), and calls :func:`optimizer_step` once per mini-batch. That is what lets a mini-batch whose loss or
gradient is not finite be dropped without touching the weights or the optimizer state.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from datetime import timedelta
from typing import Any, Iterator

import torch

from asyppo.common.network import address_family


def accelerator_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float) -> None:
    """Join (or create) this process's default group: NCCL on GPU, gloo on CPU. Rank 0 serves the group's store on
    ``master_addr`` only (a socket bound there and handed to the store; torch's own would listen on every interface),
    so a job on 127.0.0.1 opens no port to the network; DeepSpeed then adopts the group. ``master_port`` 0: any free
    port (a group of one)."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.update(
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
    )
    timeout = timedelta(seconds=timeout_s)
    if master_port == 0 and world_size > 1:
        raise ValueError("master_port 0 (any free port) needs world_size 1: the other ranks must know the port")
    listen_fd = None
    if rank == 0:
        listener = socket.create_server((master_addr, master_port), family=address_family(master_addr))
        master_port = listener.getsockname()[1]
        listen_fd = listener.detach()
    store = torch.distributed.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout,
                                       master_listen_fd=listen_fd)
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout,
                               rank=rank, world_size=world_size)


def make_engine(
    module: torch.nn.Module, *, lr: float, weight_decay: float, zero_stage: int, grad_clip: float, bf16: bool,
    param_groups: list[dict] | None = None,
):
    """A DeepSpeed engine around ``module`` with a torch AdamW optimizer (DeepSpeed's fused ones need CUDA ops).

    Every trainable parameter trains at ``lr``, or ``param_groups`` (torch's ``[{"params": [...], "lr": ...}]``)
    give parts of the module rates of their own (a critic's zero value head learns faster than its pretrained
    backbone). The engine keeps the groups' rates as ``base_learning_rates``, which :func:`scale_learning_rates`
    multiplies by the schedule's factor (kept beside the optimizer, not in its state: a checkpoint's param groups
    replace the optimizer's when it is loaded).

    bf16 runs at ZeRO stage 1 or above: at stage 0 DeepSpeed wraps the optimizer in its unfused fp16/bf16 optimizer,
    which creates AdamW's state with a dummy step, so every real update used the bias correction of the step after
    it (the first one 0.744 of AdamW's; measured on an H200 by benchmarks/bench_gpu.py, docs/evidence.md). With
    one rank stage 1 partitions nothing, so it is stage 0 with float32 master weights and a correct AdamW.
    """
    import deepspeed

    if bf16 and zero_stage == 0:
        zero_stage = 1
    config = {
        "train_micro_batch_size_per_gpu": 1,  # unused: batches are shaped by the caller
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if param_groups is None:
        param_groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": lr}]
    optimizer = torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    engine.base_learning_rates = [group["lr"] for group in engine.optimizer.param_groups]
    return engine


def begin_micro_batch(engine) -> None:
    """Mark the start of a micro-batch's forward, as ``engine.forward()`` would.

    The learner and the critics call their module's parts directly (the backbone and chunked log-probs, the value
    head), never ``engine.forward()``. But ZeRO counts micro-batches there: ZeRO-3 copies the first backward's
    gradients into its partitions and adds the later ones, so without this call every micro-batch overwrote the last
    and a mini-batch trained on its final micro-batch alone (found by benchmarks/bench_gpu.py;
    tests/unit/test_learner_step.py checks every stage against ZeRO-0). Call it before each micro-batch's forward.
    """
    clear = getattr(engine.optimizer, "clear_backward_seen_flag", None)  # only DeepSpeed's ZeRO optimizers have it
    if clear is not None:
        clear()


def scale_learning_rates(engine, factor: float) -> None:
    """Every parameter group's rate for the next steps: its base rate times the schedule's ``factor``
    (docs/algorithms.md §5b)."""
    for group, base in zip(engine.optimizer.param_groups, engine.base_learning_rates, strict=True):
        group["lr"] = base * factor


def _local_grad_norm(engine) -> float:
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def all_ranks_agree(flag: bool) -> bool:
    """True only if ``flag`` is True on every rank of the default group."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=accelerator_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return bool(tensor.item() > 0)


def all_ranks_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over every rank of the default group (float64; unchanged with one rank)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.tolist()


def all_ranks_gather(value: Any) -> list[Any]:
    """``value`` of every rank of the default group, in rank order (any picklable object; ``[value]`` with one)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def optimizer_step(engine, losses_finite: bool) -> tuple[bool, float]:
    """Apply one optimizer step for the accumulated mini-batch, or drop it.

    Returns ``(applied, grad_norm)``, the norm of the gradient averaged over the ranks, before clipping. The step is
    skipped (gradients discarded, weights and optimizer state untouched) when any rank saw a non-finite loss or the
    gradient norm is not finite: checked here before the step for ZeRO 0 and 1, and by DeepSpeed inside the step for
    ZeRO 2 and 3 (reported by ``was_step_applied``).
    """
    stage = engine.zero_optimization_stage()
    several_ranks = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    reduce_here = stage == 0 and several_ranks
    if reduce_here:
        # ZeRO-0 would average the ranks' gradients inside step() and report no norm: averaged here instead (with
        # the reduction step() would run; allreduce_gradients() reduces only inside step() when the caller owns the
        # accumulation), the norm below is the one of the gradient the step applies.
        engine.buffered_allreduce_fallback()
    grad_norm: float | None = None  # ZeRO-1/2/3 report the norm of the reduced gradient after step()
    if stage < 2:
        # At ZeRO-1 with several ranks this is the rank's own gradient (reduced inside step()): a finiteness check.
        grad_norm = _local_grad_norm(engine)
    finite = all_ranks_agree(losses_finite and (grad_norm is None or math.isfinite(grad_norm)))
    if not finite:
        engine.zero_grad()
        engine.optimizer.zero_grad()
        return False, float("nan") if grad_norm is None else grad_norm
    with _reduction_done(engine, reduce_here):
        engine.step()
    reported = engine.get_global_grad_norm()
    if reported is not None:
        grad_norm = float(reported)
    # DeepSpeed's ZeRO optimizers check the partitioned gradients themselves (all ranks agree through their own
    # all-reduce) and drop the step on an overflow or a non-finite norm.
    return engine.was_step_applied(), float("nan") if grad_norm is None else grad_norm


@contextlib.contextmanager
def _reduction_done(engine, done: bool) -> Iterator[None]:
    """Within it, ``engine.step()`` does not all-reduce the gradients again (when ``done``)."""
    if not done:
        yield
        return
    previous, engine.enable_backward_allreduce = engine.enable_backward_allreduce, False
    try:
        yield
    finally:
        engine.enable_backward_allreduce = previous


def master_weights(engine) -> torch.Tensor:
    """Every parameter's float32 master copy, flattened, on the CPU: ZeRO 1-3 keep one in the optimizer (read with
    ``safe_get_full_fp32_param``), DeepSpeed's unfused fp16/bf16 optimizer in ``fp32_groups`` beside ``fp16_groups``,
    and a float32 engine has only the parameters. For checks and benchmarks (docs/evidence.md, "The GPU paths")."""
    from deepspeed.utils import safe_get_full_fp32_param

    unfused = {}
    if hasattr(engine.optimizer, "fp16_groups") and hasattr(engine.optimizer, "fp32_groups"):
        for low, high in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups):
            if isinstance(low, list) and isinstance(high, list):
                unfused.update({id(p): master for p, master in zip(low, high)})
    parts = []
    for param in engine.module.parameters():
        master = safe_get_full_fp32_param(param)
        if master is None:
            master = unfused.get(id(param), param)
        parts.append(master.detach().float().reshape(-1).cpu())
    return torch.cat(parts)


@contextlib.contextmanager
def full_parameters(engine) -> Iterator[torch.nn.Module]:
    """The engine's module with every parameter whole (ZeRO-3 gathers them; other stages already are)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield engine.module
    else:
        yield engine.module
