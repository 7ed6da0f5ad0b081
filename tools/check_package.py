"""Builds jxent's wheel and sdist and checks what a user installing them gets.

Run by ``make test`` (``make package-check``); about 30 s, offline. Checks:

* the wheel holds ``jxent/py.typed`` and the licence; the sdist holds the licence,
  ``py.typed`` and the library's tests (every file of tests/library) with their references
  and conftests, and not the tests that need the repository's ``experiments/``,
  ``benchmarks/`` or ``tools/`` (``tests/experiments/``, ...);
* the wheel installs (``--no-deps --no-index``) into a fresh virtual environment, where
  ``import jxent`` finds the installed copy (JAX comes from this environment's
  site-packages on ``PYTHONPATH``) and computes;
* a type checker sees the installed package as typed: mypy, run for that environment,
  reports a bad ``reduction`` without "missing library stubs or py.typed marker";
* the unpacked sdist's tests are collected by pytest (every test module imports).

Usage: ``python tools/check_package.py`` from the repository root, with the project's
virtual environment (it needs ``build``, ``mypy`` and ``pytest``).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDIST_MUST_HOLD = (
    "LICENSE",
    "jxent/py.typed",
    "tests/conftest.py",
    "tests/library/conftest.py",
    "tests/library/reference.py",
)
# Tests of folders outside the package (MANIFEST.in leaves them out): they could not import.
SDIST_MUST_NOT_HOLD = (
    "tests/experiments/",
    "tests/benchmarks/",
    "tests/test_check_package.py",
)
USER_SCRIPT = """\
import jxent

jxent.softmax([1.0, 2.0], axis=-1)
jxent.softmax_cross_entropy([[0.0, 1.0]], [[1.0, 0.0]], reduction="avg")
"""


def run(*args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0 and args[1:3] != ("-m", "mypy"):
        sys.exit(f"FAILED: {' '.join(map(str, args))}\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def build(out: Path) -> tuple[Path, Path]:
    # No isolation: the pinned setuptools of requirements.lock builds, nothing is fetched.
    run(sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "-o", out)
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return wheel, sdist


def check_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "jxent/py.typed" in names, f"{wheel.name} lacks jxent/py.typed: {names}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), (
        f"{wheel.name} lacks the licence: {names}"
    )


def check_sdist_contents(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    library_tests = [str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "library").glob("*.py")]
    missing = [n for n in (*SDIST_MUST_HOLD, *sorted(library_tests)) if n not in names]
    assert not missing, f"{sdist.name} lacks {missing}"
    extra = sorted(n for n in names if n.startswith(SDIST_MUST_NOT_HOLD))
    assert not extra, f"{sdist.name} holds {extra}, which need folders outside the package"


def install_into_fresh_venv(wheel: Path, where: Path) -> Path:
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel)
    return python


def check_import(python: Path, where: Path) -> None:
    # JAX from the project's environment; jxent must come from the fresh one (the project's
    # editable install is a .pth import hook, which PYTHONPATH entries do not run).
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin"}
    code = (
        "import jxent; print(jxent.__file__); "
        "print(float(jxent.logsumexp(jxent.softmax([0.0, 0.0]))))"
    )
    out = run(python, "-c", code, cwd=where, env=env).split()  # not the repository root
    assert out[0].startswith(str(where)), f"imported {out[0]}, not the installed wheel"
    assert abs(float(out[1]) - 1.1931472) < 1e-6, out


def check_typed(python: Path, work: Path) -> None:
    script = work / "user.py"
    script.write_text(USER_SCRIPT)
    report = run(
        sys.executable,
        "-m",
        "mypy",
        "--python-executable",
        python,
        "--cache-dir",
        work / "mypy_cache",
        script,
        cwd=work,
    )
    assert "py.typed" not in report and "import-untyped" not in report, report
    assert 'Argument "reduction" to "softmax_cross_entropy"' in report, report
    assert report.count("error:") == 1, report


def extract_safely(archive: Path, dest: Path) -> None:
    """Unpacks ``archive`` into ``dest``, refusing members that would land outside it.

    Uses tarfile's ``"data"`` filter where the interpreter has it (Python 3.12, and 3.11.4 /
    3.10.12 onwards); Debian 12's stock Python 3.11.2 lacks it, so there every member is
    checked first by :func:`check_member_stays_inside`.
    """
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
            return
        root = dest.resolve()
        for member in tar.getmembers():
            check_member_stays_inside(member, root)
        tar.extractall(dest)  # every member checked above


def check_member_stays_inside(member: tarfile.TarInfo, root: Path) -> None:
    """Raises ``ValueError`` for a member that could write outside ``root``: an absolute or
    ``..`` path or link target (a relative path without ``..`` only ever reaches below its
    folder, even through other such links), or a device or FIFO."""

    def escapes(path: str) -> bool:
        return Path(path).is_absolute() or ".." in Path(path).parts

    if escapes(member.name):
        raise ValueError(f"archive member {member.name!r} would be written outside {root}")
    if (member.issym() or member.islnk()) and escapes(member.linkname):
        raise ValueError(
            f"archive member {member.name!r} links to {member.linkname!r}, outside {root}"
        )
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise ValueError(f"archive member {member.name!r} is a device or FIFO; expected files")


def check_sdist_tests_collect(sdist: Path, work: Path) -> None:
    extract_safely(sdist, work)
    (unpacked,) = work.glob("jxent-*")
    out = run(sys.executable, "-m", "pytest", "--collect-only", "-q", "tests", cwd=unpacked)
    assert "error" not in out.lower().split("collected")[-1], out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="jxent-package-") as tmp:
        work = Path(tmp)
        wheel, sdist = build(work / "dist")
        check_wheel_contents(wheel)
        check_sdist_contents(sdist)
        python = install_into_fresh_venv(wheel, work / "venv")
        check_import(python, work / "venv")
        check_typed(python, work)
        check_sdist_tests_collect(sdist, work / "sdist")
    print(f"package check passed: {wheel.name}, {sdist.name}")


if __name__ == "__main__":
    main()
