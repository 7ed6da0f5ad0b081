"""Runs jxent's library test suite under each supported Python and JAX (``make compat``).

Each environment is a virtual environment under ``.compat/<name>/``, created once and reused
while its inputs are unchanged (a stamp file holds their hash, as the Makefile's
``.venv/.installed`` does). jxent is installed editable from this checkout; the tests run from
the repository root. Environments (see docs/compatibility.md):

* ``floor-py3.11``: Debian 12's stock Python 3.11.2 with ``requirements-floor.lock`` (JAX at
  the floor declared in pyproject.toml);
* ``lock-py3.11``: the same Python with the library-test packages at ``requirements.lock``'s
  versions;
* ``lock-py3.13`` and ``floor-py3.13``: pyenv's Python 3.13.0 with either set.

``--ci`` (``make compat-ci``, part of ``make test``) runs ``floor-py3.11`` and
``lock-py3.13``: the JAX floor and a Python other than the main environment's; the Makefile
passes ``-m "not slow"`` there, so the slow-marked tests run at the lock only, in CI's time.

Usage: ``python tools/compat.py [--ci] [--env NAME ...] [--workers N] [PYTEST_ARGS...]``;
exits non-zero if any environment fails to install or has a failing test.
Interpreters can be moved with ``JXENT_PY311`` and ``JXENT_PY313``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / ".compat"

# The library's own tests: everything under tests/library (its conftest marks them
# ``library``), plus the docstring examples in jxent/ (--doctest-modules in pyproject.toml).
# The tests left in tests/ (experiments, data, benchmarks, README, packaging, accelerator
# compiles, multi-process) need the repository's other folders and run at the lock only.
LIBRARY_DIR = ROOT / "tests" / "library"


def library_test_files() -> list[str]:
    """The library's test files, by name (the choices of ``--only``)."""
    return sorted(p.name for p in LIBRARY_DIR.glob("test_*.py"))


# What the library tests import (optax and scipy as references, flatbuffers for jax.export,
# mypy for test_typed_api); setuptools builds the editable install without network access.
LIBRARY_TEST_PACKAGES = (
    "jax",
    "jaxlib",
    "numpy",
    "scipy",
    "optax",
    "hypothesis",
    "pytest",
    "pytest-xdist",
    "mypy",
    "flatbuffers",
    "setuptools",
)
AT_LOCK = ("-c", "requirements.lock", *LIBRARY_TEST_PACKAGES)
AT_FLOOR = ("-r", "requirements-floor.lock")
PY311 = os.environ.get("JXENT_PY311", "/usr/bin/python3")  # Debian 12's stock 3.11.2
PY313 = os.environ.get("JXENT_PY313", "/root/.pyenv/versions/3.13.0/bin/python")


@dataclass(frozen=True)
class Env:
    name: str
    python: str
    requirements: tuple[str, ...]  # pip install arguments, relative to the repository root

    @property
    def folder(self) -> Path:
        return HOME / self.name

    @property
    def bin(self) -> Path:
        return self.folder / "bin"


ENVS = {
    env.name: env
    for env in (
        Env("floor-py3.11", PY311, AT_FLOOR),
        Env("lock-py3.11", PY311, AT_LOCK),
        Env("lock-py3.13", PY313, AT_LOCK),
        Env("floor-py3.13", PY313, AT_FLOOR),
    )
}
CI_ENVS = ("floor-py3.11", "lock-py3.13")


@dataclass
class Result:
    env: Env
    python: str = "?"
    jax: str = "?"
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.note and self.failed == 0 and self.passed > 0


