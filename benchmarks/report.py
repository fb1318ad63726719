"""What every benchmark script does with its numbers: a JSON file to keep, a Markdown table to read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, record: dict[str, Any], indent: int = 2) -> None:
    """``record`` as JSON at ``path``, its folder created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=indent) + "\n")


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    """A Markdown table: one header row of ``columns``, then ``rows`` (cells already formatted)."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")
