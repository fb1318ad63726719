"""Every random seed of a job comes from one function, ``asyppo.core.seeds.derive_seed`` (docs/architecture.md,
"Seeds"): its properties, checked against an independent computation, and a scan of the library for any other way
of seeding a draw."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyppo.core.seeds import PURPOSES, derive_seed

REPO = Path(__file__).resolve().parents[2]
LIBRARY = ("actors", "cluster", "common", "core", "critics", "learner", "tasks", "weight_sync")

# The built-in tasks' problem sets and bootstrapped models are built from trainer.seed as part of the task's
# definition, not drawn during training (core/seeds.py's docstring: "not training draws: they are the task
# itself ... like a dataset file that the job reads"). problems.py also holds the PromptSampler, whose seed the
# driver derives ("prompt-order"; checked below where the sampler is made).
TASK_BUILDERS = (
    "tasks/tiny_models.py", "tasks/chain.py", "tasks/arithmetic.py", "tasks/word_problems.py", "tasks/problems.py",
)


# ---- (a) the function -------------------------------------------------------------------------------------------


def independent(seed: int, purpose: str, *keys: int, bits: int = 31) -> int:
    entropy = [seed, PURPOSES.index(purpose), len(keys), *keys]
    word = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return int(word) >> (64 - bits)


def test_the_same_inputs_give_the_same_seed():
    assert derive_seed(7, "rollout", 3, 0) == derive_seed(7, "rollout", 3, 0)
    assert derive_seed(7, "sample", 2, bits=62) == derive_seed(7, "sample", 2, bits=62)


def test_purpose_step_key_and_seed_each_change_the_seed():
    base = derive_seed(7, "mini-batches", 3)
    assert derive_seed(7, "mask-ties", 3) != base  # purpose
    assert derive_seed(7, "mini-batches", 4) != base  # step
    assert derive_seed(8, "mini-batches", 3) != base  # the job's seed
    assert derive_seed(7, "critic-shuffle", 3, 0) != derive_seed(7, "critic-shuffle", 3, 1)  # a key
    # Every purpose draws its own stream from the same (seed, step).
    assert len({derive_seed(7, purpose, 3) for purpose in PURPOSES}) == len(PURPOSES)
    # Steps and keys do not collide over a run's worth of them.
    assert len({derive_seed(0, "rollout", step, r) for step in range(200) for r in range(5)}) == 1000


def test_a_trailing_zero_key_is_a_key():
    """SeedSequence pads its entropy with zeros; the key count in the entropy keeps a trailing 0 from aliasing."""
    assert derive_seed(7, "rollout", 3, 0) != derive_seed(7, "rollout", 3)
    assert derive_seed(0, "prompt-order") != derive_seed(0, "prompt-order", 0)


def test_inputs_of_2_to_the_32_or_more_are_refused_rather_than_aliased():
    """SeedSequence splits a larger input into several 32-bit words: (2**32, p) would be the entropy of (0, 1, p)."""
    for call in (lambda: derive_seed(2**32, "prompt-order"), lambda: derive_seed(5, "rollout", 2**32)):
        with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
            call()
    assert derive_seed(2**32 - 1, "rollout", 2**32 - 1) >= 0


@given(
    seed=st.integers(0, 2**32 - 1),
    purpose=st.sampled_from(PURPOSES),
    keys=st.lists(st.integers(0, 2**32 - 1), max_size=3),
    bits=st.integers(1, 64),
)
def test_the_seed_is_seed_sequence_of_seed_purpose_and_keys(seed, purpose, keys, bits):
    value = derive_seed(seed, purpose, *keys, bits=bits)
    assert value == independent(seed, purpose, *keys, bits=bits)
    assert 0 <= value < 2**bits
    assert isinstance(value, int)


def test_numpy_integers_are_accepted_and_give_the_same_seed():
    assert derive_seed(np.int64(7), "rollout", np.uint32(3)) == derive_seed(7, "rollout", 3)


@pytest.mark.parametrize("call", [
    lambda: derive_seed(0, "no-such-purpose"),
    lambda: derive_seed(0, "Rollout", 1),
    lambda: derive_seed(-1, "rollout", 1),
    lambda: derive_seed(0, "rollout", -1),
    lambda: derive_seed(0, "rollout", 1, -5),
    lambda: derive_seed(0, "rollout", 1.0),
    lambda: derive_seed(0, "rollout", bits=0),
    lambda: derive_seed(0, "rollout", bits=65),
])
def test_unknown_purposes_and_negative_or_non_integer_inputs_are_refused(call):
    with pytest.raises(ValueError):
        call()


# ---- (b) the one source -----------------------------------------------------------------------------------------


def library_files(exclude=TASK_BUILDERS) -> list[Path]:
    return [path for folder in LIBRARY for path in sorted((REPO / folder).rglob("*.py"))
            if str(path.relative_to(REPO)) not in exclude]


def code_lines(path: Path) -> list[tuple[int, str]]:
    """The file's lines with comments and docstrings blanked (other strings, f-strings included, are kept)."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            lines[row - 1] = lines[row - 1][:col]
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            for row in range(body[0].lineno, body[0].end_lineno + 1):
                lines[row - 1] = ""
    return list(enumerate(lines, start=1))


def where(path: Path, line: int, text: str) -> str:
    return f"{path.relative_to(REPO)}:{line}: {text.strip()}"


# What may not appear outside core/seeds.py (and the task builders): arithmetic on a seed, other ways to make a
# seed or a generator, and the seeds that the old code used.
STRAY = {
    "arithmetic on a seed": re.compile(r"seed\w*\s*(?:[+*^%]|-(?!>))|(?:[+*^%]|(?<!-)-)\s*\w*seed\b"),
    "SeedSequence outside core/seeds.py": re.compile(r"SeedSequence"),
    "EVAL_SEED": re.compile(r"EVAL_SEED"),
    "a stdlib or NumPy RNG": re.compile(r"\b(?:np\.|numpy\.)?random\.\w+\("),
    "transformers' set_seed": re.compile(r"\bset_seed\("),
}


