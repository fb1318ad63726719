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
from asyppo.tasks.math import _call_with_deadline, _DeadlineExceeded, final_answer, verify_math
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


# (response, the answer it gives) by final_answer's documented rules (docs/rewards.md, "The math verifier").
FINAL_ANSWER_CASES = [
    # 1. the last \boxed{} / \fbox{}, braces matched, wins over anything after it.
    ("\\boxed{70}. Check: 48+24=72", "70"),
    ("\\boxed{5} (not 6)", "5"),
    ("x = 4, so the answer is \\boxed{4}", "4"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}} is the set", "\\{1, 2\\}"),
    ("first \\boxed{1}, then \\fbox{2}", "2"),
    ("\\boxed{5} and then a truncated \\boxed{", "5"),
    # 2. the last explicit statement, from the rest of its line.
    ("#### 72", "72"),
    ("48/2 = 24 clips in May.\n#### 1,234", "1234"),
    ("So the answer is 0.5.", "0.5"),
    ("Answer: 3/4", "3/4"),
    ("**Final Answer:** 72 clips", "72"),
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("The answer is therefore 14, not 3.", "14"),
    ("The answer is (1, 2].", "(1, 2]"),
    ("The answer is 2\\sqrt{2}", "2\\sqrt{2}"),
    ("the answer is 3. Wait, recheck: the answer is 4.", "4"),
    ("The answer is correct, since 48+24=72", "72"),  # no answer after the prose words: not a statement
    # 3. the last number.
    ("The answer to 9+5 is 12", "12"),
    ("I think 3 or 14", "14"),
    ("The total is 1,234 dollars.", "1234"),
    ("-3", "-3"),
    ("x = -3.", "-3"),
    ("48-24", "24"),
    ("It costs $18, or 50%.", "50"),
    ("so it is .5", ".5"),
    ("we get $\\frac{1}{3}$", "\\frac{1}{3}"),
    ("so y = x^2", None),
    # none at all
    ("", None),
    ("no numbers here", None),
    ("\\boxed{}", None),
]


@pytest.mark.parametrize(("response", "given"), FINAL_ANSWER_CASES)
def test_final_answer_takes_the_answer_the_response_gives(response: str, given: str | None) -> None:
    assert final_answer(response) == given


