"""Log-sum-exp with a hand-written gradient."""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _dtypes, _elementwise, _layout, _normaliser, _reductions, _sharding, _validation
from jxent._docs import with_parts
from jxent._jit import jitted


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _logsumexp_impl(
    x: jax.Array, b: jax.Array | None, where: jax.Array | None, axis_name: Hashable | None
) -> tuple[jax.Array, jax.Array]:
    return _logsumexp_fwd(x, b, where, axis_name)[0]


def _active(x: jax.Array, b: jax.Array | None, where: jax.Array | None) -> jax.Array | None:
    """Entries that take part: inside ``where`` and, as in ``jax.nn``, with ``b != 0``."""
    if b is None:
        return where
    nonzero = b != 0
    return nonzero if where is None else where & nonzero


def _logsumexp_fwd(
    x: jax.Array, b: jax.Array | None, where: jax.Array | None, axis_name: Hashable | None
) -> tuple[tuple[jax.Array, jax.Array], tuple[Any, ...]]:
    dtype = _dtypes.compute_dtype(x.dtype)
    xf, active = x.astype(dtype), _active(x, b, where)
    if b is None:
        # Keep the exponentials: the gradient is exp(x - lse) = e / Σe, no second exp.
        e, norm, inverse = _normaliser.exponentials(xf, active, axis_name)
        sign = jnp.where(jnp.isneginf(norm.log_sum), 0.0, 1.0).astype(dtype)
        residuals = (_normaliser.exponentials_residual(x, e), None, where, norm, sign, inverse)
        return (norm.lse(), sign), residuals
    # Signed sum: log|Σ b·exp(x - m)| with its sign, shifted by the row max as usual.
    m = _reductions.row_shift(xf, active, axis_name)
    total = _reductions.class_reduce(
        jnp.sum,
        lambda b, x, active, m: b * jnp.exp(_elementwise.mask(x, active, -jnp.inf) - m),
        *(b.astype(dtype), xf, active, m),
        num_classes=x.shape[-1],
        axis_name=axis_name,
    )
    sign = jnp.sign(total)
    norm = _normaliser.Normaliser(m, jnp.log(jnp.abs(total)))
    return (norm.lse(), sign), (x, b, where, norm, sign, None)


def _logsumexp_bwd(
    axis_name: Hashable | None, residuals: tuple[Any, ...], cotangents: tuple[jax.Array, jax.Array]
) -> tuple[Any, ...]:
    del axis_name  # d lse / d x_i = sign · b_i · exp(x_i - lse) needs no cross-device data.
    x, b, where, norm, sign, inverse = residuals
    g, _ = cotangents  # the sign is piecewise constant: no gradient.
    dtype = sign.dtype
    if b is None:  # x holds the saved exponentials (see _normaliser.exponentials_residual)
        e = _normaliser.exponentials_from_residual(x, where, norm)
        return (g * sign * e * inverse).astype(x.dtype), None, None
    xf = x.astype(dtype)
    # exp(x - lse) is 0 for masked entries and for rows whose lse is -inf (all masked).
    ratio = jnp.exp(norm.log_probs(_elementwise.mask(xf, _active(x, b, where), -jnp.inf)))
    scale = g * sign
    dx = scale * ratio * b.astype(dtype)
    # d/db_i includes entries with b_i == 0 (they still move the sum); masked ones do not.
    db = scale * jnp.exp(norm.log_probs(_elementwise.mask(xf, where, -jnp.inf)))
    return dx.astype(x.dtype), db.astype(b.dtype), None


_logsumexp_impl.defvjp(_logsumexp_fwd, _logsumexp_bwd)


@overload
def logsumexp(
    a: ArrayLike,
    axis: int | tuple[int, ...] | None = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: Literal[False] = False,
    where: ArrayLike | None = None,
    *,
    axis_name: Hashable | None = None,
) -> jax.Array: ...


@overload
def logsumexp(
    a: ArrayLike,
    axis: int | tuple[int, ...] | None = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    *,
    return_sign: Literal[True],
    where: ArrayLike | None = None,
    axis_name: Hashable | None = None,
) -> tuple[jax.Array, jax.Array]: ...


