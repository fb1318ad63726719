"""The ``MiniCritic`` actor (AsyPPO, docs/algorithms.md §2).

Each mini-critic is its own Ray actor (``critic-0``, ... in the dashboard) with its own DeepSpeed engine and
optimizer. Every critic scores every token of every response (the ensemble mean and the disagreement σ need all M
values), but critic m trains only on the rows of its own shard (``asyppo.critics.sharding.assign_shards``, which the
driver calls).

A critic starts from the critic checkpoint; :meth:`MiniCritic.restore` then loads a run's checkpoint. The driver calls
it on a resume and after Ray restarts a dead critic (its constructor runs again), so both paths load the same state.
A critic whose process was replaced between its ``values`` and ``update`` calls no longer holds the step's scores:
``update`` then raises :class:`CriticStateLost`, which the driver treats like a lost actor (restore, score, train).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from asyppo.common.config import AlgorithmConfig, CriticsConfig
from asyppo.common.deepspeed_engine import (
    accelerator_device, begin_micro_batch, init_process_group, make_engine, optimizer_step,
    scale_learning_rates,
)
from asyppo.common.files import fsync_tree
from asyppo.core.batch import RolloutBatch
from asyppo.core.losses import value_loss
from asyppo.core.schedules import lr_factor
from asyppo.core.seeds import derive_seed
from asyppo.critics.value_model import ValueModel


def checkpoint_parts(checkpoint_dir: str | Path, index: int) -> tuple[Path, Path]:
    """Where critic ``index`` keeps its state in a checkpoint: its weights (a Hugging Face directory) and its
    DeepSpeed engine state (optimizer included)."""
    return Path(checkpoint_dir) / f"critic-{index}", Path(checkpoint_dir) / f"critic-{index}-state"


class CriticStateLost(RuntimeError):
    """``update`` reached a critic that holds no scores of the step: its process was replaced (Ray restarted it, or
    the driver restored it) after ``values`` ran. The driver restores it and has it score the batch, then train."""


class MiniCritic:
    """One mini-critic: a causal-LM backbone with a scalar head, trained on its own shard only.

    ``critics`` and ``algorithm`` are the config sections it uses (its optimisation; ``value_clip``); ``dtype`` is
    the model's (bf16 on GPU), ``seed`` keys its shuffles, ``timeout_s`` bounds its process group's collectives,
    ``total_steps`` is the run's length (the learning-rate schedule, §5b), ``num_layers`` the decoder layers kept
    from the critic checkpoint (model.critic_layers; None: all).
    """

    def __init__(
        self, critic_path: str, index: int, critics: CriticsConfig, algorithm: AlgorithmConfig, *, dtype: str,
        seed: int, timeout_s: float, total_steps: int = 1, num_layers: int | None = None,
    ):
        self.config = critics
        self.value_clip = algorithm.value_clip
        self.seed = seed
        self.index = index
        self.total_steps = total_steps
        # All critics start from the same checkpoint (§2); only the data they see differs.
        torch.manual_seed(derive_seed(seed, "critic-init"))
        init_process_group(0, 1, "127.0.0.1", 0, timeout_s)  # a group of its own
        self.device = accelerator_device()
        model = ValueModel.from_pretrained(critic_path, num_layers=num_layers)
        if critics.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(self.device)
        # The head starts at zero and must reach the returns' scale, at a rate of its own (critics.head_lr).
        self.engine = make_engine(
            model, lr=critics.lr, weight_decay=0.0, zero_stage=critics.zero_stage,
            grad_clip=critics.grad_clip, bf16=self.device.type == "cuda" and dtype == "bfloat16",
            param_groups=[{"params": list(model.backbone.parameters())},
                          {"params": list(model.value_head.parameters()), "lr": critics.head_lr or critics.lr}],
        )
        self._batch: RolloutBatch | None = None
        self._old_values: torch.Tensor | None = None

    def values(self, batch: RolloutBatch) -> torch.Tensor:
        """V(s_t) for every response token of every row, ``[N, T]``, before this step's update (§2)."""
        self._batch = batch
        self.engine.module.eval()
        chunks = []
        with torch.no_grad():
            for rows in torch.arange(batch.num_sequences).split(self.config.micro_batch_size):
                chunks.append(self._values(batch.rows(rows)).float().cpu())
        self._old_values = torch.cat(chunks) * batch.response_mask
        return self._old_values

    def _values(self, batch: RolloutBatch) -> torch.Tensor:
        return self.engine.module.response_values(
            batch.input_ids.to(self.device), batch.attention_mask.to(self.device), batch.response_length
        )

    def update(self, returns: torch.Tensor, rows: list[int], step: int = 0) -> dict[str, float]:
        """Value-clipped regression to the returns on this critic's own rows (§2), at training step ``step``'s
        learning rate (§5b)."""
        if self._batch is None or self._old_values is None:
            raise CriticStateLost(f"critic-{self.index}: update() before values() (process {os.getpid()} holds no "
                                  f"scores of step {step}: it was restarted or restored after scoring)")
        start = time.perf_counter()
        if not rows:  # with the prompt split a small batch can leave a critic's shard empty this step
            return {"value_loss": 0.0, "value_clip_frac": 0.0, "tokens_per_s": 0.0, "skipped_steps": 0.0,
                    "time_train": 0.0, "num_rows": 0.0}
        crit = self.config
        scale_learning_rates(self.engine, lr_factor(step, total_steps=self.total_steps,
                                                    warmup_steps=crit.lr_warmup_steps, schedule=crit.lr_schedule,
                                                    min_ratio=crit.lr_min_ratio))
        batch, rows_t = self._batch, torch.as_tensor(rows, dtype=torch.long)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "critic-shuffle", step, self.index))
        losses, clip_fracs, tokens, skipped = [], [], 0, 0
        self.engine.module.train()
        for _ in range(crit.epochs):
            shuffled = rows_t[torch.randperm(len(rows_t), generator=generator)]
            # One optimizer step per pass over the shard: the critic's data are one mini-batch (token-mean).
            denominator = float(batch.response_mask[shuffled].sum())
            finite = True
            for micro in shuffled.split(crit.micro_batch_size):
                sub = batch.rows(micro)
                mask = sub.response_mask.to(self.device)
                begin_micro_batch(self.engine)
                loss, stats = value_loss(
                    self._values(sub), self._old_values[micro].to(self.device), returns[micro].to(self.device),
                    mask, clip=self.value_clip, denominator=denominator,
                )
                if not torch.isfinite(loss):
                    finite = False
                    break
                self.engine.backward(loss, scale_wrt_gas=False)
                losses.append(float(loss.detach()))
                clip_fracs.append(stats["value_clip_frac"])
                tokens += int(mask.sum())
            stepped, _ = optimizer_step(self.engine, finite)
            skipped += 0 if stepped else 1
        seconds = time.perf_counter() - start
        return {
            "value_loss": sum(losses),  # micro losses already share the shard's denominator
            "value_clip_frac": sum(clip_fracs) / max(len(clip_fracs), 1),
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "skipped_steps": float(skipped),
            "time_train": seconds,
            "num_rows": float(len(rows)),
        }

    def save(self, checkpoint_dir: str) -> int:
        """This critic's weights and optimizer state into ``checkpoint_dir``; returns the process id, so that the driver
        can tell a save made by a process Ray restarted since it last looked (an initial critic)."""
        weights, state = checkpoint_parts(checkpoint_dir, self.index)
        self.engine.save_checkpoint(str(state), tag="state")
        self.engine.module.save_pretrained(str(weights))
        # On shared storage only the node that wrote a file can flush it; the driver's manifest comes after.
        fsync_tree(state)
        fsync_tree(weights)
        return os.getpid()

    def restore(self, checkpoint_dir: str) -> None:
        """This critic's weights and optimizer state as saved in ``checkpoint_dir`` (by :meth:`save`)."""
        self.engine.load_checkpoint(str(checkpoint_parts(checkpoint_dir, self.index)[1]), tag="state")
        self._batch = self._old_values = None

    def ping(self) -> int:
        return self.index

    def pid(self) -> int:
        """This actor's process id: a new one means Ray restarted the actor."""
        return os.getpid()
