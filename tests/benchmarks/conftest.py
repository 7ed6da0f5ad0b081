"""The benchmark harnesses' tests: every test under this folder is marked ``benchmarks``.

The harnesses are the repository's ``benchmarks`` package (not part of the installed jxent):
pytest puts this folder, not the repository root, on ``sys.path`` when it is started as
``pytest`` rather than ``python -m pytest``, so the root is put there for the imports.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from collections.abc import Callable
from types import ModuleType

import pytest

_HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = _HERE.parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A conftest's hook sees every collected item, not only this folder's.
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.benchmarks)


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], ModuleType]:
    """Imports ``benchmarks/<script>`` as its command line would run it."""

    def load(script: str) -> ModuleType:
        name = f"jxent_benchmarks_{pathlib.Path(script).stem}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / script)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up by name.
        spec.loader.exec_module(module)
        return module

    return load


# A stand-in for the library tests, as the accelerator check selects them (by marker): what
# each test does is what its name says, so the expected outcomes can be read off.
FAKE_LIBRARY_TESTS = """
import pytest


@pytest.mark.library
@pytest.mark.numerics
def test_half_precision_accumulates_in_float32():
    pass


@pytest.mark.library
@pytest.mark.numerics
@pytest.mark.parametrize("n", [1, 2])
def test_passes_for_1_fails_for_2(n):
    assert n == 1


@pytest.mark.library
@pytest.mark.numerics
def test_skips():
    pytest.skip("nothing to compare with")


@pytest.mark.library
@pytest.mark.numerics
class TestGroup:
    @pytest.fixture
    def broken(self):
        raise RuntimeError("set-up broke")

    def test_passes(self):
        pass

    def test_errors_in_setup(self, broken):
        pass


@pytest.mark.library
@pytest.mark.sharding
def test_sharding_not_selected():
    raise AssertionError("a sharding test must not be selected")


@pytest.mark.library
@pytest.mark.numerics
@pytest.mark.slow
def test_slow_not_selected():
    raise AssertionError("a slow test must not be selected")


def test_unmarked_not_selected():
    raise AssertionError("an unmarked test must not be selected")
"""


@pytest.fixture
def fake_tests(tmp_path: pathlib.Path) -> pathlib.Path:
    """A tests root holding FAKE_LIBRARY_TESTS as test_fake_library.py."""
    root = tmp_path / "fake_tests"
    root.mkdir()
    (root / "test_fake_library.py").write_text(FAKE_LIBRARY_TESTS)
    return root
