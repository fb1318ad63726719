"""The built-in tasks' models: a character tokenizer, a tiny Qwen2 policy and critic, and their warm-up.

``asyppo train`` with no arguments needs a base policy that leaves room for RL, and nothing can be downloaded,
so the job makes its own: ``ensure_builtin_models`` trains it once, deterministically, and caches it. Each built-in
task (``arithmetic``, ``chain``) has its recipe: ``WarmupRecipe()`` for ``arithmetic`` (described below) and
``CHAIN_RECIPE`` for ``chain`` (the same steps on the chain task, with the differences stated at its definition).

Recipe (``WarmupRecipe`` defaults; docs/algorithms.md §1 for the verifier, §2 for the critics)
------------------------------------------------------------------------------------------
* Task: ``asyppo.tasks.problems.arithmetic_problems`` with two operands below 100 and the operator ``+``
  (``37+45=`` -> ``82``); answers have at most 3 digits, so a response is at most 4 tokens with EOS. 9,000
  problems train, 1,000 are held out (``asyppo.tasks.problems.ARITHMETIC_*``, also what ``builtin:arithmetic``
  loads). Chosen for start-up cost and headroom: the policy below reaches the target band in ~350 steps
  (the whole warm-up takes ~15 s on 2 idle CPU cores, ~30 s on busy ones); its greedy accuracy there is
  already ~0.6, so RL can sharpen sampling towards it, and further training reaches ~0.95, so the task is
  far from saturated. With ``+-`` the same model needs ~1,200 steps, with 3-digit operands minutes.
* Tokenizer: one token per character of ``0123456789+-*= `` plus ``<pad>`` (id 0), ``<eos>`` (id 1) and
  ``<unk>`` (id 2); no BOS (nothing needs it). Decoding concatenates characters.
* Policy: Qwen2, hidden 64, 2 layers, 2 heads of dim 32 (a head size vLLM's CPU attention supports), MLP
  256, tied embeddings, 128 positions: ~0.13M parameters, float32. (A 0.5M model, hidden 128, needs fewer
  steps but ~4x more compute per step, several times longer in all.)
* Supervised warm-up of the policy: ``prompt + answer + <eos>`` (for ``chain``, the written-out chain instead of
  the answer), cross-entropy on answer and EOS tokens only,
  batches of 128 train problems from a seeded ``PromptSampler``, AdamW (lr 3e-3, no weight decay, betas
  0.9/0.98), linear warm-up over 50 steps then constant, gradient clipping at 1.
* Stopping: every 10 steps, the held-out *expected* sampled accuracy -- the mean probability of emitting
  exactly ``answer + <eos>`` at temperature 1, one teacher-forced forward pass over 512 ``eval`` problems,
  which is what sampled accuracy estimates, without its noise (+-0.02 at 512 samples) and cheaper than
  generating. Training stops at the first evaluation at or above ``stop_at`` = 0.3, or at ``max_steps``
  = 3000 (with a warning). Then ``base_accuracy`` is *measured by sampling*: ``model.generate`` at
  temperature 1 (no top-k/top-p, fixed seed), 4 samples for each of the 512 held-out problems, scored with
  ``verify_arithmetic``; the log warns when it falls outside the target band ``[0.2, 0.5]``. Stopping at 0.3
  rather than at the band's lower edge keeps the sampled number inside the band despite sampling noise.
* Critic: Qwen2, hidden 32, 2 layers, 1 head of dim 32, MLP 128 (~34K parameters, a quarter of the policy),
  trained with the same LM objective for a fixed 200 steps. A random backbone would make the value head
  learn from features that know nothing about digits; after a short LM warm-up the hidden states encode the
  problem and the partial answer, which is what a value function of this task needs. All critics start
  from this one checkpoint (docs/algorithms.md §2). Critic accuracy does not matter, so it is not evaluated; the
  value head belongs to the critic model, not to this checkpoint.

Everything is seeded (model init, batch order, evaluation sampling) and runs with a fixed number of torch
threads, so the same recipe gives the same weights on the same machine. Outputs are cached under
``$ASYPPO_CACHE`` (default ``~/.cache/asyppo``) in a directory keyed by a hash of the recipe; a build is
written to a temporary directory and renamed into place, under a file lock, so a crash never leaves a half
written cache and concurrent callers build it once. Each of ``policy/`` and ``critic/`` is a normal Hugging
Face model directory (``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json``) that ``AutoModelForCausalLM.from_pretrained``, ``AutoTokenizer.from_pretrained``
and ``vllm.LLM(model=dir, dtype="float32")`` load.

No Ray import here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as transformers_logging

from asyppo.tasks.model_cache import default_cache_dir, exclusive_lock
from asyppo.tasks.arithmetic import ARITHMETIC_DIGITS, ARITHMETIC_OPERATORS, arithmetic_problems, verify_arithmetic
from asyppo.tasks.chain import CHAIN_OPERANDS, chain_problems, chain_solution, verify_chain
from asyppo.tasks.problems import Problem, PromptSampler

__all__ = [
    "ARITHMETIC_ALPHABET",
    "CHAIN_ALPHABET",
    "CHAIN_RECIPE",
    "RECIPE_VERSION",
    "BuiltinModels",
    "WarmupRecipe",
    "char_tokenizer",
    "default_cache_dir",
    "ensure_builtin_models",
    "expected_accuracy",
    "sampled_accuracy",
    "tiny_critic_config",
    "tiny_policy_config",
]

# Bump when the code changes what a recipe produces, so that old cache entries are not reused.
RECIPE_VERSION = 1
ARITHMETIC_ALPHABET = "0123456789+-*= "
CHAIN_ALPHABET = ARITHMETIC_ALPHABET + ";"
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2
MAX_POSITIONS = 128
HEAD_DIM = 32


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and model configurations
# ---------------------------------------------------------------------------------------------------------


def char_tokenizer(alphabet: str = ARITHMETIC_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer for ``alphabet``, built locally with ``tokenizers``.

    Each character of ``alphabet`` is one token; special tokens ``<pad>`` (0), ``<eos>`` (1),
    ``<unk>`` (2, any other character). No BOS token and no post-processing, so ``encode(text)`` is exactly
    the characters. The ``Fuse`` decoder joins tokens without separators, so ``decode`` gives back the plain
    text (a word-level vocabulary would otherwise be decoded with spaces between tokens).
    """
    vocabulary = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
    )


