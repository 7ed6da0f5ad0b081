"""Moving the class axes of inputs (and of masks and class weights) to one last axis.

Every public function moves its class axes to the end (flattened into one), runs a kernel
written for "classes on the last axis", and moves the result back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jxent import _sharding


class ClassLayout:
    """Moves the class axes of arrays shaped like ``shape`` to one flattened last axis.

    ``batch_shape`` is ``shape`` without the class axes; ``num_classes`` the product of the
    class dimensions. ``to_last`` and ``from_last`` are pure reshapes/transposes, so
    autodiff through them is exact and free of custom rules.
    """

    def __init__(self, shape: Sequence[int], axes: tuple[int, ...]):
        self.shape = tuple(shape)
        self.axes = axes
        self.batch_axes = tuple(i for i in range(len(shape)) if i not in axes)
        self.batch_shape = tuple(self.shape[i] for i in self.batch_axes)
        self.num_classes = math.prod(self.shape[i] for i in axes)
        self._perm = self.batch_axes + axes
        self._is_identity = self._perm == tuple(range(len(shape)))

    def to_last(self, x: jax.Array) -> jax.Array:
        if not self._is_identity:
            x = jnp.transpose(x, self._perm)
        _sharding.check_class_axes_mergeable(x, len(self.axes), self.axes)
        return x.reshape((*self.batch_shape, self.num_classes))

    def from_last(self, x: jax.Array) -> jax.Array:
        moved = [self.shape[i] for i in self._perm]
        x = x.reshape(moved)
        if not self._is_identity:
            x = jnp.transpose(x, tuple(int(i) for i in np.argsort(self._perm)))
        return x

    def keepdims_shape(self) -> tuple[int, ...]:
        return tuple(1 if i in self.axes else d for i, d in enumerate(self.shape))


def broadcast_where(
    where: ArrayLike | None, layout: ClassLayout, *, per_example: bool = False
) -> Any:
    """Broadcasts a mask to the full shape and moves it to the class-last layout.

    With ``per_example`` (the losses, as in optax), a mask of exactly the batch shape is
    one flag per example; otherwise masks follow NumPy broadcasting (as in ``jax.nn``).
    """
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
    given_shape = where.shape
    if per_example and given_shape == layout.batch_shape and where.ndim != len(layout.shape):
        where = jnp.expand_dims(where, layout.axes)
    try:
        where = jnp.broadcast_to(where, layout.shape)
    except ValueError:
        raise ValueError(
            f"where of shape {given_shape} is not broadcastable to the input shape "
            f"{layout.shape}"
            + (f" (nor equal to the batch shape {layout.batch_shape})." if per_example else ".")
        ) from None
    return layout.to_last(where)


def class_weights_vector(
    class_weights: ArrayLike | None, num_classes: int, dtype: Any
) -> jax.Array | None:
    return weights_array(
        class_weights, (num_classes,), dtype, "class_weights", "one weight per class"
    )


def weights_array(
    weights: ArrayLike | None, shape: tuple[int, ...], dtype: Any, name: str, meaning: str
) -> jax.Array | None:
    """``weights`` as a floating array of ``shape`` (integers become ``dtype``), or None;
    a wrong shape is an error naming ``name`` and what the weights are (``meaning``)."""
    if weights is None:
        return None
    array = jnp.asarray(weights)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape} ({meaning}), got shape {array.shape}.")
    if not jnp.issubdtype(array.dtype, jnp.floating):
        array = array.astype(dtype)
    return array
