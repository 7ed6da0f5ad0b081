"""The dtype policy: which inputs are accepted, what they are promoted to and computed in."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def as_floating(x: ArrayLike, name: str) -> jax.Array:
    """Returns ``x`` as an array, requiring a floating dtype (losses never promote silently)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}.")
    return x


def inexact_dtype(dtype: Any) -> Any:
    """The floating dtype ``jax.nn`` computes a ``dtype`` input in: inexact dtypes stay;
    bools and integers of up to 32 bits become float32, 64-bit integers float64 (so with
    x64 on, an int32 input still gives float32, as in ``jax.nn``)."""
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.inexact):
        return dtype
    return np.dtype(np.float64 if dtype.itemsize == 8 else np.float32)


def as_inexact(x: ArrayLike) -> jax.Array:
    """Returns ``x`` as an array, promoting integers and bools to float as ``jax.nn`` does."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(inexact_dtype(x.dtype))


def as_integer_labels(labels: ArrayLike) -> jax.Array:
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"integer labels must have an integer dtype, got {labels.dtype}.")
    return labels


def compute_dtype(dtype: Any) -> Any:
    """Half-precision inputs are accumulated in float32; float32/float64 stay as they are."""
    dtype = jnp.dtype(dtype)
    return jnp.float32 if dtype.itemsize < 4 else dtype
