"""Learning-rate schedules (docs/algorithms.md §5b). Pure Python, no Ray.

The learner and each critic set their optimizer's learning rate to ``lr · lr_factor(step, ...)`` before the step's
update. The factor is a function of the training step alone, with no scheduler state, so a resumed run continues
the schedule exactly where the checkpoint left it.
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_factor"]

SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, *, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
              min_ratio: float = 0.0) -> float:
    """η_t / η at training step ``t = step`` (0-based) of ``T = total_steps``, with ``W = warmup_steps``:

        t < W (linear warm-up):  (t + 1) / W
        constant:                1
        cosine:                  r + (1 − r) · ½ · (1 + cos(π · (t − W) / (T − 1 − W)))

    so the cosine starts at 1 right after the warm-up and reaches ``r = min_ratio`` at the last step (it stays 1
    when no step is left after the warm-up); steps past ``T − 1`` keep the last step's factor.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_factor: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (0 <= warmup_steps and 1 <= total_steps and 0 <= step and 0 <= min_ratio <= 1):
        raise ValueError(f"lr_factor: need 0 <= step, 0 <= warmup_steps, 1 <= total_steps, 0 <= min_ratio <= 1; got "
                         f"step={step}, warmup_steps={warmup_steps}, total_steps={total_steps}, min_ratio={min_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
