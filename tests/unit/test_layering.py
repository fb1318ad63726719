"""The rooms' import graph keeps its layers (docs/architecture.md, "Rooms").

Every library module is parsed with ``ast`` and every import in it is checked, wherever it stands (module level,
inside a function, under ``TYPE_CHECKING``), plus ``importlib.import_module``/``__import__`` calls with a literal
name. The table below is the rule, and docs/architecture.md's table must say the same.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EVERYTHING = "everything"

# The rooms, bottom to top, and the rooms of the project each may import besides itself: the "may import from the
# project" column of docs/architecture.md's "Rooms" table (test_the_docs_table_is_this_table keeps them equal).
ROOMS: dict[str, tuple[str, ...] | str] = {
    "core": (),
    "tasks": ("core",),
    "weight_sync": ("core",),
    "common": ("core", "tasks"),
    "learner": ("core", "tasks", "weight_sync", "common"),
    "critics": ("core", "tasks", "weight_sync", "common"),
    "actors": ("core", "tasks", "weight_sync", "common"),
    "cluster": EVERYTHING,
}
ROLES = ("learner", "critics", "actors")

# Libraries outside the project that a room must not import: the algorithm is plain PyTorch, and the roles are
# plain classes that the cluster turns into Ray actors.
FORBIDDEN_LIBRARIES: dict[str, tuple[str, ...]] = {
    "core": ("ray", "deepspeed", "vllm"),
    **{role: ("ray",) for role in ROLES},
}


def modules(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = ["asyppo", *path.relative_to(REPO).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[int, str, str]]:
    """``(line, imported module, statement)`` for every import in the file; ``from m import a, b`` yields ``m.a``
    and ``m.b`` (the name may be a submodule, and ``from asyppo import cluster`` is an import of a room)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ast.unparse(node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:
                yield node.lineno, module if alias.name == "*" else f"{module}.{alias.name}", ast.unparse(node)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value, ast.unparse(node)


def project_room(module: str) -> str | None:
    """The room of an ``asyppo.<room>…`` module; None for anything outside the project."""
    parts = module.split(".")
    return parts[1] if parts[0] == "asyppo" and len(parts) > 1 else None


def where(path: Path, line: int, statement: str) -> str:
    return f"{path.relative_to(REPO)}:{line}: {statement}"


def test_every_package_is_a_room_of_the_table():
    """A new top-level package must get its row (and its rule) here and in the docs."""
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    package_dir = pyproject.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    assert dict(re.findall(r'^"(asyppo\.\w+)" = "(\w+)"$', package_dir, re.M)) == {
        f"asyppo.{room}": room for room in ROOMS
    }


def docs_table() -> dict[str, tuple[str, ...] | str]:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Rooms", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    table: dict[str, tuple[str, ...] | str] = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        room = cells[0].strip("`").rstrip("/")
        allowed = cells[-1]
        table[room] = EVERYTHING if allowed == EVERYTHING else tuple(
            name for name in re.findall(r"`(\w+)`", allowed) if name != room
        )
    return table


def test_the_docs_table_is_this_table():
    table = docs_table()
    assert list(table) == list(ROOMS), "docs/architecture.md's Rooms table lists other rooms, or in another order"
    for room, allowed in ROOMS.items():
        documented = table[room]
        if allowed == EVERYTHING or documented == EVERYTHING:
            assert documented == allowed, f"{room}/: the docs say {documented!r}, the rule is {allowed!r}"
        else:
            assert set(documented) == set(allowed), f"{room}/: the docs say {documented}, the rule is {allowed}"


@pytest.mark.parametrize("room", [room for room, allowed in ROOMS.items() if allowed != EVERYTHING])
def test_a_room_imports_only_the_rooms_its_row_names(room):
    allowed = ROOMS[room]
    paths = modules(room)
    assert paths, f"no modules under {room}/"
    offending = [
        f"{where(path, line, statement)}  (imports {module}; {room}/ may import "
        f"{', '.join(f'asyppo.{name}' for name in (room, *allowed))})"
        for path in paths
        for line, module, statement in sorted(imports(path))
        if (other := project_room(module)) is not None and other != room and other not in allowed
    ]
    assert not offending, f"{room}/ imports rooms its row in the Rooms table does not allow:\n" + "\n".join(offending)


@pytest.mark.parametrize("room", list(FORBIDDEN_LIBRARIES))
def test_forbidden_libraries_are_not_imported(room):
    forbidden = FORBIDDEN_LIBRARIES[room]
    offending = [
        f"{where(path, line, statement)}  (imports {module})"
        for path in modules(room)
        for line, module, statement in sorted(imports(path))
        if module.split(".")[0] in forbidden
    ]
    assert not offending, f"{room}/ must not import {', '.join(forbidden)}:\n" + "\n".join(offending)


def test_the_table_keeps_the_layers():
    """The table read back as the layering's rules, bottom to top, so that an edit of the table that breaks a layer
    fails here: core imports no other room; tasks and weight_sync only core; common no role and not the cluster;
    a role only the rooms below the roles (no other role, not the cluster)."""
    below_roles = {"core", "tasks", "weight_sync", "common"}
    assert ROOMS["core"] == ()
    assert set(ROOMS["tasks"]) <= {"core"} and set(ROOMS["weight_sync"]) <= {"core"}
    assert not set(ROOMS["common"]) & {*ROLES, "cluster"}
    for role in ROLES:
        assert set(ROOMS[role]) <= below_roles, f"{role}/ may import another role or the cluster"
    assert set(FORBIDDEN_LIBRARIES["core"]) == {"ray", "deepspeed", "vllm"}
    assert all("ray" in FORBIDDEN_LIBRARIES[role] for role in ROLES)


def test_no_test_module_imports_another_test_module():
    """Shared builders live in tests/helpers.py (and tests/conftest.py, faults.py, reference_run.py)."""
    offending = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        for line, module, statement in imports(path):
            if any(part.startswith("test_") for part in module.split(".")):
                offending.append(where(path, line, statement))
    assert not offending, "test modules import other test modules:\n" + "\n".join(offending)
