"""The code of README.md and of the documentation pages, run as a user would copy it.

The pages are README.md, every ``docs/**/*.md`` (the Sphinx site) and the files those pages
``{include}`` (benchmarks/README.md, CHANGELOG.md). Their ``>>>`` blocks are doctests, which
pytest collects (``--doctest-glob=*.md`` over README.md and docs/ in pyproject.toml); every
other ``python`` block is a whole script, run here in a fresh interpreter (so that blocks asking
JAX for 8 CPU devices can) that must finish without error. ``bash`` blocks are commands to read
(training runs belong there); any other fenced block must be ``text`` or a MyST directive, so
that no code can hide from these tests in a block of another language.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# An opening fence (any indentation, 3+ backticks, an info string) up to its closing fence.
FENCE = re.compile(r"^[ \t]*(`{3,})([^`\n]*)\n(.*?)^[ \t]*\1[ \t]*$", re.MULTILINE | re.DOTALL)
INCLUDE = re.compile(r"^```\{include\}[ \t]+(\S+)", re.MULTILINE)
NOT_RUN = {"bash", "text"}


def _pages() -> list[Path]:
    pages = [ROOT / "README.md"]
    if DOCS.is_dir():  # the sdist carries README.md but not the docs
        built = DOCS / "_build"
        pages += sorted(p for p in DOCS.rglob("*.md") if built not in p.parents)
    included = {
        (page.parent / target).resolve()
        for page in pages
        for target in INCLUDE.findall(page.read_text())
    }
    return pages + sorted(included - set(pages))


def _blocks(page: Path) -> list[tuple[int, str, str]]:
    """(line, language, body) of each fenced block of ``page``."""
    text = page.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(2).strip(), m.group(3))
        for m in FENCE.finditer(text)
    ]


PAGES = _pages()
SCRIPTS = [
    (f"{page.relative_to(ROOT)}:{line}", body)
    for page in PAGES
    for line, language, body in _blocks(page)
    if language == "python" and not body.lstrip().startswith(">>>")
]


def test_pages_found():
    names = {str(p.relative_to(ROOT)) for p in PAGES}
    assert "README.md" in names
    if DOCS.is_dir():
        assert {"docs/index.md", "docs/api.md", "benchmarks/README.md"} <= names


@pytest.mark.skipif(not DOCS.is_dir(), reason="the sdist carries no docs/")
def test_pages_have_script_blocks():
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_block_is_run_or_marked_not_run(page):
    for line, language, body in _blocks(page):
        runnable = language == "python" or language.startswith("{") or language in NOT_RUN
        assert runnable, (
            f"{page.relative_to(ROOT)}:{line}: a fenced block in {language or 'no language'!r}"
            f" is never run; use python (run by the tests), bash or text"
        )
        if ">>>" in body and language == "python":
            # pytest's --doctest-glob reaches README.md and docs/ only (pyproject testpaths)
            assert page == ROOT / "README.md" or DOCS in page.parents, (
                f"{page.relative_to(ROOT)}:{line}: a doctest outside README.md and docs/ "
                "is not collected by pytest"
            )


@pytest.mark.skipif(not DOCS.is_dir(), reason="the sdist carries no docs/")
def test_doctests_of_the_pages_are_collected():
    pages_with_doctests = [
        p for p in PAGES if any(">>>" in body for _, lang, body in _blocks(p) if lang == "python")
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "README.md", "docs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in pages_with_doctests:
        assert f"{page.relative_to(ROOT)}::" in result.stdout, (page, result.stdout)


@pytest.mark.parametrize("index", range(len(SCRIPTS)), ids=[where for where, _ in SCRIPTS])
def test_readme_script_block_runs(index, tmp_path):
    where, script = SCRIPTS[index]
    # PYTHONPATH: benchmarks/README.md's example imports benchmarks.cases from the repository
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{where} failed:\n{script}\n{result.stderr}"
