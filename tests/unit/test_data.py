"""Built-in arithmetic problems, dataset files and their validation, the prompt sampler."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from asyppo.tasks.arithmetic import arithmetic_problems
from asyppo.tasks.problems import DatasetError, Problem, PromptSampler
from asyppo.tasks.registry import load_problems

ARITHMETIC_SOURCE = "builtin:arithmetic"

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _evaluate(prompt: str) -> int:
    """Independent evaluation of a built-in prompt ``a<op>b=``."""
    match = re.fullmatch(r"(\d+)([+*-])(\d+)=", prompt)
    assert match, prompt
    left, operator, right = int(match[1]), match[2], int(match[3])
    return {"+": left + right, "-": left - right, "*": left * right}[operator]


# ------------------------------------------------------------------------------------------- built-in task


def test_builtin_splits_partition_the_problem_space() -> None:
    train = arithmetic_problems(None, split="train", digits=2, operators="+-")
    heldout = arithmetic_problems(None, split="eval", digits=2, operators="+-")
    every_problem = {f"{a}{op}{b}=" for op in "+-" for a in range(100) for b in range(100)}
    train_prompts = {p.prompt for p in train}
    heldout_prompts = {p.prompt for p in heldout}
    assert not train_prompts & heldout_prompts
    assert train_prompts | heldout_prompts == every_problem
    assert len(train_prompts) == len(train) and len(heldout_prompts) == len(heldout)
    # about one problem in ten is held out
    assert 0.08 < len(heldout) / len(every_problem) < 0.12


def test_builtin_held_out_for_any_seed_and_count() -> None:
    heldout = {p.prompt for p in arithmetic_problems(None, split="eval")}
    for seed in range(3):
        assert not {p.prompt for p in arithmetic_problems(500, split="train", seed=seed)} & heldout


@pytest.mark.parametrize("operators", ["+", "-", "*", "+-*"])
def test_builtin_answers_are_exact(operators: str) -> None:
    problems = arithmetic_problems(300, split="train", seed=1, digits=2, operators=operators)
    assert len(problems) == 300
    for problem in problems:
        assert problem.answer == str(_evaluate(problem.prompt))
        assert set(problem.prompt[:-1]) <= set("0123456789" + operators)


def test_builtin_is_deterministic_and_seeded() -> None:
    first = arithmetic_problems(64, split="eval", seed=3)
    assert first == arithmetic_problems(64, split="eval", seed=3)
    assert first != arithmetic_problems(64, split="eval", seed=4)
    assert len({p.id for p in first}) == 64
    assert all(
        isinstance(p, Problem) and p.to_dict() == {"id": p.id, "prompt": p.prompt, "answer": p.answer, "row": {}}
        for p in first
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 5, "split": "test"}, "split must be 'train' or 'eval'"),
        ({"count": 0, "split": "train"}, "count must be a positive int"),
        ({"count": 5, "split": "train", "digits": 4}, "digits must be an int in"),
        ({"count": 5, "split": "train", "operators": "/"}, "operators must be distinct characters"),
        ({"count": 5, "split": "train", "operators": "++"}, "operators must be distinct characters"),
        ({"count": 10**6, "split": "eval"}, "holds only"),
    ],
)
def test_builtin_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        arithmetic_problems(**kwargs)


def test_load_problems_builtin_source() -> None:
    assert load_problems(ARITHMETIC_SOURCE, split="eval", limit=20, seed=2) == arithmetic_problems(
        20, split="eval", seed=2
    )
    templated = load_problems(ARITHMETIC_SOURCE, split="train", limit=3, prompt_template="Q {question}")
    assert [p.prompt for p in templated] == ["Q " + p.prompt for p in arithmetic_problems(3, split="train")]
    with pytest.raises(DatasetError, match="unknown built-in dataset"):
        load_problems("builtin:poetry")
    with pytest.raises(DatasetError, match="split must be 'train' or 'eval'"):
        load_problems(ARITHMETIC_SOURCE, split="validation")


# ------------------------------------------------------------------------------------------- files


def test_jsonl_fixture_loads() -> None:
    problems = load_problems(str(FIXTURES / "math_small.jsonl"), id_key="id")
    assert [(p.id, p.answer) for p in problems] == [
        ("half", "0.5"),
        ("sum", "42"),
        ("root", "2\\sqrt{2}"),
        ("frac", "\\frac{3}{4}"),
        ("neg", "-7"),
    ]
    assert problems[2].prompt == "Simplify $\\sqrt{8}$."
    # Each problem keeps its whole row, for a reward function's own columns.
    rows = [json.loads(line) for line in (FIXTURES / "math_small.jsonl").read_text().splitlines() if line.strip()]
    assert [p.row for p in problems] == rows


def test_jsonl_ids_default_to_a_stable_prompt_hash() -> None:
    first = load_problems(str(FIXTURES / "math_small.jsonl"))
    again = load_problems(str(FIXTURES / "math_small.jsonl"))
    assert [p.id for p in first] == [p.id for p in again]
    assert len({p.id for p in first}) == len(first) == 5
    other_template = load_problems(str(FIXTURES / "math_small.jsonl"), prompt_template="{question} Think.")
    assert {p.id for p in other_template}.isdisjoint(p.id for p in first)


def test_parquet_fixture_loads_with_keys_and_template() -> None:
    problems = load_problems(
        str(FIXTURES / "math_small.parquet"),
        prompt_key="problem",
        answer_key="solution",
        id_key="uid",
        prompt_template="Problem: {question}\nPut the final answer in \\boxed{}.",
    )
    assert [(p.id, p.answer) for p in problems] == [("p1", "21"), ("p2", "\\frac{9}{2}"), ("p3", "2.5"), ("p4", "32")]
    assert problems[3].prompt == "Problem: Compute $2^5$.\nPut the final answer in \\boxed{}."


def test_json_array_loads(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"question": "1+1?", "answer": 2}, {"question": "2+3?", "answer": "5"}]))
    assert [(p.prompt, p.answer) for p in load_problems(str(path))] == [("1+1?", "2"), ("2+3?", "5")]


def test_limit_keeps_a_seeded_subset_in_file_order() -> None:
    full = load_problems(str(FIXTURES / "math_small.jsonl"), id_key="id")
    subset = load_problems(str(FIXTURES / "math_small.jsonl"), id_key="id", limit=3, seed=5)
    assert subset == load_problems(str(FIXTURES / "math_small.jsonl"), id_key="id", limit=3, seed=5)
    assert len(subset) == 3
    positions = [full.index(p) for p in subset]
    assert positions == sorted(positions)


def test_bad_row_fixture_names_file_line_and_reason() -> None:
    path = FIXTURES / "bad_row.jsonl"
    with pytest.raises(DatasetError) as error:
        load_problems(str(path))
    assert str(error.value) == f"{path}: line 3: missing 'answer'"


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


GOOD = {"question": "1+1?", "answer": "2", "id": "a"}

# (rows, extra load_problems kwargs, expected message fragment); the bad row is always on line 2.
BAD_ROWS = [
    ([GOOD, {"answer": "2", "id": "b"}], {}, "line 2: missing 'question'"),
    ([GOOD, {"question": None, "answer": "2", "id": "b"}], {}, "line 2: missing 'question'"),
    ([GOOD, {"question": "  ", "answer": "2", "id": "b"}], {}, "line 2: empty 'question'"),
    ([GOOD, {"question": 12, "answer": "2", "id": "b"}], {}, "line 2: 'question' must be a string, got int"),
    ([GOOD, {"question": "3+3?", "id": "b"}], {}, "line 2: missing 'answer'"),
    ([GOOD, {"question": "3+3?", "answer": "", "id": "b"}], {}, "line 2: 'answer' must be a non-empty string"),
    ([GOOD, {"question": "3+3?", "answer": [6], "id": "b"}], {}, "line 2: 'answer' must be a non-empty string"),
    ([GOOD, {"question": "3+3?", "answer": True, "id": "b"}], {}, "line 2: 'answer' must be a non-empty string"),
    ([GOOD, {"question": "3+3?", "answer": {"v": 6}, "id": "b"}], {}, "line 2: 'answer' must be"),
    ([GOOD, '{"question": "3+3?", "answer": NaN, "id": "b"}'], {}, "line 2: 'answer' must be"),
    (
        [GOOD, {"question": "1+1?", "answer": "2", "id": "b"}],
        {},
        "line 2: duplicate question (same prompt), first seen at line 1",
    ),
    (
        [GOOD, {"question": "3+3?", "answer": "6", "id": "a"}],
        {"id_key": "id"},
        "line 2: duplicate 'id' 'a', first seen at line 1",
    ),
    (
        [GOOD, {"question": "3+3?", "answer": "6", "id": ""}],
        {"id_key": "id"},
        "line 2: 'id' must be a non-empty string",
    ),
    ([GOOD, '{"question": "3+3?", "answer": '], {}, "line 2: invalid JSON"),
    ([GOOD, "[1, 2]"], {}, "line 2: expected a JSON object, got list"),
]


@pytest.mark.parametrize(("rows", "kwargs", "message"), BAD_ROWS)
def test_every_kind_of_bad_row_is_reported_with_line_and_reason(
    tmp_path: Path, rows: list, kwargs: dict, message: str
) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetError) as error:
        load_problems(str(path), **kwargs)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_blank_lines_do_not_shift_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DatasetError, match="line 4: missing 'answer'"):
        load_problems(str(path))


def test_bad_row_in_json_array_reports_row(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD | {"question": "", "id": "z"}]))
    with pytest.raises(DatasetError, match=r"data\.json: row 2: empty 'question'"):
        load_problems(str(path))


def test_bad_row_in_parquet_reports_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"question": ["1+1?", "2+2?", "3+3?"], "answer": ["2", None, "6"]}), path)
    with pytest.raises(DatasetError, match=r"data\.parquet: row 2: missing 'answer'"):
        load_problems(str(path))


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "message"),
    [
        ("empty.jsonl", "", {}, "the file is empty"),
        ("blank.jsonl", "\n\n", {}, "the dataset has no rows"),
        ("empty.json", "[]", {}, "the dataset has no rows"),
        ("object.json", '{"question": "x"}', {}, "expected a JSON array of objects"),
        ("cols.jsonl", json.dumps(GOOD) + "\n", {"prompt_key": "problem"}, "column 'problem' (prompt_key) not found"),
        ("cols2.jsonl", json.dumps(GOOD) + "\n", {"id_key": "uid"}, "column 'uid' (id_key) not found"),
        ("data.csv", "question,answer\n", {}, "unsupported dataset source"),
        ("broken.parquet", "not parquet", {}, "cannot be read as Parquet"),
    ],
)
def test_unusable_files_give_clear_errors(tmp_path: Path, name: str, content: str, kwargs: dict, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_problems(str(path), **kwargs)


def test_missing_file_and_bad_template(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_problems(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="must contain '\\{question\\}'"):
        load_problems(str(FIXTURES / "math_small.jsonl"), prompt_template="{problem}")


# ------------------------------------------------------------------------------------------- sampler


def _problems(count: int) -> list[Problem]:
    return [Problem(id=f"p{index}", prompt=f"{index}+0=", answer=str(index)) for index in range(count)]


def test_sampler_epochs_cover_every_problem_once_in_new_orders() -> None:
    sampler = PromptSampler(_problems(12), seed=7)
    epochs = []
    for _ in range(3):
        epoch = [p.id for _ in range(3) for p in sampler.next_batch(4)]
        assert Counter(epoch) == Counter(f"p{i}" for i in range(12))
        epochs.append(epoch)
    assert epochs[0] != epochs[1] != epochs[2]
    assert sampler.epoch == 2


def test_sampler_is_deterministic_per_seed() -> None:
    a, b, c = (
        PromptSampler(_problems(20), seed=1),
        PromptSampler(_problems(20), seed=1),
        PromptSampler(_problems(20), seed=2),
    )
    run_a = [[p.id for p in a.next_batch(6)] for _ in range(10)]
    run_b = [[p.id for p in b.next_batch(6)] for _ in range(10)]
    run_c = [[p.id for p in c.next_batch(6)] for _ in range(10)]
    assert run_a == run_b
    assert run_b != run_c


def test_sampler_batches_never_repeat_a_problem() -> None:
    sampler = PromptSampler(_problems(10), seed=0)
    for _ in range(25):
        batch = sampler.next_batch(4)  # 10 is not a multiple of 4: epochs end with a partial remainder
        assert len({p.id for p in batch}) == 4


def test_sampler_resume_continues_where_it_stopped() -> None:
    problems = _problems(30)
    original = PromptSampler(problems, seed=9)
    for _ in range(7):
        original.next_batch(8)
    state = json.loads(json.dumps(original.state_dict()))  # it must survive a JSON checkpoint
    expected = [[p.id for p in original.next_batch(8)] for _ in range(6)]

    resumed = PromptSampler(problems, seed=9)
    resumed.load_state_dict(state)
    assert [[p.id for p in resumed.next_batch(8)] for _ in range(6)] == expected


def test_sampler_refuses_state_of_other_data_and_bad_counts() -> None:
    state = PromptSampler(_problems(30), seed=9).state_dict()
    with pytest.raises(ValueError, match="num_problems"):
        PromptSampler(_problems(31), seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(_problems(30), seed=8).load_state_dict(state)
    renamed = [Problem(id=f"q{i}", prompt=p.prompt, answer=p.answer) for i, p in enumerate(_problems(30))]
    with pytest.raises(ValueError, match="fingerprint"):
        PromptSampler(renamed, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match=r"count must be an int in \[1, 30\]"):
        PromptSampler(_problems(30)).next_batch(31)
    with pytest.raises(ValueError, match="no problems"):
        PromptSampler([])


def test_data_recipes_turn_published_gsm8k_and_math_into_rows_the_verifier_accepts(tmp_path):
    """examples/data/prepare.py on rows as GSM8K and MATH publish them (the #### answer, the last \\boxed{})."""
    import sys as _sys

    from asyppo.tasks.math import verify_math

    _sys.path.insert(0, str(FIXTURES.parents[1] / "examples" / "data"))
    import prepare

    published = FIXTURES / "published"
    assert prepare.main(["gsm8k", str(published / "gsm8k.jsonl"), str(tmp_path / "gsm8k.jsonl")]) == 0
    gsm8k = load_problems(str(tmp_path / "gsm8k.jsonl"), id_key="id")
    assert [p.answer for p in gsm8k] == ["72", "2000"]
    assert gsm8k[0].row["solution"].endswith("#### 72") and gsm8k[0].prompt.startswith("Natalia sold clips")
    assert prepare.main(["math", str(published / "math.jsonl"), str(tmp_path / "math.jsonl")]) == 0
    math_rows = load_problems(str(tmp_path / "math.jsonl"), id_key="id")
    assert [p.answer for p in math_rows] == ["\\frac{1}{2}", "3"]
    assert math_rows[1].row["unique_id"] == "test/algebra/1.json"
    # The task's verifier accepts a response that boxes the reference answer.
    for problem in [*gsm8k, *math_rows]:
        assert verify_math(f"... so the answer is \\boxed{{{problem.answer}}}.", problem.answer)
    # A row without a findable answer stops the conversion, naming it.
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "no final line"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: row 1: ValueError: no '#### <answer>'"):
        prepare.convert("gsm8k", [tmp_path / "bad.jsonl"], tmp_path / "out.jsonl")
    assert prepare.last_boxed("\\boxed{a} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
