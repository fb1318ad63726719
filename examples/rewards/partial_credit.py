"""A reward function of your own (docs/rewards.md): partial credit for numbers close to the answer.

    asyppo train --config examples/rewards/partial-credit.yaml

Any module works the same way: ``reward.function: path/to/file.py:name`` (or ``package.module:name``).
"""


def partial_credit(prompt: str, response: str, answer: str, row: dict) -> tuple[float, bool]:
    """1 for the exact answer; for a number off by d, 0.5 · (1 − d / tolerance), never below 0. Correct only when
    exact. ``tolerance`` is the row's own column when the dataset has one, else 10."""
    try:
        value = int(response.strip())
    except ValueError:  # not a number: no credit
        return 0.0, False
    target = int(answer)
    if value == target:
        return 1.0, True
    tolerance = float(row.get("tolerance", 10))
    return max(0.0, 0.5 * (1 - abs(value - target) / tolerance)), False
