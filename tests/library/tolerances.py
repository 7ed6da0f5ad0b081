"""How the numerics tests compare jxent with the float64 references (``reference.py``).

Unlike ``reference.py``, which stays independent of JAX and jxent, this module reads JAX
arrays: their exact values as float64, the tolerance per dtype, and x64 for float64 cases.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np


def x64_if(dtype):
    """float64 arrays need x64; enabled only inside the test that asks for it."""
    return jax.enable_x64(True) if dtype == jnp.float64 else contextlib.nullcontext()


def compute_dtype(dtype):
    """The dtype jxent computes (and returns losses) in: float32 for half precision."""
    return np.float64 if dtype == jnp.float64 else np.float32


def as64(x):
    """The exact values of ``x`` (half precision through float32) as float64 NumPy."""
    x = jnp.asarray(x)
    return np.asarray(x.astype(compute_dtype(x.dtype)), np.float64)


def tolerance(dtype, kind):
    """Relative tolerance. Half-precision losses are accumulated in float32, so only their
    gradients (returned in the input dtype) are loose."""
    if dtype == jnp.float64:
        return 1e-10
    if kind == "grad" and dtype == jnp.bfloat16:
        return 2e-2
    if kind == "grad" and dtype == jnp.float16:
        return 2e-3
    return 2e-5


def assert_close(actual, expected, dtype=jnp.float32, kind="value"):
    """``actual`` equals the float64 ``expected`` in shape and, within :func:`tolerance` of
    ``dtype`` relative to the largest finite expected value (at least 1), in value."""
    actual = as64(actual)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = tolerance(dtype, kind)
    finite = expected[np.isfinite(expected)]
    scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)