def input_hash(env: Env) -> str:
    """What the environment was built from: the interpreter and the pip arguments, with the
    files they name. Not pyproject.toml: jxent is installed editable without dependencies, so
    its changes need no rebuild (``rm -r .compat/<name>`` forces one)."""
    digest = hashlib.sha256(f"{env.python}\n{env.requirements}".encode())
    for name in (a for a in env.requirements if (ROOT / a).is_file()):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_env(env: Env) -> None:
    """Creates ``env`` unless its stamp matches its inputs; raises CalledProcessError if pip
    fails (the stamp is written last, so a half-built environment is rebuilt next time)."""
    stamp = env.folder / ".installed"
    wanted = input_hash(env)
    if stamp.is_file() and stamp.read_text() == wanted:
        return
    if not Path(env.python).is_file():
        raise FileNotFoundError(
            f"interpreter {env.python} for {env.name} not found; set JXENT_PY311/JXENT_PY313"
        )
    shutil.rmtree(env.folder, ignore_errors=True)
    print(f"[{env.name}] creating {env.folder} with {env.python}", flush=True)
    pip = [str(env.bin / "python"), "-m", "pip", "install", "--quiet"]
    steps = [
        [env.python, "-m", "venv", str(env.folder)],
        [*pip, "--upgrade", "pip"],
        [*pip, *env.requirements],
        # No build isolation: the pinned setuptools builds, nothing more is fetched.
        [*pip, "--no-deps", "--no-build-isolation", "-e", "."],
    ]
    for step in steps:
        subprocess.run(step, cwd=ROOT, check=True)
    stamp.write_text(wanted)


def versions(env: Env) -> tuple[str, str]:
    code = "import platform, jax; print(platform.python_version(), jax.__version__)"
    out = subprocess.run(
        [env.bin / "python", "-c", code], capture_output=True, text=True, check=True
    )
    python, jax = out.stdout.split()
    return python, jax


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_tests(env: Env, workers: int, files: list[str], pytest_args: list[str]) -> Result:
    result = Result(env)
    try:
        ensure_env(env)
        result.python, result.jax = versions(env)
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        result.note = f"set-up failed: {error}"
        return result
    report = env.folder / "junit.xml"
    report.unlink(missing_ok=True)
    command = [
        env.bin / "python",
        "-m",
        "pytest",
        "-q",
        f"--junitxml={report}",
        *(["-n", str(workers)] if workers > 1 else []),
        *files,
        *pytest_args,
    ]
    print(f"[{env.name}] python {result.python}, jax {result.jax}: running", flush=True)
    start, cpu_start = time.perf_counter(), children_cpu_seconds()
    done = subprocess.run(command, cwd=ROOT, check=False)
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = children_cpu_seconds() - cpu_start
    if not report.is_file():
        result.note = f"pytest exited {done.returncode} without a report"
        return result
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    result.failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    result.skipped = skipped
    result.passed = total - result.failed - skipped
    if done.returncode != 0 and result.failed == 0:
        result.note = f"pytest exited {done.returncode}"
    return result


def print_table(results: list[Result]) -> None:
    header = ("environment", "python", "jax", "passed", "failed", "skipped", "wall s", "cpu s")
    rows = [header] + [
        (
            r.env.name,
            r.python,
            r.jax,
            str(r.passed),
            str(r.failed),
            str(r.skipped),
            f"{r.seconds:.0f}",
            f"{r.cpu_seconds:.0f}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print("\ncompatibility (library test suite):")
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    for r in results:
        if r.note:
            print(f"  {r.env.name}: {r.note}")


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help=f"only {', '.join(CI_ENVS)}")
    parser.add_argument("--env", action="append", choices=sorted(ENVS), help="repeatable")
    parser.add_argument("--workers", type=int, default=1, help="pytest-xdist workers")
    parser.add_argument(
        "--only",
        action="append",
        choices=[*library_test_files(), "jxent"],
        help="a file of tests/library, or jxent (the docstring examples); repeatable",
    )
    return parser.parse_known_args()


def main() -> None:
    args, pytest_args = parse_args()
    names = args.env or (CI_ENVS if args.ci else tuple(ENVS))
    # "jxent": the docstring examples (--doctest-modules in pyproject.toml).
    library = str(LIBRARY_DIR.relative_to(ROOT))
    only = args.only or []
    files = [f if f == "jxent" else f"{library}/{f}" for f in only] or [library, "jxent"]
    results = [run_tests(ENVS[name], args.workers, files, pytest_args) for name in names]
    print_table(results)
    passed, failed = sum(r.passed for r in results), sum(r.failed for r in results)
    print(f"compat: {passed} passed, {failed} failed")
    if not all(r.ok for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