def test_no_library_module_makes_a_seed_by_hand():
    offending = [
        f"{where(path, line, text)}  ({what})"
        for path in library_files(exclude=(*TASK_BUILDERS, "core/seeds.py"))
        for line, text in code_lines(path)
        for what, pattern in STRAY.items()
        if pattern.search(text)
    ]
    assert not offending, "seeds made outside asyppo.core.seeds.derive_seed:\n" + "\n".join(offending)


def calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)) == name:
                yield node


def is_derive_seed(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "derive_seed"


def parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def test_every_manual_seed_takes_a_derived_seed():
    """``manual_seed(derive_seed(...))``; in core/ (which never sees trainer.seed) a seed that the function
    receives as a parameter, and then every caller outside core/ passes that parameter ``derive_seed(...)``."""
    offending, core_parameters = [], set()
    for path in library_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        up = parents(tree)
        for call in calls(tree, "manual_seed"):
            argument = call.args[0] if call.args else None
            if is_derive_seed(argument):
                continue
            if path.relative_to(REPO).parts[0] == "core" and isinstance(argument, ast.Name):
                scope = call
                while scope in up and not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    scope = up[scope]
                if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)) and argument.id in {
                    a.arg for a in (*scope.args.posonlyargs, *scope.args.args, *scope.args.kwonlyargs)
                }:
                    core_parameters.add(argument.id)
                    continue
            offending.append(f"{where(path, call.lineno, ast.unparse(call))}  (not derive_seed(...))")
    assert not offending, "manual_seed with a seed not from derive_seed:\n" + "\n".join(offending)

    passed = []
    for path in library_files():
        if path.relative_to(REPO).parts[0] == "core":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg in core_parameters:
                        passed.append(keyword.arg)
                        if not is_derive_seed(keyword.value):
                            offending.append(f"{where(path, node.lineno, ast.unparse(keyword))}  (not derive_seed)")
    assert not offending, "core/ receives a seed not from derive_seed:\n" + "\n".join(offending)
    assert set(passed) == core_parameters, f"no caller outside core/ passes {core_parameters - set(passed)}"


def test_every_torch_draw_uses_its_own_generator():
    """A draw from torch's global generator would depend on everything drawn before it in the process, which a
    resumed run does not repeat."""
    offending = []
    for path in library_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name in ("randperm", "rand", "randn", "randint", "multinomial", "bernoulli", "normal", "rand_like",
                     "randn_like", "randint_like"):
            for call in calls(tree, name):
                if not any(keyword.arg == "generator" for keyword in call.keywords):
                    offending.append(where(path, call.lineno, ast.unparse(call)))
    assert not offending, "torch draws from the global generator:\n" + "\n".join(offending)


def test_the_prompt_sampler_is_seeded_by_derive_seed():
    made = []
    for path in library_files():
        for call in calls(ast.parse(path.read_text(encoding="utf-8")), "PromptSampler"):
            made.append(path)
            seed = next((keyword.value for keyword in call.keywords if keyword.arg == "seed"), None)
            assert is_derive_seed(seed), where(path, call.lineno, ast.unparse(call))
    assert made, "the driver makes no PromptSampler"


# ---- the docs keep their word -----------------------------------------------------------------------------------


def docs_purposes() -> dict[str, list[str]]:
    """docs/architecture.md's "Seeds" table: purpose -> its keys."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("\n## Seeds\n", 1)[1].split("\n## ", 1)[0]
    table = {}
    for row in section.splitlines():
        if row.startswith("| `"):
            cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
            table[cells[0].strip("`")] = [] if cells[1] == "—" else [key.strip() for key in cells[1].split(",")]
    return table


def derive_seed_calls() -> list[tuple[Path, ast.Call, str]]:
    """Every ``derive_seed(seed, "purpose", *keys)`` in the library, with its literal purpose."""
    found = []
    for path in library_files(exclude=("core/seeds.py",)):
        for call in calls(ast.parse(path.read_text(encoding="utf-8")), "derive_seed"):
            purpose = call.args[1] if len(call.args) > 1 else None
            assert isinstance(purpose, ast.Constant) and isinstance(purpose.value, str), (
                f"{where(path, call.lineno, ast.unparse(call))}: the purpose must be a literal")
            found.append((path, call, purpose.value))
    return found


def test_the_docs_list_every_purpose_with_its_keys():
    assert list(docs_purposes()) == list(PURPOSES), "docs/architecture.md's Seeds table and core/seeds.PURPOSES"


def test_every_draw_has_the_keys_the_docs_give_it_and_a_draw_of_a_step_is_keyed_by_the_step():
    documented = docs_purposes()
    used = set()
    problems = []
    for path, call, purpose in derive_seed_calls():
        used.add(purpose)
        text = where(path, call.lineno, ast.unparse(call))
        if purpose not in documented:
            problems.append(f"{text}  (purpose not in the docs' table / PURPOSES)")
            continue
        keys = call.args[2:]
        if len(keys) != len(documented[purpose]):
            problems.append(f"{text}  (the docs give {purpose!r} the keys {documented[purpose]})")
        elif documented[purpose][:1] == ["step"] and "step" not in ast.unparse(keys[0]):
            problems.append(f"{text}  (the docs key {purpose!r} by the step first)")
    assert not problems, "draws that do not match docs/architecture.md's Seeds table:\n" + "\n".join(problems)
    assert used == set(PURPOSES), f"purposes no module draws: {set(PURPOSES) - used}"
