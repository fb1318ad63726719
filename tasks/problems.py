"""Problems and where they come from: local dataset files and the prompt sampler.

* ``load_problem_file`` reads a local ``.jsonl`` / ``.json`` / ``.parquet`` file (Parquet with the ``datasets``
  packaged builder, which never contacts the hub for a local file; JSON with the standard library, see
  ``_read_rows`` for why) and validates every row before anything trains; a bad row raises ``DatasetError``
  naming the file, the line or row and the reason. Built-in datasets (``builtin:<task>``) come from their task,
  see ``asyppo.tasks.registry.load_problems``, which dispatches between the two.
* ``PromptSampler`` draws prompt batches in seeded epoch-wise shuffles and can be checkpointed and resumed.

No Ray import here: the driver calls these functions and ships the resulting ``Problem`` objects around.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FILE_FORMATS",
    "DatasetError",
    "Problem",
    "PromptSampler",
    "apply_template",
    "is_heldout",
    "load_problem_file",
    "problem_id",
]

FILE_FORMATS = (".jsonl", ".json", ".parquet")


class DatasetError(ValueError):
    """A dataset that cannot be trained on: missing file, unreadable file, bad row, no rows."""


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer. ``id`` is stable across runs (it keys critic shards and logs).

    ``row`` is the dataset row the problem came from, every column as read (empty for built-in tasks): a reward
    function (``reward.function``) receives it, so it can use columns of its own (test cases, units, rubrics)."""

    id: str
    prompt: str
    answer: str
    row: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "answer": self.answer, "row": self.row}


