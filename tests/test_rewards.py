"""Reward verifiers and overlong shaping (docs/algorithms.md §1)."""

from __future__ import annotations

import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyppo.tasks.arithmetic import verify_arithmetic
from asyppo.tasks.math import _call_with_deadline, _DeadlineExceeded, verify_math
from asyppo.tasks.rewards import RewardFunction, overlong_penalty

# (response, answer, accepted) by the documented rule: the stripped response is exactly one plain number
# whose value equals the answer's.
ARITHMETIC_CASES = [
    ("82", "82", True),
    (" 82\n", "82", True),
    ("082", "82", True),
    ("82.0", "82", True),
    ("-28", "-28", True),
    ("+5", "5", True),
    ("83", "82", False),
    ("28", "-28", False),
    ("82=", "82", False),
    ("8 2", "82", False),
    ("82 82", "82", False),
    ("82<eos>", "82", False),
    ("eighty-two", "82", False),
    ("", "82", False),
    ("   ", "82", False),
    ("-", "82", False),
    ("1e2", "100", False),
    ("8.2.", "82", False),
]


@pytest.mark.parametrize(("response", "answer", "accepted"), ARITHMETIC_CASES)
def test_verify_arithmetic_follows_the_documented_rule(response: str, answer: str, accepted: bool) -> None:
    assert verify_arithmetic(response, answer) is accepted


@given(left=st.integers(0, 99), right=st.integers(0, 99), guess=st.integers(-200, 300))
def test_verify_arithmetic_accepts_exactly_the_sum(left: int, right: int, guess: int) -> None:
    answer = str(left + right)
    assert verify_arithmetic(str(guess), answer) is (guess == left + right)


