"""Helpers for ``custom_vjp`` rules defined with ``symbolic_zeros=True``.

With that option JAX tells a backward rule which output cotangents are zero (a
:class:`~jax.custom_derivatives.SymbolicZero` instead of an array of zeros), so that the
work for them is skipped, not done on zeros: the aux outputs of the losses are usually only
logged, and their share of the gradient would otherwise cost a pass over the logits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def is_zero(ct: Any) -> bool:
    """Whether a cotangent is a symbolic zero."""
    return isinstance(ct, SymbolicZero)


def dense(ct: Any) -> Any:
    """The cotangent as an array: zeros of its shape and dtype for a symbolic zero."""
    if isinstance(ct, SymbolicZero):
        aval: Any = ct.aval
        return jnp.zeros(aval.shape, aval.dtype)
    return ct


def primal_values(args: Any) -> Any:
    """The arrays of a ``fwd`` rule's arguments (each leaf comes wrapped with its
    ``perturbed`` bit under ``symbolic_zeros=True``)."""
    return jax.tree.map(lambda p: p.value, args, is_leaf=lambda p: hasattr(p, "perturbed"))
