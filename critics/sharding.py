"""Which rows of a rollout batch each mini-critic trains on (docs/algorithms.md §2).

Pure Python, no Ray. Batch layout: ``N = P × n`` rows, the ``n`` samples of prompt ``i`` are rows
``i*n .. i*n+n-1``. Every assignment is a pure function of its arguments and uses SHA-256 (never the
builtin ``hash()``, which is salted per process), so every process and every run computes the same shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["SPLITS", "assign_shards", "prompt_shard"]

SPLITS = ("prompt", "response")


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def prompt_shard(prompt_id: str, num_critics: int) -> int:
    """The critic (``0 .. num_critics-1``) that owns ``prompt_id`` under the ``prompt`` split (§2)."""
    if not isinstance(prompt_id, str):
        raise TypeError(f"prompt_shard: prompt_id must be a str, got {type(prompt_id).__name__}")
    if num_critics < 1:
        raise ValueError(f"prompt_shard: num_critics must be >= 1, got {num_critics}")
    return _stable_int(prompt_id) % num_critics


def _keyed_permutation(size: int, key: str) -> list[int]:
    """A permutation of ``range(size)`` determined by ``key`` alone: sort positions by SHA-256 of
    ``key:position``. Equivalent to a shuffle with a stably seeded RNG, but independent of any RNG
    implementation or Python version."""
    return sorted(range(size), key=lambda position: (_stable_int(f"{key}:{position}"), position))


def assign_shards(
    prompt_ids: Sequence[str],
    group_size: int,
    num_critics: int,
    split: str = "prompt",
    *,
    seed: int = 0,
) -> list[list[int]]:
    """Row indices of the batch that each critic trains on (docs/algorithms.md §2).

    - ``split="prompt"``: all ``n`` rows of prompt ``i`` go to critic ``prompt_shard(prompt_ids[i], M)``.
      A critic whose shard holds no prompt of this batch gets an empty list. ``seed`` is unused.
    - ``split="response"``: for each prompt its ``n`` rows are shuffled by a permutation keyed on
      ``(seed, prompt id)`` and cut into ``M`` equal consecutive parts; part ``m`` goes to critic ``m``.
      Requires ``n % M == 0``.

    Returns:
        ``M`` sorted lists; together they are disjoint and cover ``range(len(prompt_ids) * group_size)``.
    """
    if isinstance(prompt_ids, str):
        raise TypeError("assign_shards: prompt_ids must be a sequence of str, not a single str")
    if group_size < 1:
        raise ValueError(f"assign_shards: group_size must be >= 1, got {group_size}")
    if num_critics < 1:
        raise ValueError(f"assign_shards: num_critics must be >= 1, got {num_critics}")
    for index, prompt_id in enumerate(prompt_ids):
        if not isinstance(prompt_id, str):
            raise TypeError(f"assign_shards: prompt_ids[{index}] must be a str, got {type(prompt_id).__name__}")

    shards: list[list[int]] = [[] for _ in range(num_critics)]
    if split == "prompt":
        for prompt_index, prompt_id in enumerate(prompt_ids):
            first_row = prompt_index * group_size
            shards[prompt_shard(prompt_id, num_critics)].extend(range(first_row, first_row + group_size))
    elif split == "response":
        if group_size % num_critics != 0:
            raise ValueError(
                f"assign_shards: split='response' needs group_size % num_critics == 0, got group_size={group_size}, "
                f"num_critics={num_critics}"
            )
        part_size = group_size // num_critics
        for prompt_index, prompt_id in enumerate(prompt_ids):
            first_row = prompt_index * group_size
            permutation = _keyed_permutation(group_size, f"{seed}:{prompt_id}")
            for critic in range(num_critics):
                part = permutation[critic * part_size : (critic + 1) * part_size]
                shards[critic].extend(first_row + position for position in part)
    else:
        raise ValueError(f"assign_shards: split must be one of {SPLITS}, got {split!r}")
    return [sorted(rows) for rows in shards]