def test_verify_arithmetic_rejects_bad_reference_and_types() -> None:
    with pytest.raises(ValueError, match="not a plain decimal number"):
        verify_arithmetic("5", "five")
    with pytest.raises(TypeError, match="response must be a str"):
        verify_arithmetic(5, "5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="answer must be a str"):
        verify_arithmetic("5", 5)  # type: ignore[arg-type]


MATH_CASES = [
    ("0.5", "\\frac{1}{2}", True),
    ("The answer is $\\frac{1}{2}$.", "0.5", True),
    ("so we get \\boxed{1/2}", "\\frac{1}{2}", True),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
    ("\\boxed{x + 1}", "1 + x", True),
    ("\\boxed{42}", "42", True),
    ("$\\frac{1}{3}$", "0.5", False),
    ("\\boxed{41}", "42", False),
    ("\\boxed{2\\sqrt{3}}", "2\\sqrt{2}", False),
]


@pytest.mark.parametrize(("response", "answer", "accepted"), MATH_CASES)
def test_verify_math_on_real_expressions(response: str, answer: str, accepted: bool) -> None:
    assert verify_math(response, answer) is accepted


GARBAGE = ["", "   ", "}}}{{{\\frac", "\\boxed{", "$$$$", "\\frac{1}{0}", "\x00\x01\x02", "=" * 500, "(" * 200 + "1"]


@pytest.mark.parametrize("response", GARBAGE)
def test_verify_math_garbage_is_wrong_not_an_error(response: str) -> None:
    assert verify_math(response, "\\frac{1}{2}") is False


def test_verify_math_off_the_main_thread_gives_the_same_verdicts() -> None:
    cases = [(response, answer) for response, answer, _ in MATH_CASES] + [(g, "5") for g in GARBAGE[:4]]
    on_main = [verify_math(response, answer) for response, answer in cases]
    with ThreadPoolExecutor(max_workers=2) as pool:
        off_main = list(pool.map(lambda case: verify_math(*case), cases))
    assert off_main == on_main
    assert on_main[: len(MATH_CASES)] == [accepted for _, _, accepted in MATH_CASES]


def test_verify_math_rejects_unparsable_reference() -> None:
    with pytest.raises(ValueError, match="could not parse the reference answer"):
        verify_math("\\boxed{5}", "$$")
    with pytest.raises(ValueError, match="empty"):
        verify_math("\\boxed{5}", "  ")


def test_deadline_helper_stops_waiting_on_a_stuck_call() -> None:
    release = threading.Event()
    started = time.perf_counter()
    with pytest.raises(_DeadlineExceeded):
        _call_with_deadline(lambda: release.wait(30), 0.2)
    assert time.perf_counter() - started < 2.0
    release.set()
    assert _call_with_deadline(lambda: 7, 1.0) == 7
    with pytest.raises(ZeroDivisionError):
        _call_with_deadline(lambda: 1 / 0, 1.0)


def _dapo_reference(length: int, max_length: int, buffer: int, factor: float) -> float:
    """docs/algorithms.md §1 written out by cases: no penalty up to max_length - buffer, then linear."""
    expected_length = max_length - buffer
    if length <= expected_length:
        return 0.0
    excess = length - expected_length
    return -1.0 * excess * factor / buffer


def test_overlong_penalty_hand_computed_points() -> None:
    # max 20, buffer 4 -> free up to 16 tokens, -factor at 20.
    assert overlong_penalty(10, 20, 4, 1.0) == 0.0
    assert overlong_penalty(16, 20, 4, 1.0) == 0.0
    assert overlong_penalty(17, 20, 4, 1.0) == pytest.approx(-0.25)
    assert overlong_penalty(18, 20, 4, 2.0) == pytest.approx(-1.0)
    assert overlong_penalty(20, 20, 4, 1.0) == pytest.approx(-1.0)


@given(
    max_length=st.integers(1, 4096),
    data=st.data(),
    factor=st.floats(0.0, 10.0, allow_nan=False),
)
@settings(max_examples=200)
def test_overlong_penalty_matches_the_spec_formula(max_length: int, data: st.DataObject, factor: float) -> None:
    buffer = data.draw(st.integers(1, max_length))
    length = data.draw(st.integers(0, max_length + 64))
    assert overlong_penalty(length, max_length, buffer, factor) == pytest.approx(
        _dapo_reference(length, max_length, buffer, factor), abs=1e-12
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 20, 4, 1.0), "length must be >= 0"),
        ((5, 20, 0, 1.0), "need 0 < buffer <= max_length"),
        ((5, 20, 21, 1.0), "need 0 < buffer <= max_length"),
        ((5, 20, 4, -1.0), "factor must be finite and >= 0"),
        ((5, 20, 4, float("nan")), "factor must be finite and >= 0"),
    ],
)
def test_overlong_penalty_rejects_bad_values(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        overlong_penalty(*args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((3.5, 20, 4, 1.0), "length must be an integer"),
        ((True, 20, 4, 1.0), "length must be an integer"),
        ((5, "20", 4, 1.0), "max_length must be an integer"),
        ((5, 20, 4, "1"), "factor must be a number"),
    ],
)
def test_overlong_penalty_rejects_bad_types(args: tuple, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        overlong_penalty(*args)


def test_overlong_penalty_accepts_numpy_and_torch_integers() -> None:
    import numpy as np
    import torch

    assert overlong_penalty(np.int64(18), 20, 4, 1.0) == pytest.approx(-0.5)
    assert overlong_penalty(torch.tensor(18), 20, 4, 1.0) == pytest.approx(-0.5)


def test_reward_function_scores_and_accuracy() -> None:
    reward = RewardFunction(task="arithmetic")
    assert reward("82", "82", response_length=3, truncated=False) == (1.0, True)
    assert reward("81", "82", response_length=3, truncated=False) == (0.0, False)

    signed = RewardFunction(task="arithmetic", correct=1.0, wrong=-1.0)
    assert signed("81", "82", response_length=3, truncated=False) == (-1.0, False)


def test_reward_function_overlong_shaping_and_truncation() -> None:
    shaped = RewardFunction(task="arithmetic", max_length=20, buffer=4, factor=1.0)
    assert shaped("82", "82", response_length=16, truncated=False).score == pytest.approx(1.0)
    assert shaped("82", "82", response_length=18, truncated=False).score == pytest.approx(1.0 - 0.5)
    assert shaped("81", "82", response_length=20, truncated=True).score == pytest.approx(0.0 - 1.0)

    assert RewardFunction()("82", "82", response_length=3, truncated=True) == (1.0, True)
    strict = RewardFunction(truncated_is_wrong=True)
    # The verifier still accepts the text (accuracy), but a truncated response scores as wrong.
    assert strict("82", "82", response_length=3, truncated=True) == (0.0, True)
    assert strict("82", "82", response_length=3, truncated=False) == (1.0, True)


def test_reward_function_math_task_and_pickling() -> None:
    reward = RewardFunction(task="math", correct=1.0, wrong=-1.0)
    restored = pickle.loads(pickle.dumps(reward))
    assert restored == reward
    assert restored("\\boxed{0.5}", "\\frac{1}{2}", response_length=9, truncated=False) == (1.0, True)
    assert restored("\\boxed{0.6}", "\\frac{1}{2}", response_length=9, truncated=False) == (-1.0, False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "poetry"}, "task must be one of"),
        ({"correct": float("inf")}, "correct must be a finite number"),
        ({"max_length": 20}, "set both max_length and buffer"),
        ({"max_length": 20, "buffer": 30}, "need 0 < buffer <= max_length"),
        ({"max_length": 20, "buffer": 4, "factor": -1.0}, "factor must be finite and >= 0"),
    ],
)
def test_reward_function_rejects_bad_configuration(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewardFunction(**kwargs)


def test_each_response_is_verified_once_and_scored_with_its_correctness(monkeypatch) -> None:
    from asyppo.actors.rollout import _Sample, score_samples
    from asyppo.tasks.registry import TASKS, Task

    verified = []

    def counting_verify(response_text: str, answer: str) -> bool:
        verified.append(response_text)
        return response_text.strip() == answer

    monkeypatch.setitem(TASKS, "counting", Task("counting", counting_verify))
    reward = RewardFunction(task="counting", correct=1.0, wrong=-1.0)
    texts = ["82", "81", "82", "7"]
    samples = [_Sample(token_ids=[1, 2], logprobs=[-0.1, -0.2], text=t, truncated=False) for t in texts]
    problems = [{"id": "a", "answer": "82"}, {"id": "b", "answer": "7"}]
    scores, correct = score_samples(reward, problems, samples, n=2)
    assert verified == texts  # the verifier ran once per response, in row order
    assert correct.tolist() == [True, False, False, True]
    assert scores.tolist() == [1.0, -1.0, -1.0, 1.0]
    # A plain-number reward function counts score > 0 as correct; a non-finite score names the problem.
    assert score_samples(lambda *a, **k: 0.5, problems, samples, n=2)[1].all()
    with pytest.raises(ValueError, match="problem 'a'.*not a finite score"):
        score_samples(lambda *a, **k: float("nan"), problems, samples, n=2)
