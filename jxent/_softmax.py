"""Softmax and log-softmax with hand-written gradients.

Both save only their input and the O(batch) log-normaliser for the backward pass and
recompute ``exp(x - lse)`` there: no array of the input's size is kept alive in between.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _dtypes, _elementwise, _layout, _normaliser, _reductions, _sharding, _validation
from jxent._jit import jitted


def _masked(x: jax.Array, where: jax.Array | None) -> jax.Array:
    return _elementwise.mask(x.astype(_dtypes.compute_dtype(x.dtype)), where, -jnp.inf)


def _probabilities(
    x: jax.Array, where: jax.Array | None, norm: _normaliser.Normaliser
) -> jax.Array:
    """``exp(x - lse)`` in the compute dtype; 0 on masked entries and on all-masked rows."""
    return jnp.exp(norm.log_probs(_masked(x, where)))


# ----------------------------------------------------------------------------- softmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _softmax_impl(x: jax.Array, where: jax.Array | None, axis_name: Hashable | None) -> jax.Array:
    return _softmax_fwd(x, where, axis_name)[0]


def _softmax_fwd(
    x: jax.Array, where: jax.Array | None, axis_name: Hashable | None
) -> tuple[jax.Array, tuple[Any, ...]]:
    norm = _normaliser.log_normaliser(x.astype(_dtypes.compute_dtype(x.dtype)), where, axis_name)
    return _probabilities(x, where, norm).astype(x.dtype), (x, where, norm)


def _softmax_bwd(
    axis_name: Hashable | None, residuals: tuple[Any, ...], g: jax.Array
) -> tuple[Any, ...]:
    # J = diag(p) - p pᵀ, so Jᵀ g = p ⊙ (g - <g, p>); masked entries have p = 0.
    x, where, norm = residuals
    p = _probabilities(x, where, norm)
    g = g.astype(p.dtype)
    return (p * (g - _inner_with_probabilities(g, x, where, norm, axis_name))).astype(x.dtype), None


def _inner_with_probabilities(
    g: jax.Array,
    x: jax.Array,
    where: jax.Array | None,
    norm: _normaliser.Normaliser,
    axis_name: Any,
) -> jax.Array:
    """``<g, p>`` over the classes (keepdims), as ``exp(-lo) · Σ g·exp(x - hi)``.

    With ``lse = hi + lo`` (:meth:`~jxent._normaliser.Normaliser.lse_parts`) that is ``Σ g·p``,
    but neither the product ``g·p`` nor the forward pass's ``exp(x - shift)``: XLA would merge
    either with the forward pass (``p·g`` appears there in an expected-value loss ``Σ p·r``,
    whose cotangent is ``r``) and materialise the shared product as a logits-sized array.
    """

    def weighted(g: Any, x: Any, where: Any, hi: Any) -> Any:
        return g * jnp.exp(_masked(x, where) - hi)

    hi, lo = norm.lse_parts()
    total = _reductions.class_reduce(
        jnp.sum, weighted, g, x, where, hi, num_classes=x.shape[-1], axis_name=axis_name
    )
    # Empty rows (all masked) have hi = +inf, so total = 0; their p, and gradient, is 0.
    return jnp.where(jnp.isneginf(norm.log_sum), 0.0, total * jnp.exp(-lo))


_softmax_impl.defvjp(_softmax_fwd, _softmax_bwd)


# ----------------------------------------------------------------------------- log_softmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _log_softmax_impl(
    x: jax.Array, where: jax.Array | None, axis_name: Hashable | None
) -> jax.Array:
    return _log_softmax_fwd(x, where, axis_name)[0]


def _log_softmax_fwd(
    x: jax.Array, where: jax.Array | None, axis_name: Hashable | None
) -> tuple[jax.Array, tuple[Any, ...]]:
    norm = _normaliser.log_normaliser(x.astype(_dtypes.compute_dtype(x.dtype)), where, axis_name)
    return norm.log_probs(_masked(x, where)).astype(x.dtype), (x, where, norm)


def _log_softmax_bwd(
    axis_name: Hashable | None, residuals: tuple[Any, ...], g: jax.Array
) -> tuple[Any, ...]:
    # d log p_i / d x_j = δ_ij - p_j, so Jᵀ g = g - p Σ g (masked entries take no part).
    x, where, norm = residuals
    p = _probabilities(x, where, norm)
    g = _elementwise.mask(g.astype(p.dtype), where, 0.0)
    dx = g - p * _reductions.class_sum(g, axis_name)
    return dx.astype(x.dtype), None


_log_softmax_impl.defvjp(_log_softmax_fwd, _log_softmax_bwd)


# ----------------------------------------------------------------------------- public


def _apply(
    impl: Any,
    x: ArrayLike,
    axis: _validation.Axis,
    where: ArrayLike | None,
    axis_name: Hashable | None,
) -> jax.Array:
    _validation.check_axis_name(axis_name)
    x = _dtypes.as_inexact(x)
    layout = _layout.ClassLayout(x.shape, _validation.canonical_axes(axis, x.ndim))
    x = layout.to_last(x)
    out = impl(x, _sharding.reshard_like(_layout.broadcast_where(where, layout), x), axis_name)
    return layout.from_last(out)


@jitted("axis", "axis_name")
def softmax(
    x: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Softmax, computed stably, with a hand-written gradient.

    .. math::
        \operatorname{softmax}(x)_i = \frac{\exp(x_i - m)}{\sum_j \exp(x_j - m)},
        \qquad m = \max_j x_j,
        \qquad \frac{\partial p_i}{\partial x_j} = p_i(\delta_{ij} - p_j).

    A drop-in for :func:`jax.nn.softmax`. Half-precision inputs are accumulated in float32;
    the result has the input's dtype. Masked entries (and whole masked rows) give 0 with
    gradient exactly 0.

    Args:
      x: input array. Integer inputs are promoted to float.
      axis: axis or tuple of axes over which to normalise (``None``: all axes).
      where: optional boolean mask, broadcastable to ``x``; ``False`` entries take no part.
      axis_name: vocabulary parallelism inside :func:`jax.shard_map`: the mesh axis name
        over which the normalised axis is sharded.

    Returns:
      An array of the shape and dtype of ``x`` whose entries along ``axis`` sum to 1.

    Example:
      >>> import jax.numpy as jnp, jxent
      >>> jxent.softmax(jnp.array([1000.0, 2000.0, 3000.0]))
      Array([0., 0., 1.], dtype=float32)

    Note:
      Reverse mode only (a ``jax.custom_vjp``): use ``jax.jacrev`` and ``jax.hessian``, not
      ``jax.jvp`` / ``jax.jacfwd``; see :doc:`gradients`.

    References:
      Milakov & Gimelshein, `Online normalizer calculation for softmax
      <https://arxiv.org/abs/1805.02867>`_, 2018.
    """
    return _apply(_softmax_impl, x, axis, where, axis_name)


