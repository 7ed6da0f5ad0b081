"""Elementwise helpers that keep NaN and infinities where they belong (masks, zero weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted(weight: jax.Array, value: jax.Array) -> jax.Array:
    """``weight · value`` with ``0 · inf = 0``: a term with no weight contributes nothing.

    The select comes before the product, so that ``0 · inf`` is never formed: a NaN made
    even in a discarded branch trips ``jax.debug_nans``.
    """
    return weight * jnp.where(weight == 0, jnp.zeros_like(value), value)


def nan_where(bad: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` with NaN where ``bad``, made by arithmetic that yields NaN only there.

    ``jnp.where(bad, nan, x)`` would create a NaN constant even when nothing is bad, which
    ``jax.debug_nans`` reports on valid input (cf. jax-ml/jax#7634); ``0 · inf`` is NaN
    exactly where ``bad`` holds, and ``x + 0`` elsewhere is ``x``.
    """
    poison = jnp.where(bad, jnp.asarray(jnp.inf, x.dtype), jnp.zeros((), x.dtype))
    return x + poison * jnp.zeros((), x.dtype)


def mask(x: jax.Array, where: jax.Array | None, fill: float) -> jax.Array:
    return x if where is None else jnp.where(where, x, jnp.asarray(fill, x.dtype))


def capped(x: jax.Array) -> jax.Array:
    """``min(x, largest finite float)``, so that a zero weight times it is 0, never NaN.

    Used for ``-log p`` inside class sums: a select (``where``) there would keep XLA:CPU
    from fusing the elementwise work into the reduction and materialise a logits-sized
    array, a ``minimum`` does not. The price: positive mass on a class whose ``-log p``
    is infinite contributes ``mass · 3.4e38`` (float32) instead of ``inf``.
    """
    return jnp.minimum(x, jnp.finfo(x.dtype).max)


def finite_or_zero(x: jax.Array) -> jax.Array:
    """Replaces ``±inf`` by 0 (NaN stays NaN)."""
    return jnp.where(jnp.isinf(x), jnp.zeros_like(x), x)


def safe_reciprocal(x: jax.Array) -> jax.Array:
    """``1 / x``, and 0 where ``x`` is 0."""
    return jnp.where(x == 0, jnp.zeros_like(x), 1.0 / jnp.where(x == 0, jnp.ones_like(x), x))
