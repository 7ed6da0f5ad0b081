"""The layout of experiments/ (see experiments/README.md): one package, one import rule, one
shape of example folder, entry scripts that run from anywhere."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
ENTRY_SCRIPTS = ("mnist_mlp.py", "mnist_lenet5.py", "five_clusters.py", "brown_lm.py")
EXAMPLES = ("mnist", "brown", "clusters")
EXAMPLE_FILES = (
    "__init__.py",
    "README.md",
    "main.py",
    "configs.py",
    "models.py",
    "input_pipeline.py",
    "train.py",
)
MODULES = sorted(EXPERIMENTS.rglob("*.py"))
PACKAGE_MODULES = [p for p in MODULES if not (p.parent == EXPERIMENTS and p.name in ENTRY_SCRIPTS)]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Every name a bare import of a module of the tree would use (``import loop``, ``from data ...``).
OWN_NAMES = {p.stem for p in MODULES} | {p.name for p in EXPERIMENTS.rglob("*") if p.is_dir()}
OWN_NAMES -= {"__init__", "__pycache__"}


def imported_names(tree: ast.AST) -> list[tuple[int, str, int]]:
    """``(line, top-level module name, relative level)`` of every import in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0], 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, (node.module or "").split(".")[0], node.level))
    return found


def touches_sys_path(tree: ast.AST) -> bool:
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
        for node in ast.walk(tree)
    )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_import_of_the_tree_is_absolute(path):
    tree = ast.parse(path.read_text())
    for line, name, level in imported_names(tree):
        where = f"{path.relative_to(ROOT)}:{line}"
        assert level == 0, f"{where}: a relative import; expected `from experiments.… import`"
        assert name not in OWN_NAMES, (
            f"{where}: `{name}` imported by its bare name; expected an `experiments.…` path"
        )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_only_the_entry_scripts_touch_sys_path(path):
    is_entry = path.parent == EXPERIMENTS and path.name in ENTRY_SCRIPTS
    assert touches_sys_path(ast.parse(path.read_text())) == is_entry, (
        f"{path.relative_to(ROOT)}: only the entry scripts {ENTRY_SCRIPTS} may edit sys.path"
    )


def test_entry_scripts_share_one_bootstrap():
    def bootstrap(script: str) -> list[str]:
        lines = (EXPERIMENTS / script).read_text().splitlines()
        return [line for line in lines if line.startswith(("import ", "from ", "sys.path"))][:3]

    first = bootstrap(ENTRY_SCRIPTS[0])
    assert any(line.startswith("sys.path") for line in first), first
    for script in ENTRY_SCRIPTS[1:]:
        assert bootstrap(script) == first, script


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_folder_has_the_same_files(example):
    missing = [name for name in EXAMPLE_FILES if not (EXPERIMENTS / example / name).is_file()]
    assert not missing, f"experiments/{example}/ lacks {missing}"


@pytest.mark.parametrize("path", PACKAGE_MODULES, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_module_imports(path):
    # The entry scripts run as scripts: test_entry_script_runs_from_any_directory.
    importlib.import_module(module_name(path))


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_entry_script_runs_from_any_directory(script, tmp_path):
    """``python experiments/<script> --help`` from elsewhere, without PYTHONPATH: the
    bootstrap alone finds ``experiments`` (and a plain checkout's jxent)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / script), "--help"],
        cwd=tmp_path,
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"usage: {script}"), done.stdout[:300]
