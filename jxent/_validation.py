"""Validation of the public functions' options (axes, reductions, static floats)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal

import jax
import numpy as np

Axis = int | tuple[int, ...] | None


Reduction = Literal["none", "sum", "mean"]


REDUCTIONS = ("none", "sum", "mean")


def check_axis_name(axis_name: Hashable | None) -> None:
    if axis_name is not None and not isinstance(axis_name, Hashable):
        raise TypeError(f"axis_name must be a hashable mesh axis name or None, got {axis_name!r}.")


def canonical_axes(axis: Axis, ndim: int, *, name: str = "axis") -> tuple[int, ...]:
    """Returns ``axis`` as a tuple of non-negative ints in the order given, validated against
    ``ndim``. The order is the order in which class axes are flattened (major to minor), as
    in optax: ``axis=(3, 2)`` makes axis 3 the major one."""
    if axis is None:
        return tuple(range(ndim))
    raw = (axis,) if isinstance(axis, int | np.integer) else axis
    if not isinstance(raw, tuple) or not all(isinstance(a, int | np.integer) for a in raw):
        raise TypeError(f"{name} must be an int, a tuple of ints or None, got {axis!r}.")
    axes = []
    for a in raw:
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}={axis!r} is out of range for an array of rank {ndim}.")
        axes.append(int(a) % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(f"{name}={axis!r} repeats an axis.")
    return tuple(axes)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def check_unit_interval(value: float, name: str) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python float, got a traced value {value}.")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}.")
    return value


def check_nonnegative(value: float, name: str) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python float, got a traced value {value}.")
    value = float(value)
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return value


def check_ignore_index(ignore_index: int | None) -> None:
    if ignore_index is not None and not isinstance(ignore_index, int | np.integer):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}.")


def check_positive(value: float, name: str) -> float:
    """A static Python float ``> 0`` (e.g. ``temperature``)."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python float, got a traced value {value}.")
    value = float(value)
    if not value > 0.0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite float > 0, got {value}.")
    return value
