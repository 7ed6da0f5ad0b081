"""Docstring parts that several public functions share, each written once.

A public function's docstring names a part on a line of its own, ``{part}``, indented as the
part should be; :func:`with_parts` puts the part's text there before ``jitted`` copies the
docstring, so ``help()``, Sphinx and the doctests all see the whole text.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

PARTS = {
    "normaliser_args": """\
x: input array. Integer inputs are promoted to float.
axis: axis or tuple of axes over which to normalise (``None``: all axes).
where: optional boolean mask, broadcastable to ``x``; ``False`` entries take no part.
axis_name: vocabulary parallelism inside :func:`jax.shard_map`: the mesh axis name
  over which the normalised axis is sharded.""",
    "kl_args": """\
axis: class axis or tuple of axes (``None``: all).
where: boolean mask broadcastable to the inputs; ``False`` entries take no part.""",
    "kl_returns": """\
float32 divergences (float64 for float64 inputs) of the batch shape.""",
    "reverse_mode_only": """\
Reverse mode only (a ``jax.custom_vjp``): use ``jax.jacrev`` and ``jax.hessian``, not
``jax.jvp`` / ``jax.jacfwd``; see :doc:`gradients`.""",
}

_MARKER = re.compile(r"^( *)\{(\w+)\}$", re.MULTILINE)


def with_parts(fn: F) -> F:
    """``fn`` with each ``{part}`` line of its docstring replaced by that part of :data:`PARTS`."""

    def part(match: re.Match[str]) -> str:
        indent, name = match.groups()
        if name not in PARTS:  # a typo would otherwise show as "{name}" in the docs
            raise ValueError(f"{fn.__name__}'s docstring names {name!r}, not one of {list(PARTS)}.")
        return textwrap.indent(PARTS[name], indent)

    fn.__doc__ = _MARKER.sub(part, fn.__doc__ or "")
    return fn
