"""jxent's import-time check of the JAX it runs on (jxent/_jax_version.py): an older JAX
gets an ImportError naming what it lacks and the floor, not an AttributeError mid-loss."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import jax
import pytest

from jxent import _jax_version


def fake_jax(version: str, *, without: str) -> types.SimpleNamespace:
    """A stand-in for the jax module with every API of ``REQUIRED`` but ``without``."""
    module = types.SimpleNamespace(__version__=version)
    for path in _jax_version.REQUIRED:
        if path == without:
            continue
        owner = module
        *parents, leaf = path.split(".")
        for name in parents:
            if not hasattr(owner, name):
                setattr(owner, name, types.SimpleNamespace())
            owner = getattr(owner, name)
        setattr(owner, leaf, object())
    return module


def test_the_installed_jax_has_everything_jxent_needs():
    assert _jax_version.missing_features(jax) == []
    _jax_version.require_supported_jax(jax)


@pytest.mark.parametrize("lacking", sorted(_jax_version.REQUIRED))
def test_an_older_jax_is_refused_naming_the_missing_api_and_the_floor(lacking):
    old = fake_jax("0.7.0", without=lacking)
    since = _jax_version.REQUIRED[lacking]
    with pytest.raises(ImportError) as error:
        _jax_version.require_supported_jax(old)
    message = str(error.value)
    assert f"jax.{lacking} (JAX {since})" in message
    assert "jxent needs JAX >= 0.8.2" in message and "jax 0.7.0" in message
    assert "pip install -U 'jax>=0.8.2'" in message


def test_import_jxent_fails_with_that_message_under_an_old_jax():
    code = "import jax.lax; del jax.lax.pcast; import jxent"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "ImportError: jxent needs JAX >= 0.8.2" in done.stderr, done.stderr
    assert "jax.lax.pcast (JAX 0.8.2)" in done.stderr, done.stderr


def test_the_floor_matches_pyproject():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    floor = _jax_version.MIN_JAX
    assert f'dependencies = ["jax>={floor}", "jaxlib>={floor}"]' in pyproject