@overload
def logsumexp(
    a: ArrayLike,
    axis: int | tuple[int, ...] | None = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: ArrayLike | None = None,
    *,
    axis_name: Hashable | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


# The overloads give logsumexp's return type for each return_sign; PEP 484 wants the
# implementation's own signature besides them, so the parameter list stands four times.
@jitted("axis", "keepdims", "return_sign", "axis_name")
@with_parts
def logsumexp(
    a: ArrayLike,
    axis: int | tuple[int, ...] | None = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: ArrayLike | None = None,
    *,
    axis_name: Hashable | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Log-sum-exp, computed stably, with a hand-written gradient.

    .. math::
        \operatorname{lse}(a) = \log \sum_i b_i \exp(a_i)
        = m + \log \sum_i b_i \exp(a_i - m), \qquad m = \max_i a_i .

    A drop-in for :func:`jax.nn.logsumexp`. Half-precision inputs are accumulated in
    float32; the result has the dtype ``jax.nn`` gives: that of ``a`` and ``b`` promoted
    together, integers becoming float32 (float64 for 64-bit integers).

    Degenerate cases: a row whose entries are all ``-inf`` (or all masked out) gives
    ``-inf`` with gradient 0; masked entries get gradient exactly 0 whatever they hold;
    NaN inputs give NaN.

    Args:
      a: input array. Integer inputs are promoted to float.
      axis: axis or tuple of axes to reduce; ``None`` reduces over all axes.
      b: optional scaling factors; ``a`` and ``b`` broadcast against each other (as in
        :func:`jax.nn.logsumexp` and SciPy) and ``axis`` refers to their broadcast shape.
        Entries with ``b == 0`` are left out.
      keepdims: keep the reduced axes with size 1.
      return_sign: also return the sign of the sum. Without it a negative sum gives NaN.
      where: optional boolean mask, broadcastable to ``a``; ``False`` entries take no part.
      axis_name: for vocabulary parallelism inside :func:`jax.shard_map`: the mesh axis name
        over which the reduced (class) axis is sharded. Partial maxima and sums are combined
        with ``pmax`` / ``psum``; nothing is gathered.

    Returns:
      The log-sum-exp, or the pair ``(lse, sign)`` when ``return_sign``.

    Example:
      >>> import jax.numpy as jnp, jxent
      >>> print(f"{jxent.logsumexp(jnp.array([1000.0, 1000.0])):.3f}")
      1000.693

    Note:
      {reverse_mode_only}
    """
    _validation.check_axis_name(axis_name)
    x, b_arr = _promote(a, b)
    layout = _layout.ClassLayout(x.shape, _validation.canonical_axes(axis, x.ndim))
    x_last = layout.to_last(x)
    b_last = None if b_arr is None else layout.to_last(b_arr)
    where_last = _layout.broadcast_where(where, layout)
    lse, sign = _sharding.per_shard(
        _logsumexp_impl,
        ((x_last, _sharding.LOGITS), (b_last, _sharding.LOGITS), (where_last, _sharding.LOGITS)),
        (_sharding.BATCH, _sharding.BATCH),
        axis_name,
    )
    out_shape = layout.keepdims_shape() if keepdims else layout.batch_shape
    lse = lse.reshape(out_shape).astype(x.dtype)
    sign = sign.reshape(out_shape).astype(x.dtype)
    if return_sign:
        return lse, sign
    if b is not None:
        lse = _elementwise.nan_where(sign < 0, lse)  # log of a negative sum
    return lse


def _promote(a: ArrayLike, b: ArrayLike | None) -> tuple[jax.Array, jax.Array | None]:
    """``a`` and ``b`` in their common floating dtype, broadcast against each other.

    As :func:`jax.nn.logsumexp`: the dtype is that of ``a`` and ``b`` promoted together
    (integers becoming float, see :func:`~jxent._dtypes.inexact_dtype`), and either may
    broadcast the other.
    """
    if b is None:
        return _dtypes.as_inexact(a), None
    x, b_arr = jnp.asarray(a), jnp.asarray(b)
    dtype = _dtypes.inexact_dtype(jnp.result_type(x, b_arr))
    try:
        shape = jnp.broadcast_shapes(x.shape, b_arr.shape)
    except ValueError:
        raise ValueError(
            f"b of shape {b_arr.shape} does not broadcast against a of shape {x.shape}."
        ) from None
    return (
        jnp.broadcast_to(x.astype(dtype), shape),
        jnp.broadcast_to(b_arr.astype(dtype), shape),
    )
