"""The ``Learner`` actor: owns the policy's DeepSpeed engine and runs the AsyPPO + ERC update.

A thin shell around the pure core (``asyppo.core.batch``, ``asyppo.core.losses``, ``asyppo.core.logprobs``). One
instance per data-parallel rank; rank 0 (named ``learner`` in the Ray dashboard) also owns the weight broadcast to
the rollout workers (``asyppo.weight_sync.sender``). Section numbers (§N) refer to docs/algorithms.md. Every rank receives the whole rollout batch and computes the same advantages; rank r runs
micro-batches r, r+R, … of each mini-batch, so the token-mean denominator is the whole mini-batch's on every rank.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from asyppo.cluster.config import AlgorithmConfig, LearnerConfig, WeightSyncConfig
from asyppo.cluster.deepspeed_engine import (
    accelerator_device, full_parameters, init_process_group, make_engine, optimizer_step,
)
from asyppo.core.batch import AdvantageResult, RolloutBatch, compute_advantages
from asyppo.core.logprobs import response_logprobs
from asyppo.core.losses import entropy_bonus, nll_loss, policy_loss

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


class Learner:
    """One data-parallel rank of the learner.

    ``algorithm`` and ``learner`` are the config sections it uses; ``temperature`` is the rollout's (log-probs and
    entropies are those of the sampling distribution), ``dtype`` the model's (bf16 on GPU, and the wire dtype of the
    broadcast), ``seed`` keys every random draw, ``timeout_s`` bounds the process group's collectives.
    """

    def __init__(
        self, policy_path: str, algorithm: AlgorithmConfig, learner: LearnerConfig, *, temperature: float,
        dtype: str, seed: int, timeout_s: float, rank: int = 0, world_size: int = 1,
        master_addr: str = "127.0.0.1", master_port: int = 29500, resume_state_dir: str | None = None,
    ):
        from transformers import AutoModelForCausalLM

        self.algorithm = algorithm
        self.config = learner
        self.temperature = temperature
        self.dtype = dtype
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.policy_path = policy_path
        torch.manual_seed(seed)
        init_process_group(rank, world_size, master_addr, master_port, timeout_s)
        self.device = accelerator_device()
        bf16 = self.device.type == "cuda" and dtype == "bfloat16"
        model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        model.config.use_cache = False
        self.engine = make_engine(
            model.to(self.device), lr=learner.lr, weight_decay=learner.weight_decay,
            zero_stage=learner.zero_stage, grad_clip=learner.grad_clip, bf16=bf16,
        )
        if resume_state_dir is not None:
            self.engine.load_checkpoint(resume_state_dir, tag="state", load_module_strict=True)
        self.version = 0
        self.broadcaster = None
        self._batch: RolloutBatch | None = None
        self._old_logp: torch.Tensor | None = None
        self._old_entropy: torch.Tensor | None = None
        self._advantages: AdvantageResult | None = None

    # ---- per-step phases -------------------------------------------------------------------------------------

    def _forward(self, batch: RolloutBatch, *, with_entropy: bool, entropy_requires_grad: bool = False):
        return response_logprobs(
            self.engine.module, batch.input_ids.to(self.device), batch.attention_mask.to(self.device),
            batch.response_length, temperature=self.temperature,
            chunk_size=self.config.logprob_chunk, with_entropy=with_entropy,
            entropy_requires_grad=entropy_requires_grad,
        )

    def compute_old(self, batch: RolloutBatch) -> dict[str, float]:
        """logπ_old and H_old for every response token, no graph, in micro-batches (docs/algorithms.md §5)."""
        start = time.perf_counter()
        self._batch = batch
        logps, entropies = [], []
        self.engine.module.eval()
        with torch.no_grad():
            for rows in torch.arange(batch.num_sequences).split(self.config.micro_batch_size):
                logp, entropy = self._forward(batch.rows(rows), with_entropy=True)
                logps.append(logp.float().cpu())
                entropies.append(entropy.float().cpu())
        self._old_logp, self._old_entropy = torch.cat(logps), torch.cat(entropies)
        mask = batch.response_mask
        valid = mask.sum().clamp(min=1)
        return {
            "entropy_mean": float((self._old_entropy * mask).sum() / valid),
            # The rollout engine sampled with the weights of batch.weight_version; with max_staleness 0 that is the
            # learner's current version, so this gap is numerical noise; otherwise it measures the staleness.
            "rollout_learner_logp_gap": float(((batch.rollout_logprobs - self._old_logp).abs() * mask).sum() / valid),
            "time_old_logprobs": time.perf_counter() - start,
        }

    def prepare(self, *values: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Ensemble values → σ, masks, advantages and returns; returns (critic targets, stats) (§3, §4)."""
        if self._batch is None:
            raise RuntimeError("prepare() before compute_old(): the learner has no rollout batch")
        stacked = torch.stack([v.float() for v in values]) if values else None
        alg = self.algorithm
        valid = self._batch.response_mask > 0
        if stacked is not None and not bool(torch.isfinite(stacked[:, valid]).all()):
            # A diverged critic: NaN advantages and returns make every loss of this step non-finite, so the
            # learner and the critics all skip it (weights untouched) and the metrics show skipped_steps.
            log.warning("critic values are not finite; this step's updates are skipped")
            nan = torch.full_like(self._batch.response_mask, float("nan"))
            self._advantages = AdvantageResult(nan, nan, None, None, {"nonfinite_values": 1.0})
            return nan, self._advantages.stats
        self._advantages = compute_advantages(
            self._batch, stacked, estimator=alg.estimator, gamma=alg.gamma, lam=alg.lam, ensemble=alg.ensemble,
            adv_mask_fraction=alg.adv_mask_fraction, entropy_filter_fraction=alg.entropy_filter_fraction,
        )
        return self._advantages.returns, self._advantages.stats

    def update(self, step: int) -> dict[str, float]:
        """PPO epochs over shuffled mini-batches with the masks, the entropy filter and ERC (§5)."""
        if self._advantages is None or self._batch is None:
            raise RuntimeError("update() before prepare(): nothing to train on")
        start = time.perf_counter()
        lrn = self.config
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        self.engine.module.train()
        totals: dict[str, float] = {}
        micro_count = applied = skipped = tokens = 0
        grad_norms: list[float] = []
        for _ in range(lrn.epochs):
            order = torch.randperm(self._batch.num_sequences, generator=generator)
            for mini in order.split(lrn.mini_batch_size):
                finite, micro_stats, mini_tokens = self.accumulate_gradients(mini)
                for stats in micro_stats:
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + value
                micro_count += len(micro_stats)
                tokens += mini_tokens
                stepped, grad_norm = optimizer_step(self.engine, finite)
                if stepped:
                    applied += 1
                    grad_norms.append(grad_norm)
                else:
                    skipped += 1
        self.version += 1 if applied else 0
        seconds = time.perf_counter() - start
        result = {key: value / max(micro_count, 1) for key, value in totals.items()}
        result.update({
            "optimizer_steps": float(applied),
            "skipped_steps": float(skipped),
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "learner_tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "time_update": seconds,
            "policy_version": float(self.version),
        })
        return result

    def accumulate_gradients(self, mini: torch.Tensor) -> tuple[bool, list[dict[str, float]], int]:
        """Backward over this rank's micro-batches of one mini-batch; returns (all losses finite, stats, tokens).

        Each micro-batch loss is normalised by the whole mini-batch's denominator, so the accumulated gradient
        equals the gradient of one big batch under either aggregation (§5).
        """
        batch = self._batch
        mini_mask = batch.response_mask[mini]
        denominator = float(mini_mask.sum()) if self.algorithm.agg == "token-mean" else float(len(mini))
        all_stats, tokens = [], 0
        for micro in mini.split(self.config.micro_batch_size)[self.rank::self.world_size]:
            loss, stats = self._micro_loss(micro, denominator)
            if not torch.isfinite(loss):
                return False, all_stats, tokens
            # DeepSpeed averages gradients over ranks; the loss already carries the global denominator.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            all_stats.append(stats)
            tokens += int(batch.response_mask[micro].sum())
        return True, all_stats, tokens

    def _micro_loss(self, rows: torch.Tensor, denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
        alg = self.algorithm
        adv = self._advantages
        micro_batch = self._batch.rows(rows)
        use_entropy = alg.erc_band is not None or alg.entropy_coef > 0
        mask = micro_batch.response_mask.to(self.device)
        logp, entropy = self._forward(
            micro_batch, with_entropy=use_entropy, entropy_requires_grad=alg.entropy_coef > 0
        )

        def pick(tensor):
            return None if tensor is None else tensor[rows].to(self.device)

        loss, stats = policy_loss(
            logp, pick(self._old_logp), pick(adv.advantages), mask, clip_low=alg.clip_low,
            clip_high=alg.clip_high, dual_clip=alg.dual_clip, clip_mode=alg.clip_mode, adv_mask=pick(adv.adv_mask),
            entropy=entropy if use_entropy else None, old_entropy=pick(self._old_entropy) if use_entropy else None,
            erc_band=alg.erc_band, agg=alg.agg, denominator=denominator,
        )
        stats = dict(stats)
        if alg.entropy_coef > 0:
            bonus = entropy_bonus(entropy, mask, pick(adv.entropy_filter), agg=alg.agg, denominator=denominator)
            loss = loss - alg.entropy_coef * bonus
            stats["entropy_bonus"] = float(bonus.detach())
        if alg.nll_coef > 0:
            best = (micro_batch.scores >= self._batch.scores.max()).to(self.device)
            loss = loss + alg.nll_coef * nll_loss(logp, mask, best, agg=alg.agg, denominator=denominator)
        stats["policy_loss"] = float(loss.detach())
        return loss, stats

    # ---- weights -----------------------------------------------------------------------------------------------

    def setup_weight_sync(self, workers: list, tensor_parallel_size: int, sync: WeightSyncConfig,
                          rollout_on_gpu: bool) -> None:
        """Rank 0 only: the learner → rollout-worker group, created once and reused every step."""
        from asyppo.weight_sync.sender import WeightBroadcaster

        backend = sync.backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" and rollout_on_gpu else "gloo"
        self.broadcaster = WeightBroadcaster(backend=backend, timeout_s=sync.timeout_s, bucket_mb=sync.bucket_mb)
        self.broadcaster.setup(workers, tensor_parallel_size)

    def broadcast_weights(self) -> dict[str, float]:
        """Send the current weights, stamped with this learner's version, to every rollout worker."""
        dtype = getattr(torch, self.dtype)
        with full_parameters(self.engine) as module:
            if self.rank != 0:
                return {}
            if self.broadcaster is None:
                raise RuntimeError("broadcast_weights() before setup_weight_sync()")
            stats = self.broadcaster.broadcast(module.named_parameters(), self.version, dtype)
        return {"weight_sync_" + key: float(value) for key, value in stats.items()}

    def probe_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Temperature-1 log-prob of every token after the first, for the rollout/learner weight check."""
        out = []
        self.engine.module.eval()
        with torch.no_grad():
            for ids in token_ids:
                # The first token is the "prompt", the rest the "response" of the shared batch layout.
                inputs = torch.tensor([ids], device=self.device)
                logp, _ = response_logprobs(
                    self.engine.module, inputs, torch.ones_like(inputs), len(ids) - 1, temperature=1.0,
                    chunk_size=self.config.logprob_chunk, with_entropy=False,
                )
                out.append(logp[0].float().cpu().tolist())
        return out

    def gradients(self) -> dict[str, torch.Tensor]:
        """This rank's accumulated (not yet all-reduced) gradients, for inspection."""
        return {name: p.grad.detach().cpu().clone() for name, p in self.engine.module.named_parameters()
                if p.grad is not None}

    def parameters_snapshot(self) -> dict[str, torch.Tensor]:
        with full_parameters(self.engine) as module:
            return {name: p.detach().cpu().clone() for name, p in module.named_parameters()}

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def save(self, checkpoint_dir: str) -> None:
        """Policy in Hugging Face format (vLLM and from_pretrained load it) plus DeepSpeed optimizer state."""
        target = Path(checkpoint_dir)
        self.engine.save_checkpoint(str(target / "policy_state"), tag="state")
        with full_parameters(self.engine) as module:
            if self.rank == 0:
                module.save_pretrained(target / "policy", safe_serialization=True)
                for name in TOKENIZER_FILES:
                    source = Path(self.policy_path) / name
                    if source.exists():
                        shutil.copy2(source, target / "policy" / name)

    def set_version(self, version: int) -> None:
        self.version = version

    def ping(self) -> int:
        return self.rank
