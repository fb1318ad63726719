"""The package as users install it: one import name (`asyppo`), from a built wheel and from an editable install.

The wheel is built from a copy of the source tree and installed into a scratch virtual environment that sees this
environment's dependencies (torch, vLLM, ...) but not its editable `asyppo`; every module is imported from there,
outside the repository, and `asyppo config` runs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from asyppo.cluster.cli import SUBPACKAGES, stage_package

REPO = Path(__file__).resolve().parents[2]


def run(python, code: str, cwd: Path) -> dict:
    result = subprocess.run([str(python), "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


IMPORT_EVERYTHING = """
    import importlib, importlib.util, json, pkgutil
    modules = []
    for package in %r:
        module = importlib.import_module("asyppo." + package)
        modules += [module.__name__, *(info.name for info in pkgutil.iter_modules(module.__path__, module.__name__ + "."))]
    for name in modules:
        importlib.import_module(name)
    print(json.dumps({
        "modules": modules,
        "where": {name: importlib.import_module(name).__file__ for name in ("asyppo.cluster", "asyppo.core.losses")},
        # Each top-level folder is installed under `asyppo`, never under its own name.
        "generic": [name for name in %r if importlib.util.find_spec(name) is not None],
    }))
""" % (SUBPACKAGES, SUBPACKAGES)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "wandb", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis", "benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(work / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    (built,) = (work / "dist").glob("asyppo-*.whl")
    return built


def test_the_wheel_holds_one_top_level_name_and_every_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"asyppo", wheel.name.split("-py3")[0] + ".dist-info"}
    for folder in SUBPACKAGES:
        for path in (REPO / folder).glob("*.py"):
            assert f"asyppo/{folder}/{path.name}" in names


def test_the_built_wheel_installs_and_imports_as_asyppo(wheel, tmp_path):
    scratch = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(scratch)], check=True, timeout=300)
    python = scratch / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    scratch_site = run(python, "import json, sysconfig; print(json.dumps(sysconfig.get_paths()['purelib']))",
                       tmp_path)
    # Dependencies come from this environment: a path line in a .pth file adds the directory to sys.path without
    # running the .pth files inside it, so this environment's editable `asyppo` stays invisible there.
    (Path(scratch_site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    found = run(python, IMPORT_EVERYTHING, tmp_path)
    assert found["generic"] == [], f"generic top-level names importable: {found['generic']}"
    assert all(path.startswith(scratch_site) for path in found["where"].values()), found["where"]
    expected = {f"asyppo.{folder}.{path.stem}" for folder in SUBPACKAGES for path in (REPO / folder).glob("*.py")
                if path.stem != "__init__"}
    assert expected <= set(found["modules"])

    result = subprocess.run([str(scratch / "bin" / "asyppo"), "config", "preset=grpo"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "estimator: grpo" in result.stdout


def test_the_package_list_matches_pyproject():
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(setuptools["packages"]) == [f"asyppo.{name}" for name in SUBPACKAGES]
    assert setuptools["package-dir"] == {f"asyppo.{name}": name for name in SUBPACKAGES}


def test_the_editable_install_maps_the_top_level_folders(tmp_path):
    found = run(sys.executable, IMPORT_EVERYTHING, tmp_path)
    assert found["generic"] == []
    expected = {f"asyppo.{folder}.{path.stem}" for folder in SUBPACKAGES for path in (REPO / folder).glob("*.py")
                if path.stem != "__init__"}
    assert expected <= set(found["modules"])
    assert found["where"]["asyppo.cluster"] == str(REPO / "cluster" / "__init__.py")
    assert found["where"]["asyppo.core.losses"] == str(REPO / "core" / "losses.py")


def test_the_core_and_the_receiving_side_import_no_ray_and_no_role(tmp_path):
    """The algorithm core imports neither a role nor the cluster layer (nor Ray or DeepSpeed); the weight-sync
    receiver, which runs inside vLLM's processes, imports no Ray."""
    loaded = run(sys.executable, """
        import importlib, json, pkgutil, sys
        import asyppo.core
        for info in pkgutil.iter_modules(asyppo.core.__path__, "asyppo.core."):
            importlib.import_module(info.name)
        core = sorted(sys.modules)
        import asyppo.weight_sync.receiver
        print(json.dumps({"core": core, "receiver": sorted(sys.modules)}))
    """, tmp_path)
    forbidden = ("asyppo.cluster", "asyppo.learner", "asyppo.critics", "asyppo.actors", "asyppo.tasks", "ray",
                 "deepspeed", "vllm")
    assert [name for name in loaded["core"] if name.split(".")[0] in forbidden or name.startswith(forbidden)] == []
    assert [name for name in loaded["receiver"] if name == "ray" or name.startswith("ray.")] == []


def test_a_submitted_job_gets_this_checkout_as_a_regular_asyppo_package(tmp_path):
    """`asyppo submit` ships this code in the job's py_modules; there it wins over an installed `asyppo`."""
    staged = stage_package(tmp_path / "staging")
    result = subprocess.run(
        [sys.executable, "-c", "import json, asyppo.core.losses as m, asyppo.tasks.registry as r; "
                               "print(json.dumps([m.__file__, sorted(r.TASKS)]))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(staged.parent)},
    )
    assert result.returncode == 0, result.stderr
    where, tasks = json.loads(result.stdout)
    from asyppo.tasks.registry import TASKS

    assert where == str(staged / "core" / "losses.py") and tasks == sorted(TASKS)


def test_adding_a_task_as_docs_tasks_md_shows(tmp_path):
    """docs/tasks.md: one new file plus one registration makes a new, valid ``data.task``."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "tasks.md").read_text(), flags=re.S)
    new_file, registration = blocks[0], blocks[1]
    staged = stage_package(tmp_path / "staging")
    (staged / "tasks" / "choice.py").write_text(new_file)
    registry = (staged / "tasks" / "registry.py").read_text()
    old_table = registry[registry.index("TASKS: dict[str, Task] = {"):registry.index("\n\n\ndef load_problems")]
    registry = registry.replace("from asyppo.tasks import arithmetic, chain, math\n", "").replace(old_table, registration)
    (staged / "tasks" / "registry.py").write_text(registry)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import json
        from asyppo.common.config import build_config
        from asyppo.tasks.rewards import RewardFunction
        cfg = build_config(overrides=["data.task=choice", "data.train=/data/choice/train.jsonl",
                                      "data.eval=/data/choice/test.jsonl"])
        reward = RewardFunction(task=cfg.data.task)
        print(json.dumps([reward("Which?", "I pick (B).", "B", {}, response_length=3, truncated=False),
                          reward("Which?", "A, then C", "B", {}, response_length=3, truncated=False)]))
    """)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(staged.parent)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [[1.0, True], [0.0, False]]