@jitted("axis", "axis_name")
def log_softmax(
    x: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Log-softmax, computed stably, with a hand-written gradient.

    .. math::
        \log\operatorname{softmax}(x)_i = x_i - \log \sum_j \exp(x_j).

    A drop-in for :func:`jax.nn.log_softmax`: masked entries give ``-inf`` (gradient 0).
    Half-precision inputs are accumulated in float32; the result has the input's dtype.

    Args:
      x: input array. Integer inputs are promoted to float.
      axis: axis or tuple of axes over which to normalise (``None``: all axes).
      where: optional boolean mask, broadcastable to ``x``; ``False`` entries take no part.
      axis_name: vocabulary parallelism inside :func:`jax.shard_map`: the mesh axis name
        over which the normalised axis is sharded.

    Returns:
      An array of the shape and dtype of ``x``.

    Example:
      >>> import jax.numpy as jnp, jxent
      >>> jxent.log_softmax(jnp.array([0.0, 0.0]))
      Array([-0.6931472, -0.6931472], dtype=float32)

    Note:
      Reverse mode only (a ``jax.custom_vjp``): use ``jax.jacrev`` and ``jax.hessian``, not
      ``jax.jvp`` / ``jax.jacfwd``; see :doc:`gradients`.
    """
    return _apply(_log_softmax_impl, x, axis, where, axis_name)