# The response restates the question, or checks its work after answering: the expression in the text is not its
# answer (math-verify's own extraction found 9+5 = 14 and 48+24 = 72 here, and called both right).
HONEST_CASES = [
    ("The answer to 9+5 is 12", "14", False),
    ("\\boxed{70}. Check: 48+24=72", "72", False),
    ("I think 3 or 14", "14", True),  # the last number is 14: a hedge is judged by its last candidate
    ("I think 14 or 3", "14", False),
    ("#### 72", "72", True),
    ("So the answer is 0.5.", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("The total is 1,234 dollars.", "1234", True),
    ("-3", "-3", True),
    ("x = 4, so the answer is \\boxed{4}", "4", True),
    ("Answer: 3/4", "\\frac{3}{4}", True),
    ("\\boxed{5} (not 6)", "5", True),
    ("\\boxed{5} (not 6)", "6", False),
    ("The answer is (1, 2].", "(1, 2]", True),
    ("\\boxed{[1, 2)}", "(1, 2]", False),
    ("The answer is 3 or 14", "14", False),
]


@pytest.mark.parametrize(("response", "answer", "accepted"), HONEST_CASES)
def test_verify_math_judges_the_given_answer_only(response: str, answer: str, accepted: bool) -> None:
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


def _score(reward: RewardFunction, response: str, answer: str, *, length: int = 3, truncated: bool = False):
    return reward("1+1=", response, answer, {}, response_length=length, truncated=truncated)


def test_reward_function_scores_and_accuracy() -> None:
    reward = RewardFunction(task="arithmetic")
    assert _score(reward, "82", "82") == (1.0, True)
    assert _score(reward, "81", "82") == (0.0, False)

    signed = RewardFunction(task="arithmetic", correct=1.0, wrong=-1.0)
    assert _score(signed, "81", "82") == (-1.0, False)


def test_reward_function_overlong_shaping_and_truncation() -> None:
    shaped = RewardFunction(task="arithmetic", max_length=20, buffer=4, factor=1.0)
    assert _score(shaped, "82", "82", length=16).score == pytest.approx(1.0)
    assert _score(shaped, "82", "82", length=18).score == pytest.approx(1.0 - 0.5)
    assert _score(shaped, "81", "82", length=20, truncated=True).score == pytest.approx(0.0 - 1.0)

    assert _score(RewardFunction(), "82", "82", truncated=True) == (1.0, True)
    strict = RewardFunction(truncated_is_wrong=True)
    # The verifier still accepts the text (accuracy), but a truncated response scores as wrong.
    assert _score(strict, "82", "82", truncated=True) == (0.0, True)
    assert _score(strict, "82", "82") == (1.0, True)


def test_reward_function_math_task_and_pickling() -> None:
    reward = RewardFunction(task="math", correct=1.0, wrong=-1.0)
    restored = pickle.loads(pickle.dumps(reward))
    assert restored == reward
    assert _score(restored, "\\boxed{0.5}", "\\frac{1}{2}", length=9) == (1.0, True)
    assert _score(restored, "\\boxed{0.6}", "\\frac{1}{2}", length=9) == (-1.0, False)


def test_each_builtin_verifier_is_a_reward_function_of_the_documented_shape() -> None:
    """The default (no reward.function) and naming the task's function explicitly score alike."""
    from asyppo.tasks.registry import TASKS

    cases = {"arithmetic": ("37+45=", "82", "82"), "chain": ("1+2+3=", "1+2=3;3+3=6", "6"),
             "math": ("x?", "\\boxed{\\frac{2}{4}}", "0.5"),
             "words": ("What is 9 plus 5? Answer with just the number.", "The answer is 14.", "14")}
    module = {"words": "math"}  # the words task is judged by the math task's verifier
    assert set(cases) == set(TASKS)
    for task, (prompt, right, answer) in cases.items():
        named = RewardFunction(task=task, function=f"asyppo.tasks.{module.get(task, task)}:reward", wrong=-1.0)
        default = RewardFunction(task=task, wrong=-1.0)
        for response, expected in ((right, (1.0, True)), ("7", (-1.0, False))):
            assert named(prompt, response, answer, {}, response_length=1, truncated=False) == expected, task
            assert default(prompt, response, answer, {}, response_length=1, truncated=False) == expected, task


USER_REWARDS = """
calls = []

def verdict(prompt, response, answer, row):
    calls.append((prompt, response, answer, row))
    return response.strip() == answer

def score(prompt, response, answer, row):
    return row["weight"] * (response == answer) - 0.5

def pair(prompt, response, answer, row):
    return 2.0, response == answer

def numpy_pair(prompt, response, answer, row):
    import numpy
    return numpy.float32(0.5), numpy.bool_(response == answer)

def nan(prompt, response, answer, row):
    return float("nan")

def text(prompt, response, answer, row):
    return "yes"

not_callable = 3

def broken(prompt, response, answer, row):
    raise KeyError("unit")
"""


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    """A reward module outside the package, both as a file and as an importable module in the working directory."""
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("where", ["my_rewards.py", "my_rewards"])
def test_user_reward_functions_in_each_returned_form(user_rewards, where) -> None:
    def call(name, response="82", row=None, **kwargs):
        reward = RewardFunction(task="arithmetic", function=f"{where}:{name}", **kwargs)
        return reward("37+45=", response, "82", row or {"weight": 3.0}, response_length=3, truncated=False)

    # A verdict is scored with reward.correct / reward.wrong; the function sees all four arguments.
    assert call("verdict", correct=2.0) == (2.0, True)
    assert call("verdict", response="81", wrong=-1.0) == (-1.0, False)
    # A score is used as is, correct when > 0; a pair gives both; overlong shaping applies to all.
    assert call("score") == (2.5, True)
    assert call("score", response="81") == (-0.5, False)
    assert call("pair", response="81") == (2.0, False)
    assert call("numpy_pair") == (0.5, True)  # numpy scalars, as a vectorised scorer returns them
    assert call("pair", max_length=4, buffer=2).score == pytest.approx(2.0 - 0.5)
    # It survives pickling (the rollout workers get it this way) and is loaded once per process.
    reward = pickle.loads(pickle.dumps(RewardFunction(function=f"{where}:verdict")))
    assert reward.scorer is RewardFunction(function=f"{where}:verdict").scorer
    reward("p", "r", "a", {"k": 1}, response_length=1, truncated=False)
    assert reward.scorer.__globals__["calls"][-1] == ("p", "r", "a", {"k": 1})


@pytest.mark.parametrize(("spec", "message"), [
    ("my_rewards.py:missing", "has no 'missing'"),
    ("my_rewards.py:not_callable", "is a int, not a function"),
    ("elsewhere.py:verdict", "elsewhere.py: no such file"),
    ("no_such_module:verdict", "cannot import 'no_such_module'"),
    ("my_rewards.py", "must look like"),
])
def test_unloadable_reward_functions_say_why(user_rewards, spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        RewardFunction(function=spec).scorer


@pytest.mark.parametrize(("name", "message"), [("nan", "returned nan: expected"), ("text", "returned 'yes': expected")])
def test_a_reward_function_returning_something_else_is_an_error(user_rewards, name, message) -> None:
    with pytest.raises(ValueError, match=message):
        RewardFunction(function=f"my_rewards.py:{name}")("p", "r", "a", {}, response_length=1, truncated=False)


def test_preflight_runs_the_reward_function_on_a_row_before_any_actor(user_rewards) -> None:
    from asyppo.cluster.job_inputs import reward_function
    from asyppo.cluster.preflight import reward_function_problems
    from asyppo.common.config import build_config
    from asyppo.tasks.problems import Problem

    def problems(function: str) -> list[tuple[str, str]]:
        cfg = build_config(overrides=[f"reward.function=my_rewards.py:{function}"])
        return reward_function_problems(cfg, reward_function(cfg), rows)

    rows = {"data.train": [Problem("a", "1+1=", "2", row={"weight": 1.0})], "data.eval": []}
    assert problems("score") == []
    [(field, reason)] = problems("broken")
    assert field == "reward.function" and "first row of data.train ('a'" in reason and "KeyError" in reason
    [(field, reason)] = problems("nope")
    assert field == "reward.function" and "has no 'nope'" in reason


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
    from asyppo.actors.rollout_worker import _Sample, score_samples
    from asyppo.tasks.registry import TASKS, Task

    verified = []

    def counting_verify(response_text: str, answer: str) -> bool:
        verified.append(response_text)
        return response_text.strip() == answer

    monkeypatch.setitem(TASKS, "counting", Task("counting", counting_verify,
                                                lambda prompt, response, answer, row: counting_verify(response, answer)))
    reward = RewardFunction(task="counting", correct=1.0, wrong=-1.0)
    texts = ["82", "81", "82", "7"]
    samples = [_Sample(token_ids=[1, 2], logprobs=[-0.1, -0.2], text=t, truncated=False) for t in texts]
    problems = [{"id": "a", "prompt": "80+2=", "answer": "82"}, {"id": "b", "prompt": "3+4=", "answer": "7"}]
    scores, correct = score_samples(reward, problems, samples, n=2)
    assert verified == texts  # the verifier ran once per response, in row order
    assert correct.tolist() == [True, False, False, True]
    assert scores.tolist() == [1.0, -1.0, -1.0, 1.0]
    # A failing reward function, or a score that is not finite, names the problem it happened on.
    with pytest.raises(ValueError, match="problem 'a'.*not a finite number"):
        score_samples(lambda *a, **k: (float("nan"), False), problems, samples, n=2)
    with pytest.raises(ValueError, match="problem 'a'.*failed on the response '82': ZeroDivisionError"):
        score_samples(lambda *a, **k: 1 / 0, problems, samples, n=2)


def test_the_example_reward_function_gives_partial_credit(monkeypatch) -> None:
    """examples/rewards/partial_credit.py as its config names it, from the repository's root."""
    from pathlib import Path

    from asyppo.common.config import load_config
    from asyppo.cluster.job_inputs import reward_function

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    reward = reward_function(load_config(root / "examples" / "rewards" / "partial-credit.yaml"))

    def score(response, row=None):
        return tuple(reward("37+45=", response, "82", row or {}, response_length=2, truncated=False))

    assert score("82") == (1.0, True)
    assert score("84") == (pytest.approx(0.5 * (1 - 2 / 10)), False)
    assert score("84", {"tolerance": 4}) == (pytest.approx(0.25), False)
    assert score("200") == (0.0, False) and score("eighty") == (0.0, False)
