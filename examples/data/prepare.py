"""Turn GSM8K and MATH, as published, into this project's dataset rows (docs/tasks.md, "Dataset files").

    python examples/data/prepare.py gsm8k  gsm8k/main/train-00000-of-00001.parquet  data/gsm8k/train.jsonl
    python examples/data/prepare.py gsm8k  grade-school-math/data/test.jsonl         data/gsm8k/test.jsonl
    python examples/data/prepare.py math   MATH-500/test.jsonl                        data/math/test.jsonl
    python examples/data/prepare.py math   hendrycks_math/algebra/train-*.parquet     data/math/train.jsonl

The input is a local file (download it where there is a network: `huggingface-cli download openai/gsm8k
--repo-type dataset --local-dir gsm8k`, or the original GitHub release), ``.parquet``, ``.jsonl`` or ``.json``;
several files (a shell glob) are concatenated. Each output row is ``{"id", "question", "answer", ...}`` with the
source's other columns kept, for a reward function of your own (docs/rewards.md):

* **gsm8k** (``question``, ``answer`` = worked solution ending in ``#### 72``): the answer is the number after
  ``####``, thousands separators removed; the worked solution is kept as ``solution``.
* **math** (``problem``, ``solution`` with the final answer in ``\\boxed{...}``, optionally ``answer`` as in
  MATH-500): the answer is the ``answer`` column when there is one, else the content of the solution's last
  ``\\boxed{...}`` (braces matched, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``).

A row whose answer cannot be found stops the conversion with its place and the reason. Then train with
``examples/gsm8k-qwen.yaml`` or ``examples/math-qwen.yaml``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)


def gsm8k_row(row: dict) -> dict:
    """GSM8K's ``#### 72`` final answer (``1,000`` → ``1000``); ValueError when it has none."""
    match = GSM8K_ANSWER.search(row["answer"])
    if match is None:
        raise ValueError("no '#### <answer>' at the end of 'answer'")
    answer = match.group(1).replace(",", "").strip()
    rest = {key: value for key, value in row.items() if key not in ("question", "answer")}
    return {"question": row["question"].strip(), "answer": answer, "solution": row["answer"], **rest}


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces matched; None if none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    position = text.index("{", start) + 1
    depth = 1
    for index in range(position, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[position:index].strip()
    return None


def math_row(row: dict) -> dict:
    """MATH's answer: the ``answer`` column (MATH-500), else the solution's last ``\\boxed{}``."""
    answer = row.get("answer") or last_boxed(row.get("solution", ""))
    if not answer:
        raise ValueError("no 'answer' column and no \\boxed{...} in 'solution'")
    rest = {key: value for key, value in row.items() if key not in ("problem", "answer")}
    return {"question": row["problem"].strip(), "answer": str(answer).strip(), **rest}


RECIPES = {"gsm8k": gsm8k_row, "math": math_row}


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import datasets

        return datasets.load_dataset("parquet", data_files=str(path), split="train").to_list()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def convert(recipe: str, sources: list[Path], target: Path) -> int:
    """Rows of ``sources`` (in order) through ``RECIPES[recipe]`` into the JSON Lines file ``target``; returns
    the number of rows. ValueError names the file and row of the first row that cannot be converted."""
    rows = []
    for source in sources:
        for number, row in enumerate(read_rows(source), start=1):
            try:
                converted = RECIPES[recipe](row)
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{source}: row {number}: {type(exc).__name__}: {exc}") from None
            # A stable id from the question, so that the same problem keeps its id across conversions.
            rows.append({"id": hashlib.sha256(converted["question"].encode()).hexdigest()[:16], **converted})
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("sources", nargs="+", type=Path, help="published files (.parquet, .jsonl, .json)")
    parser.add_argument("target", type=Path, help="the .jsonl file to write")
    args = parser.parse_args(argv)
    try:
        count = convert(args.recipe, args.sources, args.target)
    except ValueError as exc:
        print(f"prepare.py: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {count} rows to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
