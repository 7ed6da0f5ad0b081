"""The experiments' tests: every test in this folder carries the ``experiments`` marker.

They import ``experiments.`` from the repository root, which pyproject.toml's pytest
``pythonpath`` setting puts on the path; the tests' own subprocesses get it on ``PYTHONPATH``.
Deselect them with ``-m "not experiments"``.
"""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A conftest's hook sees every collected item, not only this folder's.
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.experiments)
