"""Mini-critic actors (AsyPPO, ALGORITHMS.md §2) and the pool that spawns and drives them.

Each ``MiniCritic`` is its own Ray actor with its own DeepSpeed engine and optimizer. Every critic scores every
token of every response (the ensemble mean and the disagreement σ need all M values), but critic m trains only on
the rows of its own shard (``critics.sharding.assign_shards``).
"""

from __future__ import annotations

import time
from pathlib import Path

import ray
import torch

from cluster.config import JobConfig
from critics.sharding import assign_shards
from critics.value_model import ValueModel
from learner.batch import RolloutBatch
from learner.deepspeed_engine import (
    accelerator_device, free_port, init_process_group, make_engine, optimizer_step,
)
from learner.losses import value_loss


class MiniCritic:
    """One mini-critic: a causal-LM backbone with a scalar head, trained on its own shard only."""

    def __init__(self, cfg: JobConfig, critic_path: str, index: int, resume_dir: str | None = None):
        self.cfg = cfg
        self.index = index
        # All critics start from the same checkpoint (§2); only the data they see differs.
        torch.manual_seed(cfg.trainer.seed)
        init_process_group(0, 1, "127.0.0.1", free_port(), cfg.trainer.call_timeout_s)
        self.device = accelerator_device()
        source = Path(resume_dir) / f"critic-{index}" if resume_dir else Path(critic_path)
        model = ValueModel.from_pretrained(str(source))
        self.engine = make_engine(
            model.to(self.device), lr=cfg.critics.lr, weight_decay=0.0, zero_stage=cfg.critics.zero_stage,
            grad_clip=cfg.critics.grad_clip, bf16=self.device.type == "cuda" and cfg.model.dtype == "bfloat16",
        )
        if resume_dir:
            self.engine.load_checkpoint(str(Path(resume_dir) / f"critic-{index}-state"), tag="state")
        self._batch: RolloutBatch | None = None
        self._old_values: torch.Tensor | None = None

    def values(self, batch: RolloutBatch) -> torch.Tensor:
        """V(s_t) for every response token of every row, ``[N, T]``, before this step's update (§2)."""
        self._batch = batch
        self.engine.module.eval()
        chunks = []
        with torch.no_grad():
            for rows in torch.arange(batch.num_sequences).split(self.cfg.critics.micro_batch_size):
                chunks.append(self._values(batch.rows(rows)).float().cpu())
        self._old_values = torch.cat(chunks) * batch.response_mask
        return self._old_values

    def _values(self, batch: RolloutBatch) -> torch.Tensor:
        return self.engine.module.response_values(
            batch.input_ids.to(self.device), batch.attention_mask.to(self.device), batch.response_length
        )

    def train(self, returns: torch.Tensor, rows: list[int]) -> dict[str, float]:
        """Value-clipped regression to the returns on this critic's own rows (§2)."""
        if self._batch is None or self._old_values is None:
            raise RuntimeError(f"critic-{self.index}: train() before values()")
        start = time.perf_counter()
        if not rows:  # with the prompt split a small batch can leave a critic's shard empty this step
            return {"value_loss": 0.0, "value_clip_frac": 0.0, "tokens_per_s": 0.0, "skipped_steps": 0.0,
                    "time_train": 0.0, "num_rows": 0.0}
        crit = self.cfg.critics
        batch, rows_t = self._batch, torch.as_tensor(rows, dtype=torch.long)
        generator = torch.Generator().manual_seed(self.cfg.trainer.seed + 7919 * self.index)
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
                loss, stats = value_loss(
                    self._values(sub), self._old_values[micro].to(self.device), returns[micro].to(self.device),
                    mask, clip=crit.value_clip, denominator=denominator,
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

    def save(self, checkpoint_dir: str) -> None:
        target = Path(checkpoint_dir)
        self.engine.save_checkpoint(str(target / f"critic-{self.index}-state"), tag="state")
        self.engine.module.save_pretrained(str(target / f"critic-{self.index}"))

    def ping(self) -> int:
        return self.index


class CriticPool:
    """Driver-side handle on M ``MiniCritic`` actors (named ``critic-0`` … ``critic-{M-1}``)."""

    def __init__(self, cfg: JobConfig, critic_path: str, placement, resume_dir: str | None = None):
        self.cfg = cfg
        self.actors = [
            ray.remote(MiniCritic).options(
                name=f"critic-{m}", max_restarts=0, **placement.options_for("critics", m),
            ).remote(cfg, critic_path, m, resume_dir)
            for m in range(cfg.critics.num_critics)
        ]

    def __len__(self) -> int:
        return len(self.actors)

    def values(self, batch_ref) -> list:
        """One ``[N, T]`` ObjectRef per critic; the learner stacks them into ``[M, N, T]``."""
        return [actor.values.remote(batch_ref) for actor in self.actors]

    def train(self, returns_ref, prompt_ids: list[str], group_size: int, step: int) -> list:
        shards = assign_shards(
            prompt_ids, group_size, len(self.actors), self.cfg.critics.split, seed=self.cfg.trainer.seed + step
        )
        return [actor.train.remote(returns_ref, rows) for actor, rows in zip(self.actors, shards)]

    def save(self, checkpoint_dir: str) -> list:
        return [actor.save.remote(checkpoint_dir) for actor in self.actors]