def _tiny_qwen2_config(vocab_size: int, hidden_size: int, num_layers: int) -> Qwen2Config:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int >= {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    if hidden_size % HEAD_DIM:
        raise ValueError(f"hidden_size must be a multiple of the head size {HEAD_DIM}, got {hidden_size}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    heads = hidden_size // HEAD_DIM
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        bos_token_id=None,
        dtype="float32",
        architectures=["Qwen2ForCausalLM"],
    )


def tiny_policy_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2) -> Qwen2Config:
    """Qwen2 configuration of the built-in policy (~0.13M parameters at the defaults; head dim 32)."""
    return _tiny_qwen2_config(vocab_size, hidden_size, num_layers)


def tiny_critic_config(vocab_size: int, *, hidden_size: int = 32, num_layers: int = 2) -> Qwen2Config:
    """Qwen2 configuration of the built-in critic backbone, smaller than the policy (~34K parameters)."""
    return _tiny_qwen2_config(vocab_size, hidden_size, num_layers)


# ---------------------------------------------------------------------------------------------------------
# Recipe and result
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmupRecipe:
    """Everything that determines the built-in models (with the seed); hashed into the cache key.

    The defaults are the documented recipe of the ``arithmetic`` task (module docstring); ``CHAIN_RECIPE`` is the
    ``chain`` task's. Tests pass cheaper ones. ``digits`` and ``operators`` apply to ``arithmetic`` only.
    """

    task: Literal["arithmetic", "chain"] = "arithmetic"
    digits: int = ARITHMETIC_DIGITS
    operators: str = ARITHMETIC_OPERATORS
    policy_hidden_size: int = 64
    policy_layers: int = 2
    critic_hidden_size: int = 32
    critic_layers: int = 2
    batch_size: int = 128
    learning_rate: float = 3e-3
    lr_warmup_steps: int = 50
    max_steps: int = 3000
    eval_every: int = 10
    eval_size: int = 512
    eval_samples_per_problem: int = 4
    stop_at: float = 0.3
    target_low: float = 0.2
    target_high: float = 0.5
    critic_steps: int = 200

    def __post_init__(self) -> None:
        positive = (
            "batch_size",
            "max_steps",
            "eval_every",
            "eval_size",
            "eval_samples_per_problem",
            "policy_layers",
            "critic_layers",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"WarmupRecipe.{name} must be >= 1, got {getattr(self, name)}")
        if self.critic_steps < 0 or self.lr_warmup_steps < 0:
            raise ValueError("WarmupRecipe.critic_steps and lr_warmup_steps must be >= 0")
        if not 0.0 <= self.target_low <= self.stop_at <= self.target_high <= 1.0:
            raise ValueError(
                "WarmupRecipe: need 0 <= target_low <= stop_at <= target_high <= 1, got "
                f"{self.target_low}, {self.stop_at}, {self.target_high}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"WarmupRecipe.learning_rate must be > 0, got {self.learning_rate}")

    @property
    def alphabet(self) -> str:
        return CHAIN_ALPHABET if self.task == "chain" else ARITHMETIC_ALPHABET

    def problems(self, count: int | None, split: str, seed: int) -> list[Problem]:
        """The task's problems (``digits`` and ``operators`` shape the arithmetic ones)."""
        if self.task == "chain":
            return chain_problems(count, split=split, seed=seed)
        return arithmetic_problems(count, split=split, seed=seed, digits=self.digits, operators=self.operators)

    def target(self, problem: Problem) -> str:
        """The response the policy is warmed up on: the answer, or for ``chain`` the written-out chain."""
        return chain_solution(problem.prompt) if self.task == "chain" else problem.answer

    def verify(self, response: str, answer: str) -> bool:
        return verify_chain(response, answer) if self.task == "chain" else verify_arithmetic(response, answer)

    @property
    def max_response_tokens(self) -> int:
        """Longest response of the task plus EOS: the generation limit used for evaluation."""
        if self.task == "chain":
            return max(len(chain_solution("+".join(["99"] * n) + "=")) for n in CHAIN_OPERANDS) + 1
        largest = 10**self.digits - 1
        longest = max(
            len(str(largest + largest)) if "+" in self.operators else 0,
            len(str(-largest)) if "-" in self.operators else 0,
            len(str(largest * largest)) if "*" in self.operators else 0,
        )
        return longest + 1


# The chain task's recipe: a larger policy (the task needs 3-digit sums and must carry a result from one step to
# the next), the same warm-up otherwise, stopped earlier in a lower band: a response succeeds only if all of its 3-4
# partial sums do, so sampled accuracy starts low and RL has most of the way to go.
CHAIN_RECIPE = WarmupRecipe(
    task="chain", policy_hidden_size=128, policy_layers=3, critic_hidden_size=64, critic_layers=2,
    stop_at=0.25, target_low=0.1, target_high=0.4, max_steps=6000,
)


@dataclass(frozen=True)
class BuiltinModels:
    """Paths of the cached built-in checkpoints and how they were made.

    ``recipe`` is the full recipe with its seed (and the tokenizer vocabulary), as hashed into the cache key;
    ``warmup`` holds what the warm-up did (steps, evaluation history, stop reason, seconds).
    """

    policy_dir: Path
    critic_dir: Path
    base_accuracy: float
    recipe: dict[str, Any]
    warmup: dict[str, Any] = dataclasses.field(default_factory=dict)
    from_cache: bool = False

    def heldout_problems(self) -> list[Problem]:
        """The exact held-out problems ``base_accuracy`` was measured on (compare RL accuracy on these)."""
        fields = {name: self.recipe[name] for name in ("task", "digits", "operators") if name in self.recipe}
        return WarmupRecipe(**fields).problems(self.recipe["eval_size"], "eval", self.recipe["seed"])


def _recipe_dict(recipe: WarmupRecipe, seed: int) -> dict[str, Any]:
    return {
        "version": RECIPE_VERSION,
        "task": recipe.task,
        "seed": seed,
        "vocabulary": [*SPECIAL_TOKENS, *recipe.alphabet],
        "max_response_tokens": recipe.max_response_tokens,
        **dataclasses.asdict(recipe),
    }


def _recipe_key(recipe_dict: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe_dict, sort_keys=True).encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _supervised_batch(
    tokenizer: PreTrainedTokenizerFast, problems: Sequence[Problem], target: Callable[[Problem], str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + target + <eos>`` ids, attention mask, and labels that are -100 on the prompt
    and the padding, so the loss covers the target and EOS only."""
    sequences, labels = [], []
    for problem in problems:
        prompt_ids = tokenizer.encode(problem.prompt, add_special_tokens=False)
        target_ids = tokenizer.encode(target(problem), add_special_tokens=False) + [tokenizer.eos_token_id]
        sequences.append(prompt_ids + target_ids)
        labels.append([-100] * len(prompt_ids) + target_ids)
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    label_ids = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (sequence, label) in enumerate(zip(sequences, labels)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        label_ids[row, : len(label)] = torch.tensor(label)
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return input_ids, attention_mask, label_ids


@torch.no_grad()
def expected_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[Problem],
    *,
    target: Callable[[Problem], str] | None = None,
    batch_size: int = 512,
) -> float:
    """Mean over ``problems`` of the probability that the model, sampling at temperature 1, emits exactly
    ``target(problem) + <eos>`` after the prompt (default: the answer): the expectation of ``sampled_accuracy``,
    computed in one teacher-forced pass without sampling noise. (The verifier also accepts non-canonical forms such
    as ``07``; their tiny probability is left out, so this is a lower bound.)
    """
    if not problems:
        raise ValueError("expected_accuracy: no problems")
    target = target or (lambda problem: problem.answer)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, len(problems), batch_size):
            input_ids, attention_mask, labels = _supervised_batch(tokenizer, problems[start : start + batch_size], target)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            answer_positions = targets != -100
            token_log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            total += (token_log_probs * answer_positions).sum(dim=1).exp().sum().item()
    finally:
        model.train(was_training)
    return total / len(problems)


@torch.no_grad()
def sampled_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[Problem],
    *,
    seed: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    samples_per_problem: int = 1,
    verify: Callable[[str, str], bool] = verify_arithmetic,
    batch_size: int = 512,
) -> float:
    """Fraction of sampled responses that ``verify`` accepts, ``samples_per_problem`` per problem.

    Plain ancestral sampling at ``temperature`` (no top-k / top-p) with ``model.generate``, the torch RNG
    seeded from ``seed`` inside a forked RNG state, so the caller's random stream is untouched and the number
    is reproducible.
    """
    if not problems:
        raise ValueError("sampled_accuracy: no problems")
    if samples_per_problem < 1:
        raise ValueError(f"sampled_accuracy: samples_per_problem must be >= 1, got {samples_per_problem}")
    problems = [problem for problem in problems for _ in range(samples_per_problem)]
    was_training = model.training
    model.eval()
    generation = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    correct = 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(problems), batch_size):
                chunk = problems[start : start + batch_size]
                encoded = tokenizer(
                    [problem.prompt for problem in chunk],
                    add_special_tokens=False,
                    padding=True,
                    padding_side="left",
                    return_tensors="pt",
                )
                output = model.generate(**encoded, generation_config=generation)
                responses = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
                correct += sum(verify(text, problem.answer) for text, problem in zip(responses, chunk))
    finally:
        model.train(was_training)
    return correct / len(problems)


def _language_model_warmup(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    sampler: PromptSampler,
    recipe: WarmupRecipe,
    steps: int,
    evaluate: Callable[[int], bool] | None = None,
) -> int:
    """Supervised steps on ``prompt + target + <eos>``; stops early when ``evaluate(step)`` returns True.

    Returns the number of steps taken.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    for step in range(1, steps + 1):
        warmup_fraction = min(1.0, step / recipe.lr_warmup_steps) if recipe.lr_warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = recipe.learning_rate * warmup_fraction
        input_ids, attention_mask, labels = _supervised_batch(tokenizer, sampler.next_batch(recipe.batch_size), recipe.target)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if evaluate is not None and step % recipe.eval_every == 0 and evaluate(step):
            return step
    return steps


def _save_model(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # one tiny shard; the bar is noise in the job's log
    try:
        model.save_pretrained(directory)
    finally:
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()
    tokenizer.save_pretrained(directory)


def _train_policy(
    recipe: WarmupRecipe,
    seed: int,
    tokenizer: PreTrainedTokenizerFast,
    train: list[Problem],
    heldout: list[Problem],
    log: Callable[[str], None],
) -> tuple[Qwen2ForCausalLM, int, list[list[float]]]:
    """Supervised warm-up until the held-out expected accuracy reaches ``stop_at`` (or ``max_steps``).

    Returns the policy, the steps taken and the evaluation history ``[[step, expected accuracy], ...]``.
    """
    torch.manual_seed(seed)
    policy = Qwen2ForCausalLM(
        tiny_policy_config(len(tokenizer), hidden_size=recipe.policy_hidden_size, num_layers=recipe.policy_layers)
    )
    history: list[list[float]] = []

    def reached_stop_point(step: int) -> bool:
        accuracy = expected_accuracy(policy, tokenizer, heldout, target=recipe.target)
        history.append([step, round(accuracy, 4)])
        if len(history) % 10 == 0 or accuracy >= recipe.stop_at:
            log(f"[bootstrap] policy step {step}: held-out expected accuracy {accuracy:.3f}")
        return accuracy >= recipe.stop_at

    steps = _language_model_warmup(
        policy, tokenizer, PromptSampler(train, seed=seed), recipe, recipe.max_steps, reached_stop_point
    )
    return policy, steps, history


def _report_stop(
    recipe: WarmupRecipe, base_accuracy: float, steps: int, history: list[list[float]], eval_size: int,
    log: Callable[[str], None],
) -> str:
    """Log why the warm-up stopped and whether the sampled accuracy is in the target band; returns the reason."""
    band = f"[{recipe.target_low}, {recipe.target_high}]"
    if history and history[-1][1] < recipe.stop_at:
        stop_reason = "step_cap"
        log(
            f"[bootstrap] WARNING: reached the step cap {recipe.max_steps} before the expected accuracy reached "
            f"{recipe.stop_at}; the base policy's sampled accuracy is {base_accuracy:.3f}"
        )
    else:
        stop_reason = "stop_at"
    if recipe.target_low <= base_accuracy <= recipe.target_high:
        log(
            f"[bootstrap] policy stops at step {steps}: held-out sampled accuracy {base_accuracy:.3f} "
            f"(temperature 1, {recipe.eval_samples_per_problem} x {eval_size} samples) is inside the target band {band}"
        )
    else:
        log(
            f"[bootstrap] WARNING: the base policy's held-out sampled accuracy {base_accuracy:.3f} at step "
            f"{steps} is outside the target band {band}"
        )
    return stop_reason


def _train_critic(
    recipe: WarmupRecipe, seed: int, tokenizer: PreTrainedTokenizerFast, train: list[Problem]
) -> Qwen2ForCausalLM:
    """The critics' shared backbone: the same LM objective for a fixed ``critic_steps`` (module docstring)."""
    torch.manual_seed(seed + 1)
    critic = Qwen2ForCausalLM(
        tiny_critic_config(len(tokenizer), hidden_size=recipe.critic_hidden_size, num_layers=recipe.critic_layers)
    )
    _language_model_warmup(critic, tokenizer, PromptSampler(train, seed=seed + 1), recipe, recipe.critic_steps)
    return critic


def _build(recipe: WarmupRecipe, seed: int, output_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Train policy and critic into ``output_dir/policy`` and ``output_dir/critic``; return the warm-up record."""
    started = time.perf_counter()
    tokenizer = char_tokenizer(recipe.alphabet)
    train = recipe.problems(None, "train", seed)
    heldout = recipe.problems(recipe.eval_size, "eval", seed)
    if recipe.batch_size > len(train):
        raise ValueError(f"WarmupRecipe.batch_size {recipe.batch_size} exceeds the {len(train)} train problems")

    policy, policy_steps, history = _train_policy(recipe, seed, tokenizer, train, heldout, log)
    base_accuracy = sampled_accuracy(
        policy,
        tokenizer,
        heldout,
        seed=seed + 10_000,
        max_new_tokens=recipe.max_response_tokens,
        samples_per_problem=recipe.eval_samples_per_problem,
        verify=recipe.verify,
    )
    stop_reason = _report_stop(recipe, base_accuracy, policy_steps, history, len(heldout), log)
    _save_model(policy, tokenizer, output_dir / "policy")

    critic = _train_critic(recipe, seed, tokenizer, train)
    _save_model(critic, tokenizer, output_dir / "critic")
    seconds = time.perf_counter() - started
    log(f"[bootstrap] critic: {recipe.critic_steps} LM steps; built-in models ready in {seconds:.1f} s")
    return {
        "base_accuracy": base_accuracy,
        "expected_accuracy": history[-1][1] if history else None,
        "policy_steps": policy_steps,
        "critic_steps": recipe.critic_steps,
        "stop_reason": stop_reason,
        "history": history,
        "seconds": round(seconds, 2),
        "policy_parameters": sum(p.numel() for p in policy.parameters()),
        "critic_parameters": sum(p.numel() for p in critic.parameters()),
    }


# ---------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------


def _load_entry(entry: Path, recipe_dict: dict[str, Any]) -> BuiltinModels | None:
    """The cached result in ``entry`` if it is complete and made by ``recipe_dict``, else ``None``."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("recipe") != recipe_dict:
        return None
    return BuiltinModels(
        policy_dir=entry / "policy",
        critic_dir=entry / "critic",
        base_accuracy=meta["warmup"]["base_accuracy"],
        recipe=meta["recipe"],
        warmup=meta["warmup"],
        from_cache=True,
    )


def ensure_builtin_models(
    cache_dir: Path | None = None,
    *,
    seed: int = 0,
    log: Callable[[str], None] = print,
    recipe: WarmupRecipe | None = None,
    num_threads: int | None = None,
) -> BuiltinModels:
    """The built-in policy and critic checkpoints, trained once per ``(recipe, seed)`` and cached.

    ``cache_dir`` defaults to ``default_cache_dir()``. The first call trains (module docstring; 15-30 s
    on 2 CPU cores with the default recipe, longer when they are busy), later calls return the cached directories at once
    (``from_cache=True``). ``num_threads`` (default: up to 2) sets torch's intra-op threads during training;
    it is not part of the cache key, and results are bitwise reproducible only for the same thread count.
    """
    recipe = recipe or WarmupRecipe()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"ensure_builtin_models: seed must be a non-negative int, got {seed!r}")
    recipe_dict = _recipe_dict(recipe, seed)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache_dir / f"{recipe.task}-{_recipe_key(recipe_dict)}"

    cached = _load_entry(entry, recipe_dict)
    if cached is not None:
        log(f"[bootstrap] using cached built-in models in {entry} (base accuracy {cached.base_accuracy:.3f})")
        return cached

    with exclusive_lock(entry.with_name(entry.name + ".lock"), log):
        cached = _load_entry(entry, recipe_dict)  # another process may have built it while we waited
        if cached is not None:
            log(f"[bootstrap] using built-in models just built by another process in {entry}")
            return cached
        if entry.exists():
            # Entries appear only by an atomic rename of a finished build, so this one was damaged or edited
            # by hand after it was written: rebuild it rather than trust it.
            log(f"[bootstrap] WARNING: {entry} is incomplete or not made by this recipe; rebuilding it")
            shutil.rmtree(entry)
        log(f"[bootstrap] building the built-in {recipe.task} models into {entry} (seed {seed})")
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=cache_dir))
        try:
            with _torch_threads(num_threads or max(1, min(2, os.cpu_count() or 1))):
                warmup = _build(recipe, seed, staging, log)
            (staging / "meta.json").write_text(json.dumps({"recipe": recipe_dict, "warmup": warmup}, indent=2))
            os.replace(staging, entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return BuiltinModels(
        policy_dir=entry / "policy",
        critic_dir=entry / "critic",
        base_accuracy=warmup["base_accuracy"],
        recipe=recipe_dict,
        warmup=warmup,
        from_cache=False,
    )
