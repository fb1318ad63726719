"""DAPO's dynamic sampling (docs/algorithms.md §3): prompts whose responses all scored alike carry no GRPO
gradient, so they are dropped and replaced by prompts drawn afresh."""

from __future__ import annotations

from collections.abc import Callable

from asyppo.core.batch import RolloutBatch, concat_batches, select_groups, uniform_groups


def fill_with_informative_groups(
    batch: RolloutBatch, outputs: list[dict], *, wanted: int, max_rounds: int, pad_id: int,
    refill: Callable[[int], tuple[RolloutBatch, list[dict]]],
) -> tuple[RolloutBatch, list[dict], dict[str, float]]:
    """A batch of ``wanted`` prompt groups whose responses did not all score alike, where possible.

    ``refill(round)`` generates ``wanted`` new prompts (round 1, 2, … up to ``max_rounds``) and returns their
    batch and outputs. Surplus informative groups of the last round are discarded; when the rounds run out, dropped
    groups fill the batch back to its size (counted in ``dynamic_sampling_filled``). Returns (batch, every output
    generated, stats)."""
    n = batch.group_size
    informative, uniform = [], []  # sub-batches of whole prompt groups
    first_informative_frac = 1 - float(uniform_groups(batch.scores, n).float().mean())
    rounds = 0
    while True:
        flat = uniform_groups(batch.scores, n).tolist()
        have = sum(len(sub.prompt_ids) for sub in informative)
        take = [group for group, same in enumerate(flat) if not same][:wanted - have]
        informative.append(select_groups(batch, take))
        uniform.append(select_groups(batch, [group for group, same in enumerate(flat) if same]))
        if have + len(take) == wanted or rounds == max_rounds:
            break
        rounds += 1
        batch, more = refill(rounds)
        outputs = outputs + more
    missing = wanted - sum(len(sub.prompt_ids) for sub in informative)
    if missing:
        spare = concat_batches([sub for sub in uniform if sub.prompt_ids], pad_id)
        informative.append(select_groups(spare, list(range(missing))))
    batch = concat_batches([sub for sub in informative if sub.prompt_ids], pad_id)
    stats = {"dynamic_sampling_rounds": float(rounds),
             "dynamic_sampling_informative_frac": first_informative_frac,
             "dynamic_sampling_filled": float(missing)}
    return batch, outputs, stats
