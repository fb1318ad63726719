"""The ``Learner`` actor: owns the policy's DeepSpeed engine and runs the AsyPPO + ERC update.

A thin shell around the pure core (``asyppo.core.batch``, ``asyppo.core.losses``, ``asyppo.core.logprobs``). One
instance per data-parallel rank; rank 0 (named ``learner`` in the Ray dashboard) also owns the weight broadcast to
the rollout workers (``asyppo.weight_sync.sender``). Section numbers (§N) refer to docs/algorithms.md.

Every rank receives the whole rollout batch and computes the same advantages; rank r runs micro-batches r, r+R, …
of the old log-probs (then gathered) and of each mini-batch, so the token-mean denominator is the whole
mini-batch's on every rank (docs/architecture.md, "Decisions, and why").
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from asyppo.common.config import AlgorithmConfig, LearnerConfig, WeightSyncConfig
from asyppo.common.deepspeed_engine import (
    accelerator_device, all_ranks_gather, all_ranks_sum, begin_micro_batch, full_parameters, init_process_group, make_engine,
    optimizer_step, scale_learning_rates,
)
from asyppo.common.files import fsync_tree
from asyppo.core.advantages import AdvantageResult, compute_advantages
from asyppo.core.batch import RolloutBatch
from asyppo.core.diagnostics import gradient_weight, removed_share
from asyppo.core.logprobs import response_logprobs
from asyppo.core.losses import entropy_bonus, kl_penalty, nll_loss, policy_loss
from asyppo.core.schedules import lr_factor
from asyppo.core.seeds import derive_seed
from asyppo.core.offpolicy import behaviour_weights

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


# A critic value beyond this many times the largest |reward| of the batch means the critic diverged: with outcome
# rewards and γ ≤ 1 every return lies within the rewards' range.
VALUE_LIMIT = 1e4

# Losses whose micro-batch values carry the mini-batch denominator: they add up to the mini-batch loss.
ADDITIVE_STATS = ("policy_loss", "pg_loss", "entropy_bonus", "nll_loss", "kl_ref")


class StepTotals:
    """The update's statistics: additive losses summed per mini-batch, the rest weighted by valid tokens."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.tokens = 0.0
        self.applied = 0
        self.skipped = 0

    def add_mini_batch(self, micro_stats: list[dict[str, float]]) -> None:
        self.applied += 1
        for stats in micro_stats:
            tokens = stats["tokens"]
            self.tokens += tokens
            for key, value in stats.items():
                if key != "tokens":
                    weight = 1.0 if key in ADDITIVE_STATS else tokens
                    self.sums[key] = self.sums.get(key, 0.0) + value * weight

    def across_ranks(self) -> dict[str, float]:
        """Totals of every rank (a collective: every rank calls it), as the step's statistics."""
        keys = sorted(self.sums)
        summed = all_ranks_sum([self.sums[key] for key in keys] + [self.tokens])
        tokens = summed[-1]
        result = {
            key: value / self.applied if key in ADDITIVE_STATS else value / tokens
            for key, value in zip(keys, summed) if self.applied and tokens
        }
        result.update({"optimizer_steps": float(self.applied), "skipped_steps": float(self.skipped),
                       "tokens": tokens})
        return result