def is_heldout(prompt: str, salt: bytes, fraction: float) -> bool:
    """Whether ``prompt`` belongs to a built-in task's held-out split: the first 8 bytes of SHA-256(salt + prompt),
    read big-endian, fall below ``fraction`` of 2**64. Stable across runs, and independent of the id's hash."""
    digest = hashlib.sha256(salt + prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def problem_id(prompt: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of its SHA-256 (independent of PYTHONHASHSEED)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Local dataset files
# ---------------------------------------------------------------------------------------------------------


def _answer_text(value: Any) -> str | None:
    """The reference answer as text, or ``None`` when ``value`` is not a usable answer."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return repr(value)
    return None


def _read_json_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import json

    rows = []
    with path.open("r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path}: {where}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}")
            rows.append((where, record))
    return rows


def _read_json_array(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import json

    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several top-level values: a JSON Lines file named .json
            return _read_json_lines(path)
        raise DatasetError(f"{path}: invalid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    if not isinstance(records, list):
        raise DatasetError(f"{path}: expected a JSON array of objects (or JSON Lines), got {type(records).__name__}")
    rows = []
    for row_number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DatasetError(f"{path}: row {row_number}: expected a JSON object, got {type(record).__name__}")
        rows.append((f"row {row_number}", record))
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import datasets

    bars_were_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        # The packaged parquet builder on a local file: no hub look-up. keep_in_memory: no stale on-disk copy.
        table = datasets.load_dataset("parquet", data_files=str(path), split="train", keep_in_memory=True)
    except Exception as error:  # datasets / pyarrow raise many types; all of them mean "unreadable"
        raise DatasetError(f"{path}: cannot be read as Parquet ({type(error).__name__}: {error})") from error
    finally:
        if not bars_were_disabled:
            datasets.enable_progress_bars()
    return [(f"row {row_number}", record) for row_number, record in enumerate(table.to_list(), start=1)]


def _read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """All records of a local file, each with where it is (``line N`` of a JSON Lines file, else ``row N``).

    Parquet goes through ``datasets``. JSON is read with the standard library instead: the ``datasets`` JSON
    builder (5.x) rewrites string answers in a column that mixes strings and numbers (``"2"`` becomes ``2``),
    fails with an unrelated message on such a file when it also holds a blank line, and loses line numbers,
    which the error messages need.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: the file is empty (no rows)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_json_lines(path)
        if suffix == ".json":
            return _read_json_array(path)
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text ({error})") from None
    return _read_parquet(path)


class _RowError(Exception):
    """Why one row is unusable; ``_problems_from_rows`` adds the file and the row's place."""


def _validated_fields(
    row: dict[str, Any], prompt_key: str, answer_key: str, id_key: str | None
) -> tuple[str, str, str | None]:
    """The row's question, answer text and id (``None`` without ``id_key``), or ``_RowError``."""
    question = row.get(prompt_key)
    if question is None:
        raise _RowError(f"missing {prompt_key!r}")
    if not isinstance(question, str):
        raise _RowError(f"{prompt_key!r} must be a string, got {type(question).__name__} {question!r}")
    if not question.strip():
        raise _RowError(f"empty {prompt_key!r}")
    raw_answer = row.get(answer_key)
    if raw_answer is None:
        raise _RowError(f"missing {answer_key!r}")
    answer = _answer_text(raw_answer)
    if answer is None:
        raise _RowError(f"{answer_key!r} must be a non-empty string or a finite number, got {raw_answer!r}")
    if id_key is None:
        return question, answer, None
    raw_id = row.get(id_key)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
        raise _RowError(f"{id_key!r} must be a non-empty string or an int, got {raw_id!r}")
    return question, answer, str(raw_id).strip()


def _problems_from_rows(
    rows: list[tuple[str, dict[str, Any]]],
    where: str,
    *,
    prompt_key: str,
    answer_key: str,
    id_key: str | None,
    prompt_template: str,
) -> list[Problem]:
    if not rows:
        raise DatasetError(f"{where}: the dataset has no rows")
    columns = set().union(*(row for _, row in rows))
    for role, key in (("prompt_key", prompt_key), ("answer_key", answer_key), ("id_key", id_key)):
        if key is not None and key not in columns:
            raise DatasetError(f"{where}: column {key!r} ({role}) not found in any row; keys are {sorted(columns)}")

    problems: list[Problem] = []
    first_place_of_id: dict[str, str] = {}
    for place, row in rows:
        try:
            question, answer, raw_id = _validated_fields(row, prompt_key, answer_key, id_key)
        except _RowError as error:
            raise DatasetError(f"{where}: {place}: {error}") from None
        prompt = prompt_template.replace("{question}", question)
        identifier = problem_id(prompt) if raw_id is None else raw_id
        if identifier in first_place_of_id:
            what = f"duplicate {id_key!r} {identifier!r}" if id_key else "duplicate question (same prompt)"
            raise DatasetError(f"{where}: {place}: {what}, first seen at {first_place_of_id[identifier]}")
        first_place_of_id[identifier] = place
        problems.append(Problem(id=identifier, prompt=prompt, answer=answer, row=row))
    return problems


def apply_template(problems: list[Problem], prompt_template: str) -> list[Problem]:
    """``prompt_template`` with ``{question}`` replaced by each problem's prompt (plain replacement, so LaTeX
    braces elsewhere in the template are fine); ids are re-derived from the new prompts."""
    if prompt_template == "{question}":
        return problems
    return [
        Problem(id=problem_id(prompt), prompt=prompt, answer=problem.answer, row=problem.row)
        for problem in problems
        for prompt in [prompt_template.replace("{question}", problem.prompt)]
    ]


def load_problem_file(
    source: str,
    *,
    prompt_key: str = "question",
    answer_key: str = "answer",
    id_key: str | None = None,
    prompt_template: str = "{question}",
    limit: int | None = None,
    seed: int = 0,
) -> list[Problem]:
    """Problems from a local ``.jsonl`` / ``.json`` / ``.parquet`` file.

    A file is one split (point ``source`` at the eval file for evaluation). A ``.json`` file is an array of
    objects (or JSON Lines). Every row is validated -- the question is a non-empty string, the answer a
    non-empty string or a finite number (a number becomes its text: ``42`` -> ``"42"``, ``0.5`` -> ``"0.5"``),
    the id (column ``id_key``, else a hash of the prompt) is unique -- and the first bad row raises
    ``DatasetError`` with the file, where the row is (``line N`` of a JSON Lines file, 1-based ``row N``
    otherwise) and the reason. ``limit`` then keeps a ``seed``-chosen subset of that many rows, in file order.
    """
    path = Path(source).expanduser()
    if path.suffix.lower() not in FILE_FORMATS:
        raise DatasetError(
            f"{source}: unsupported dataset source; use a built-in dataset (builtin:<task>) or a file ending in "
            f"{', '.join(FILE_FORMATS)}"
        )
    rows = _read_rows(path)
    problems = _problems_from_rows(
        rows,
        str(path),
        prompt_key=prompt_key,
        answer_key=answer_key,
        id_key=id_key,
        prompt_template=prompt_template,
    )
    if limit is not None and limit < len(problems):
        keep = sorted(random.Random(f"asyppo-limit:{seed}").sample(range(len(problems)), limit))
        problems = [problems[index] for index in keep]
    return problems


# ---------------------------------------------------------------------------------------------------------
# Sampling prompts for rollouts
# ---------------------------------------------------------------------------------------------------------


def _fingerprint(problems: Sequence[Problem]) -> str:
    digest = hashlib.sha256()
    for problem in problems:
        digest.update(problem.id.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


class PromptSampler:
    """Seeded epoch-wise shuffling over a fixed list of problems, resumable from ``state_dict``.

    Epoch ``e`` visits the problems in a permutation that depends only on ``(seed, e)``. A batch is a
    contiguous slice of one epoch's permutation, so a batch never holds the same problem twice; when fewer
    than ``count`` problems remain in the epoch, those are skipped and the next epoch starts (like a data
    loader's ``drop_last``).
    """

    def __init__(self, problems: Sequence[Problem], *, seed: int = 0) -> None:
        if not problems:
            raise ValueError("PromptSampler: no problems to sample from")
        self._problems = list(problems)
        self._seed = seed
        self._fingerprint = _fingerprint(self._problems)
        self._epoch = 0
        self._position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self._problems)))
        random.Random(f"asyppo-sampler:{self._seed}:{epoch}").shuffle(order)
        return order

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    def __len__(self) -> int:
        return len(self._problems)

    def next_batch(self, count: int) -> list[Problem]:
        """The next ``count`` distinct problems (``1 <= count <= len(self)``)."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(self._problems):
            raise ValueError(
                f"PromptSampler.next_batch: count must be an int in [1, {len(self._problems)}] "
                f"(the number of problems), got {count!r}"
            )
        if self._position + count > len(self._problems):
            self._epoch += 1
            self._position = 0
            self._order = self._permutation(self._epoch)
        indices = self._order[self._position : self._position + count]
        self._position += count
        return [self._problems[index] for index in indices]

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self._seed,
            "epoch": self._epoch,
            "position": self._position,
            "num_problems": len(self._problems),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state saved for other problems or another seed."""
        expected = {"seed": self._seed, "num_problems": len(self._problems), "fingerprint": self._fingerprint}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"PromptSampler.load_state_dict: {key} is {state.get(key)!r} in the saved state but "
                    f"{value!r} here; the run is being resumed with different data or seed"
                )
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(position, int):
            raise ValueError(f"PromptSampler.load_state_dict: bad epoch/position {epoch!r}/{position!r}")
        if not 0 <= position <= len(self._problems):
            raise ValueError(f"PromptSampler.load_state_dict: position {position} out of [0, {len(self._problems)}]")
        self._epoch = epoch
        self._position = position
        self._order = self._permutation(epoch)
