"""Marks every test under tests/library with ``library`` (the library's own suite, which
``tools/compat.py`` runs under each supported Python and JAX; select it with ``-m library``).

The 8 host CPU devices and the hypothesis profile are set in tests/conftest.py, which also
serves the tests outside this folder.
"""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Called with every collected item, not only this folder's: filter by path.
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.library)