class Learner:
    """One data-parallel rank of the learner.

    ``algorithm`` and ``learner`` are the config sections it uses; ``temperature`` is the rollout's (log-probs and
    entropies are those of the sampling distribution), ``dtype`` the model's (bf16 on GPU, and the wire dtype of the
    broadcast), ``seed`` keys every random draw, ``timeout_s`` bounds the process group's collectives,
    ``total_steps`` is the run's length (the learning-rate schedule, §5b), ``reference_path`` the frozen policy of
    the KL penalty (the run's initial policy, also when it resumes from a checkpoint; only with kl_coef > 0).
    """

    def __init__(
        self, policy_path: str, algorithm: AlgorithmConfig, learner: LearnerConfig, *, temperature: float,
        dtype: str, seed: int, timeout_s: float, total_steps: int = 1, reference_path: str | None = None,
        rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int = 29500,
        resume_state_dir: str | None = None,
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
        self.total_steps = total_steps
        torch.manual_seed(derive_seed(seed, "learner-init"))
        init_process_group(rank, world_size, master_addr, master_port, timeout_s)
        self.device = accelerator_device()
        bf16 = self.device.type == "cuda" and dtype == "bfloat16"
        model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        model.config.use_cache = False
        if learner.gradient_checkpointing:  # applies in train mode: the update's forward passes
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reference = None
        if algorithm.kl_coef > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(reference_path or policy_path, dtype=torch.float32)
            self.reference.to(self.device).eval().requires_grad_(False)
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
        self._behaviour_weight: torch.Tensor | None = None
        self._ref_logp: torch.Tensor | None = None
        self._skip_update = False
        self._advantages: AdvantageResult | None = None

    # ---- per-step phases -------------------------------------------------------------------------------------

    def _forward(self, batch: RolloutBatch, *, with_entropy: bool, entropy_requires_grad: bool = False, model=None):
        return response_logprobs(
            model or self.engine.module, batch.input_ids.to(self.device), batch.attention_mask.to(self.device),
            batch.response_length, temperature=self.temperature,
            chunk_size=self.config.logprob_chunk, with_entropy=with_entropy,
            entropy_requires_grad=entropy_requires_grad,
        )

    def compute_old_logprobs(self, batch: RolloutBatch) -> dict[str, float]:
        """logπ_prox and H_old for every response token, no graph, in micro-batches (docs/algorithms.md §5), and
        the behaviour-policy weights that correct the engine's sampling policy μ to π_prox (§5a).

        The micro-batches are shared out over the ranks (rank r takes r, r+R, …) and the results gathered, so every
        rank ends with the whole batch's; the same micro-batches as one rank's, hence the same numbers."""
        start = time.perf_counter()
        self._batch = batch
        micro_batches = torch.arange(batch.num_sequences).split(self.config.micro_batch_size)
        # Every rank must run as many forwards (ZeRO-3 gathers the parameters inside each, a collective); the job's
        # config makes the batch a multiple of micro_batch_size × ranks (as the update's mini-batches need too).
        if len(micro_batches) % self.world_size:
            raise ValueError(f"{len(micro_batches)} micro-batches of {self.config.micro_batch_size} do not share out "
                             f"evenly over {self.world_size} learner ranks")
        results = []
        self.engine.module.eval()
        with torch.no_grad():
            for rows in micro_batches[self.rank::self.world_size]:
                logp, entropy = self._forward(batch.rows(rows), with_entropy=True)
                ref_logp = None
                if self.reference is not None:
                    ref_logp = self._forward(batch.rows(rows), with_entropy=False, model=self.reference)[0].float().cpu()
                results.append((rows, logp.float().cpu(), entropy.float().cpu(), ref_logp))
        every_rank = [part for parts in all_ranks_gather(results) for part in parts]
        order = torch.cat([rows for rows, *_ in every_rank]).argsort()
        self._old_logp = torch.cat([logp for _, logp, _, _ in every_rank])[order]
        self._old_entropy = torch.cat([entropy for _, _, entropy, _ in every_rank])[order]
        self._ref_logp = torch.cat([ref for *_, ref in every_rank])[order] if self.reference is not None else None
        mask = batch.response_mask
        self._behaviour_weight, mismatch = behaviour_weights(
            self._old_logp, batch.rollout_logprobs, mask, mode=self.algorithm.off_policy_correction,
            cap=self.algorithm.off_policy_cap,
        )
        return {
            "entropy_mean": float((self._old_entropy * mask).sum() / mask.sum().clamp(min=1)),
            **mismatch,
            "time_old_logprobs": time.perf_counter() - start,
        }

    def compute_advantages(self, step: int, *values: torch.Tensor,
                           critic_ids: list[int] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Ensemble values → σ, masks, advantages and returns; returns (critic targets, stats) (§3, §4).

        ``values`` are the critics taking part this step (critics.quorum: one whose node left may sit out), whose
        indices ``critic_ids`` name their stats (default 0, 1, ...).

        A diverged critic (values not finite, or beyond ``VALUE_LIMIT`` times the largest |reward|) leaves this step
        without a policy update (``update`` skips it): its advantages would be NaN or, once whitening overflows,
        all 0, and the policy would train on the entropy bonus alone. The stats name the critic; the driver logs
        it.
        """
        if self._batch is None:
            raise RuntimeError("compute_advantages() before compute_old_logprobs(): the learner has no rollout batch")
        self._skip_update = False
        stacked = torch.stack([v.float() for v in values]) if values else None
        alg, batch = self.algorithm, self._batch
        stats: dict[str, float] = {}
        if stacked is not None:
            ids = critic_ids if critic_ids is not None else list(range(len(values)))
            stats["critics_taking_part"] = float(len(values))
            valid = batch.response_mask > 0
            limit = VALUE_LIMIT * max(1.0, float(batch.scores.abs().max()))
            absmax = dict(zip(ids, (float(v[valid].abs().max()) if bool(valid.any()) else 0.0 for v in stacked)))
            stats.update({f"value_absmax_critic_{m}": value for m, value in absmax.items()})
            diverged = [m for m, value in absmax.items() if not value <= limit]
            stats.update({f"diverged_critic_{m}": float(m in diverged) for m in absmax})
            if diverged:
                self._skip_update = True
                nan = torch.full_like(batch.response_mask, float("nan"))
                self._advantages = AdvantageResult(nan, nan, None, None, stats)
                return nan, stats
        self._advantages = compute_advantages(
            batch, stacked, estimator=alg.estimator, gamma=alg.gamma, lam=alg.lam, ensemble=alg.ensemble,
            adv_mask_fraction=alg.adv_mask_fraction, entropy_filter_fraction=alg.entropy_filter_fraction,
            tie_seed=derive_seed(self.seed, "mask-ties", step),
        )
        self._advantages.stats.update(stats)
        weight = gradient_weight(self._advantages.advantages, self._old_logp)
        self._advantages.stats["adv_mask_grad_share_removed"] = removed_share(
            weight, self._advantages.adv_mask, batch.response_mask)
        return self._advantages.returns, self._advantages.stats

    def response_sigma(self, rows: list[int]) -> list[float] | None:
        """Mean σ over each response of ``rows`` of this step's batch (logged beside its text), or None without σ."""
        sigma = self._advantages.sigma if self._advantages is not None else None
        if sigma is None:
            return None
        mask = self._batch.response_mask[rows]
        return ((sigma[rows] * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()

    def update(self, step: int) -> dict[str, float]:
        """PPO epochs over shuffled mini-batches with the masks, the entropy filter and ERC (§5).

        Losses are reported at their true scale: the sum of a mini-batch's micro-batch losses over every rank (the
        mini-batch loss), averaged over the applied optimizer steps; fractions are token-weighted means.
        """
        if self._advantages is None or self._batch is None:
            raise RuntimeError("update() before compute_advantages(): nothing to train on")
        start = time.perf_counter()
        lrn = self.config
        warming_up = step < self.algorithm.critic_warmup_steps  # the critics train alone (§4, critic warm-up)
        if warming_up or self._skip_update:  # the same on every rank: they all saw the same values
            minis = 0 if warming_up else lrn.epochs * (self._batch.num_sequences // lrn.mini_batch_size)
            return {"optimizer_steps": 0.0, "skipped_steps": float(minis), "critic_warmup": float(warming_up),
                    "grad_norm": float("nan"), "learner_tokens_per_s": 0.0,
                    "time_update": time.perf_counter() - start, "policy_version": float(self.version)}
        # The policy's schedule starts with its first update, after the critics' warm-up (§4, §5b).
        held_back = self.algorithm.critic_warmup_steps
        factor = lr_factor(step - held_back, total_steps=self.total_steps - held_back,
                           warmup_steps=lrn.lr_warmup_steps, schedule=lrn.lr_schedule, min_ratio=lrn.lr_min_ratio)
        scale_learning_rates(self.engine, factor)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "mini-batches", step))
        self.engine.module.train()
        totals = StepTotals()
        grad_norms: list[float] = []
        for _ in range(lrn.epochs):
            order = torch.randperm(self._batch.num_sequences, generator=generator)
            for mini in order.split(lrn.mini_batch_size):
                finite, micro_stats, _ = self.accumulate_gradients(mini)
                stepped, grad_norm = optimizer_step(self.engine, finite)
                if stepped:
                    totals.add_mini_batch(micro_stats)
                    grad_norms.append(grad_norm)
                else:
                    totals.skipped += 1
        self.version += 1 if totals.applied else 0
        seconds = time.perf_counter() - start
        result = totals.across_ranks()
        result.update({
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "learner_tokens_per_s": result.pop("tokens") / seconds if seconds > 0 else 0.0,
            "time_update": seconds,
            "policy_version": float(self.version),
            "critic_warmup": 0.0,
            "lr": lrn.lr * factor,
        })
        return result

    def accumulate_gradients(self, mini: torch.Tensor) -> tuple[bool, list[dict[str, float]], int]:
        """Backward over this rank's micro-batches of one mini-batch; returns (all losses finite, stats, tokens).

        Each micro-batch loss is normalised by the whole mini-batch's denominator, so the accumulated gradient
        equals the gradient of one big batch under either aggregation (§5). Every rank runs forward and backward on
        all of its micro-batches even after a non-finite loss, so ZeRO's gathers and reductions stay in step across
        ranks; the ranks then agree in ``optimizer_step`` to drop the mini-batch.
        """
        batch = self._batch
        mini_mask = batch.response_mask[mini]
        correct_rows = batch.correct[mini]
        denominators = {
            "policy": float(mini_mask.sum()) if self.algorithm.agg == "token-mean" else float(len(mini)),
            # The NLL term averages over the correct responses of the mini-batch only (§5).
            "nll": float(mini_mask[correct_rows].sum()) if self.algorithm.agg == "token-mean"
            else float(correct_rows.sum()),
        }
        all_stats, tokens, finite = [], 0, True
        for micro in mini.split(self.config.micro_batch_size)[self.rank::self.world_size]:
            begin_micro_batch(self.engine)
            loss, stats = self._micro_loss(micro, denominators)
            finite = finite and bool(torch.isfinite(loss))
            # DeepSpeed averages gradients over ranks; the loss already carries the global denominator.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            stats["tokens"] = float(batch.response_mask[micro].sum())
            all_stats.append(stats)
            tokens += int(stats["tokens"])
        return finite, all_stats, tokens

    def _micro_loss(self, rows: torch.Tensor, denominators: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
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
            behaviour_weight=pick(self._behaviour_weight),
            entropy=entropy if use_entropy else None, old_entropy=pick(self._old_entropy) if use_entropy else None,
            erc_band=alg.erc_band, agg=alg.agg, denominator=denominators["policy"],
        )
        stats = dict(stats)
        if alg.entropy_coef > 0:
            bonus = entropy_bonus(entropy, mask, pick(adv.entropy_filter), agg=alg.agg,
                                  denominator=denominators["policy"])
            loss = loss - alg.entropy_coef * bonus
            stats["entropy_bonus"] = float(bonus.detach())
        if alg.nll_coef > 0 and denominators["nll"] > 0:
            nll = nll_loss(logp, mask, micro_batch.correct.to(self.device), agg=alg.agg,
                           denominator=denominators["nll"])
            loss = loss + alg.nll_coef * nll
            stats["nll_loss"] = float(nll.detach())
        if alg.kl_coef > 0:
            kl, kl_stats = kl_penalty(logp, pick(self._ref_logp), mask, alg.kl_estimator, agg=alg.agg,
                                      denominator=denominators["policy"], old_logp=pick(self._old_logp),
                                      behaviour_weight=pick(self._behaviour_weight))
            loss = loss + alg.kl_coef * kl
            stats.update(kl_stats)
        stats["policy_loss"] = float(loss.detach())
        return loss, stats

    # ---- weights -----------------------------------------------------------------------------------------------

    def setup_weight_sync(self, workers: list, tensor_parallel_size: int, sync: WeightSyncConfig,
                          rollout_on_gpu: bool) -> None:
        """Rank 0 only: the learner → rollout-worker group, reused every step; formed again (the old one closed)
        when a rollout worker was restarted."""
        from asyppo.weight_sync.sender import WeightBroadcaster

        if self.broadcaster is not None:
            self.broadcaster.close()
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

    def weights_for_rollout(self) -> dict[str, torch.Tensor]:
        """The current weights in the rollout dtype (rank 0; other ranks take part in the gather and return {}),
        for a rollout worker that Ray restarted: it loads them through the object store."""
        dtype = getattr(torch, self.dtype)
        with full_parameters(self.engine) as module:
            if self.rank != 0:
                return {}
            return {name: p.detach().to("cpu", dtype).clone() for name, p in module.named_parameters()}

    def probe_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Temperature-1 log-prob of every token after the first, for the rollout/learner weight check. Every rank
        runs it (under ZeRO-3 a forward gathers the parameters from all of them); they all return the same."""
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
        # On shared storage only the node that wrote a file can flush it; the driver's manifest comes after.
        fsync_tree(target / "policy_state")
        if self.rank == 0:
            fsync_tree(target / "policy")

    def set_version(self, version: int) -> None:
        self.version = version

    def ping(self) -> int:
        return self.rank
