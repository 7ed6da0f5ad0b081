"""The public API as a type checker and ``help()`` see it (issue 10, "A typed, packaged
API"). The wheel and sdist themselves are checked by ``tools/check_package.py``
(``make package-check``)."""

from __future__ import annotations

import inspect
import os
import pydoc
import re
import subprocess
import sys
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import jxent

ROOT = Path(__file__).resolve().parents[2]
# The public functions (``CrossEntropyAux``, the one public class, is a NamedTuple).
PUBLIC = [
    getattr(jxent, name)
    for name in jxent.__all__
    if name != "__version__" and inspect.isfunction(getattr(jxent, name))
]
USER_SCRIPT = """\
import jax.numpy as jnp

import jxent

x = jnp.zeros((2, 3))
lse: jnp.ndarray = jxent.logsumexp(x, axis=-1)
lse2, sign = jxent.logsumexp(x, axis=(0, 1), return_sign=True)
probs = jxent.softmax(x, axis=-1, where=x > 0)
loss = jxent.softmax_cross_entropy(x, probs, reduction="mean")
total = jxent.fused_linear_cross_entropy(x, jnp.ones((3, 4)), jnp.array([0, 1]), reduction="sum")
reveal_type(jxent.logsumexp(x))
reveal_type(jxent.logsumexp(x, return_sign=True))
jxent.softmax_cross_entropy(x, x, reduction="avg")  # BAD-REDUCTION
jxent.softmax(x, bogus=1)  # BAD-KEYWORD
"""


def test_the_namespace_holds_the_public_api_and_nothing_else():
    """``dir(jxent)``'s public names are ``__all__``'s: no module (``jax``) leaks in."""
    public = {name for name in dir(jxent) if not name.startswith("_")}
    assert public == set(jxent.__all__) - {"__version__"}


def test_mypy_reports_bad_calls_and_passes_good_ones(tmp_path):
    """A user's mypy sees jxent's real signatures: a wrong ``reduction`` and an unknown
    keyword are errors, the good calls are not, and ``logsumexp``'s return type follows
    ``return_sign``."""
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    # jxent is found from the repository (mypy cannot follow an editable install's import
    # hook); a cache next to the lint's keeps the analysis of JAX warm between runs.
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    cache = ROOT / ".mypy_cache" / "user-script"
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cache), str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    report = done.stdout + done.stderr
    lines = USER_SCRIPT.splitlines()
    error_lines = sorted(
        int(line.split(":")[1]) for line in report.splitlines() if ": error:" in line
    )
    bad_lines = [i + 1 for i, text in enumerate(lines) if "# BAD-" in text]
    assert error_lines == bad_lines, report
    assert "\"Literal['avg']\"" in report and 'keyword argument "bogus"' in report, report
    assert 'Revealed type is "jax._src.basearray.Array"' in report, report
    assert "tuple[jax._src.basearray.Array, jax._src.basearray.Array]" in report, report


@pytest.mark.parametrize("fn", PUBLIC, ids=lambda f: f.__name__)
def test_signature_is_user_facing(fn):
    """Plain functions (not ``jax.jit`` wrappers) whose annotations name public types:
    ``help()`` shows ``int | tuple[int, ...] | None``, not a private alias."""
    assert inspect.isfunction(fn), type(fn)
    assert fn.__doc__ and fn.__module__.startswith("jxent")
    signature = inspect.signature(fn)
    for name, param in signature.parameters.items():
        assert "c." not in str(param.annotation), (name, param.annotation)
    hints = typing.get_type_hints(fn)  # every annotation resolves
    if "axis" in signature.parameters:
        assert str(signature.parameters["axis"].annotation) == "int | tuple[int, ...] | None"
    if "reduction" in signature.parameters:
        assert typing.get_args(hints["reduction"]) == ("none", "sum", "mean")
    if "axis" in signature.parameters:
        shown = pydoc.render_doc(fn, renderer=pydoc.plaintext)
        assert "axis: 'int | tuple[int, ...] | None'" in shown, shown[:300]


def test_shared_docstring_parts_are_filled_in():
    """Docstring parts written once (jxent._docs) reach help(), Sphinx and the doctests; a
    part's name that does not exist is an error at import, not a "{name}" in the docs."""
    from jxent import _docs

    for fn in PUBLIC:
        assert not re.search(r"^ *\{\w+\}$", fn.__doc__, re.MULTILINE), fn.__name__
    assert "Reverse mode only" in jxent.softmax.__doc__
    assert "axis_name: vocabulary parallelism" in jxent.log_softmax.__doc__

    def documented():
        """Args:
        {no_such_part}
        """

    with pytest.raises(ValueError, match="documented's docstring names 'no_such_part'"):
        _docs.with_parts(documented)


def test_logsumexp_overloads_on_return_sign():
    overloads = typing.get_overloads(jxent.logsumexp)
    returns = [typing.get_type_hints(o)["return"] for o in overloads]
    assert returns[:2] == [jax.Array, tuple[jax.Array, jax.Array]], returns


def test_static_arguments_are_still_cached():
    """The public functions are jitted with their options static: a repeated call reuses
    the compiled function; a new option compiles once more, passed by keyword or position."""
    from jxent import _softmax

    x = jnp.arange(6.0).reshape(2, 3)
    jxent.softmax(x, axis=0)
    before = _softmax.softmax._cache_size()
    jxent.softmax(x, axis=0)
    jxent.softmax(x + 1.0, axis=0)
    assert _softmax.softmax._cache_size() == before
    jxent.softmax(x, axis=(0, 1))
    assert _softmax.softmax._cache_size() == before + 1
    jxent.softmax(x, (0, 1))  # positionally: still static, one more program at most
    assert _softmax.softmax._cache_size() <= before + 2


def test_py_typed_marker_ships():
    assert (ROOT / "jxent" / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'jxent = ["py.typed"]' in pyproject and 'license-files = ["LICENSE"]' in pyproject
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def test_readme_signatures_match_the_code():
    """Every signature in README's API table names parameters that exist, in order."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- api-table-start -->", 1)[1].split("<!-- api-table-end -->", 1)[0]
    for fn in PUBLIC:
        row = next(line for line in table.splitlines() if f"`{fn.__name__}(" in line)
        shown = row.split(f"`{fn.__name__}(", 1)[1].split(")`", 1)[0]
        if shown == "...":
            continue
        names = [p.strip().split("=")[0] for p in shown.split(",")]
        names = [n for n in names if n and n != "*" and n != "..."]
        params = list(inspect.signature(fn).parameters)
        assert all(n in params for n in names), (fn.__name__, names, params)
        assert names == sorted(names, key=params.index), (fn.__name__, names)


def test_cross_entropy_has_the_integer_losss_parameters_with_mean_by_default():
    """``cross_entropy`` takes its parameter list from the integer loss (one definition,
    ``jxent._jit.same_parameters``), only ``reduction`` defaulting to ``"mean"``."""
    from jxent._jit import same_parameters

    mine = inspect.signature(jxent.cross_entropy).parameters
    theirs = inspect.signature(jxent.softmax_cross_entropy_with_integer_labels).parameters
    assert list(mine) == list(theirs)
    assert mine["reduction"].default == "mean" and theirs["reduction"].default == "none"
    assert all(mine[n] == theirs[n] for n in theirs if n != "reduction")
    with pytest.raises(TypeError, match="no parameters \\['reductions'\\]"):
        same_parameters(jxent.softmax_cross_entropy, reductions="mean")
