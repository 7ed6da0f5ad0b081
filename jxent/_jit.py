"""The ``jitted`` decorator: one typed, documented definition per public function.

``jax.jit`` with ``static_argnames`` (given by name, passed positionally or by keyword), where
a static option passed as an array (or any unhashable value) gets jxent's error naming it
instead of JAX's "Non-hashable static arguments". The decorated function keeps its signature
and docstring for type checkers, ``help()`` and Sphinx.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable
from typing import Any, ParamSpec, TypeVar

import jax
import numpy as np

P = ParamSpec("P")
R = TypeVar("R")

# An eager step run on the bound arguments before the jitted call (it may rewrite them): for
# checks that can only be done on concrete values, such as ``check_labels``.
EagerStep = Callable[[dict[str, Any]], None]


def jitted(
    *static: str, eager: EagerStep | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorates ``fn`` as ``jax.jit(fn, static_argnames=static)``, validating the static
    options first. Static options select the compiled program, so they must be Python values.
    ``eager``, when given, sees (and may change) the bound arguments before the call."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)
        unknown = [name for name in static if name not in signature.parameters]
        if unknown:  # a typo here would silently trace the option instead
            raise TypeError(f"jitted: {fn.__name__} has no parameters {unknown}.")
        compiled = jax.jit(fn, static_argnames=static)
        positions = _positions(signature, static)

        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            # No signature.bind on this path (it cost about as much as the jitted call's own
            # dispatch): a static option is either at its known position or among kwargs.
            # Wrong arguments still get Python's errors, from jax.jit's own binding.
            for name in static:
                index = positions.get(name)
                if index is not None and index < len(args):
                    _check_static(name, args[index])
                elif name in kwargs:
                    _check_static(name, kwargs[name])
            if eager is None:
                return compiled(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            eager(bound.arguments)
            return compiled(*bound.args, **bound.kwargs)

        call._cache_size = compiled._cache_size  # type: ignore[attr-defined]
        return call

    return decorate


def _positions(signature: inspect.Signature, names: tuple[str, ...]) -> dict[str, int]:
    """The positional index of each of ``names`` that can be passed positionally."""
    positional = []
    for param in signature.parameters.values():
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            break  # after *args or at the keyword-only ones: no more positions
        positional.append(param.name)
    return {name: positional.index(name) for name in names if name in positional}


def _check_static(name: str, value: Any) -> None:
    if isinstance(value, jax.Array | np.ndarray) or not isinstance(value, Hashable):
        raise TypeError(
            f"{name} must be a static Python value (it selects the compiled program), got "
            f"{type(value).__name__} {value!r}; pass a Python number, tuple or string, e.g. "
            f"float(...) of a concrete scalar."
        )


def same_parameters(
    source: Callable[P, Any], **defaults: Any
) -> Callable[[Callable[..., R]], Callable[P, R]]:
    """Gives the decorated function ``source``'s parameter list (for type checkers through
    ``ParamSpec``, for ``help()`` and Sphinx through ``__signature__``), with ``defaults``
    replacing some default values: one parameter list for two public functions that take
    the same arguments, such as a dispatcher and the function it mostly calls."""
    signature = inspect.signature(source)
    unknown = sorted(set(defaults) - set(signature.parameters))
    if unknown:
        raise TypeError(f"same_parameters: {source.__name__} has no parameters {unknown}.")
    parameters = [
        p.replace(default=defaults[p.name]) if p.name in defaults else p
        for p in signature.parameters.values()
    ]

    def decorate(fn: Callable[..., R]) -> Callable[P, R]:
        fn.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        fn.__annotations__ = dict(source.__annotations__)  # for typing.get_type_hints
        return fn

    return decorate
