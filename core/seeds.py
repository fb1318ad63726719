"""Every random seed of a training job, derived in one place (docs/architecture.md, "Seeds").

A job has one number, ``trainer.seed``. Each random draw of training takes its own seed from
:func:`derive_seed`: the job's seed, the purpose of the draw, and the keys that make the draw unique (the step, a
refill round, a worker or critic index, a prompt's position). NumPy's ``SeedSequence`` hashes them, so draws for
different purposes or steps are independent streams, and the same draw always gets the same seed: a run resumed
at step s draws exactly what the uninterrupted run drew, with no random state to save.

The built-in tasks' problem sets and bootstrapped models are not training draws: they are the task itself, built
from ``trainer.seed`` as their recipe says (asyppo.tasks), like a dataset file that the job reads.
"""

from __future__ import annotations

import numpy as np

# The draws of a job. A purpose's position here is part of its seeds: append new ones, never reorder.
PURPOSES = (
    "prompt-order",  # the prompt sampler's epoch-wise shuffles (driver)
    "rollout",  # a step's generation: keys (step, refill round); round 0 is the step's own batch
    "evaluation",  # every held-out evaluation (no step: each evaluation samples with the same dice)
    "sample",  # one prompt's samples inside a generation: key (its position in the generation)
    "engine",  # a rollout worker's vLLM engine: key (worker index)
    "critic-shards",  # which rows each critic trains on (response split): key (step)
    "critic-shuffle",  # a critic's pass order over its shard: keys (step, critic index)
    "mini-batches",  # the learner's mini-batch shuffle: key (step)
    "mask-ties",  # the order of tokens of equal σ in AsyPPO's masks: key (step)
    "learner-init",  # torch's global seed in every learner rank (the same on each)
    "critic-init",  # torch's global seed in every critic (all critics start alike, §2)
)


def derive_seed(seed: int, purpose: str, *keys: int, bits: int = 31) -> int:
    """The seed of one random draw: a ``bits``-bit integer hashed from ``(seed, purpose, *keys)``.

    ``SeedSequence(entropy=[seed, p, n, k₁, …, kₙ])`` with ``p`` the position of ``purpose`` in :data:`PURPOSES` and
    ``n`` the number of keys; its first 64-bit word keeps its top ``bits`` bits. Every input is one 32-bit word
    (SeedSequence would split a larger one into several, and a padding zero would look like a key: the count
    ``n`` and the bound keep every ``(seed, purpose, keys)`` its own entropy). 31 bits suit every consumer (NumPy's global seed takes 32,
    torch's 64); a prompt's seed takes 62, since vLLM adds the sample index to it and prompts' seeds must stay far
    apart. ``seed`` and every key are integers in [0, 2**32).
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown seed purpose {purpose!r}; known: {', '.join(PURPOSES)}")
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in [1, 64], got {bits}")
    entropy = [seed, PURPOSES.index(purpose), len(keys), *keys]
    if any(not isinstance(value, (int, np.integer)) or not 0 <= value < 2**32 for value in entropy):
        raise ValueError(f"seeds are derived from integers in [0, 2**32), got {entropy}")
    word = np.random.SeedSequence([int(value) for value in entropy]).generate_state(1, dtype=np.uint64)[0]
    return int(word) >> (64 - bits)
