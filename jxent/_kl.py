"""Kullback-Leibler divergences with hand-written gradients."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _dtypes, _elementwise, _layout, _reductions, _sharding, _validation
from jxent._jit import jitted


def _log_or_zero(t: jax.Array) -> jax.Array:
    """``log t`` where ``t != 0``, else 0: the ``0·log 0 = 0`` convention, NaN-free."""
    safe = jnp.where(t == 0, jnp.ones_like(t), t)
    return jnp.where(t == 0, jnp.zeros_like(t), jnp.log(safe))


# ----------------------------------------------------------------------------- probabilities


@jax.custom_vjp
def _kl_impl(lp: jax.Array, t: jax.Array, where: jax.Array | None) -> jax.Array:
    return _kl_fwd(lp, t, where)[0]


def _kl_fwd(
    lp: jax.Array, t: jax.Array, where: jax.Array | None
) -> tuple[jax.Array, tuple[Any, ...]]:
    dtype = _dtypes.compute_dtype(jnp.result_type(lp, t))
    lpf, tf = lp.astype(dtype), t.astype(dtype)
    terms = _elementwise.weighted(tf, _log_or_zero(tf) - lpf)
    return _reductions.class_sum(_elementwise.mask(terms, where, 0.0))[..., 0], (lp, t, where)


def _kl_bwd(residuals: tuple[Any, ...], g: jax.Array) -> tuple[Any, ...]:
    lp, t, where = residuals
    g = g[..., None]
    lpf, tf = lp.astype(g.dtype), t.astype(g.dtype)
    dlp = _elementwise.mask(-g * tf, where, 0.0)
    # d/dt [t log t] = log t + 1 for t > 0; at t = 0 the 0·log 0 branch is constant (as optax).
    dt = _elementwise.mask(
        g * (jnp.where(tf == 0, jnp.zeros_like(tf), _log_or_zero(tf) + 1.0) - lpf), where, 0.0
    )
    return dlp.astype(lp.dtype), dt.astype(t.dtype), None


_kl_impl.defvjp(_kl_fwd, _kl_bwd)


# ----------------------------------------------------------------------------- log-probabilities


def _log_ratio(lt: jax.Array, lp: jax.Array) -> jax.Array:
    """``lt - lp``, but 0 where ``lt = -inf`` (those terms are dropped): never forms
    ``-inf - (-inf)``, whose NaN ``jax.debug_nans`` reports even in a discarded branch."""
    skip = jnp.isneginf(lt)
    return jnp.where(skip, jnp.zeros_like(lt), lt) - jnp.where(skip, jnp.zeros_like(lp), lp)


@jax.custom_vjp
def _kl_log_impl(lp: jax.Array, lt: jax.Array, where: jax.Array | None) -> jax.Array:
    return _kl_log_fwd(lp, lt, where)[0]


def _kl_log_fwd(
    lp: jax.Array, lt: jax.Array, where: jax.Array | None
) -> tuple[jax.Array, tuple[Any, ...]]:
    dtype = _dtypes.compute_dtype(jnp.result_type(lp, lt))
    lpf, ltf = lp.astype(dtype), lt.astype(dtype)
    terms = jnp.where(jnp.isneginf(ltf), jnp.zeros_like(ltf), jnp.exp(ltf) * _log_ratio(ltf, lpf))
    return _reductions.class_sum(_elementwise.mask(terms, where, 0.0))[..., 0], (lp, lt, where)


def _kl_log_bwd(residuals: tuple[Any, ...], g: jax.Array) -> tuple[Any, ...]:
    lp, lt, where = residuals
    g = g[..., None]
    lpf, ltf = lp.astype(g.dtype), lt.astype(g.dtype)
    t = jnp.exp(ltf)
    dlp = _elementwise.mask(-g * t, where, 0.0)
    dlt = jnp.where(jnp.isneginf(ltf), jnp.zeros_like(t), g * t * (_log_ratio(ltf, lpf) + 1.0))
    return dlp.astype(lp.dtype), _elementwise.mask(dlt, where, 0.0).astype(lt.dtype), None


_kl_log_impl.defvjp(_kl_log_fwd, _kl_log_bwd)


# ----------------------------------------------------------------------------- public


def _apply(
    impl: Any,
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: _validation.Axis,
    where: ArrayLike | None,
    target_name: str,
) -> jax.Array:
    lp = _dtypes.as_floating(log_predictions, "log_predictions")
    t = _dtypes.as_floating(targets, target_name)
    if t.shape != lp.shape:
        raise ValueError(
            f"{target_name} of shape {t.shape} must match log_predictions of shape {lp.shape}."
        )
    layout = _layout.ClassLayout(lp.shape, _validation.canonical_axes(axis, lp.ndim))
    lp, t = layout.to_last(lp), layout.to_last(t)
    mask = _sharding.reshard_like(_layout.broadcast_where(where, layout), lp)
    return impl(lp, _sharding.reshard_like(t, lp), mask)


@jitted("axis")
def kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Kullback-Leibler divergence of predictions from target probabilities.

    .. math::
        \mathrm{KL}(t \,\|\, q) = \sum_c t_c\,(\log t_c - \log q_c),
        \qquad 0 \log 0 = 0 .

    A drop-in for :func:`optax.kl_divergence` (per-example, no reduction), except that a
    class with zero target mass contributes 0 even where ``log_predictions`` is ``-inf``.

    Args:
      log_predictions: floating log-probabilities of the prediction.
      targets: target probabilities of the same shape.
      axis: class axis or tuple of axes (``None``: all).
      where: boolean mask broadcastable to the inputs; ``False`` entries take no part.

    Returns:
      float32 divergences (float64 for float64 inputs) of the batch shape.

    Example:
      >>> import jax.numpy as jnp, jxent
      >>> jxent.kl_divergence(jnp.log(jnp.array([0.5, 0.5])), jnp.array([1.0, 0.0]))
      Array(0.6931, dtype=float32)
    """
    return _apply(_kl_impl, log_predictions, targets, axis, where, "targets")


@jitted("axis")
def kl_divergence_with_log_targets(
    log_predictions: ArrayLike,
    log_targets: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Kullback-Leibler divergence of predictions from targets, both given as log-probabilities.

    .. math::
        \mathrm{KL}(t \,\|\, q) = \sum_c e^{\log t_c}\,(\log t_c - \log q_c).

    A drop-in for :func:`optax.kl_divergence_with_log_targets`; a target class at
    ``log t = -inf`` contributes 0 to value and gradient.

    Args:
      log_predictions: floating log-probabilities of the prediction.
      log_targets: floating log-probabilities of the target, same shape.
      axis: class axis or tuple of axes (``None``: all).
      where: boolean mask broadcastable to the inputs; ``False`` entries take no part.

    Returns:
      float32 divergences (float64 for float64 inputs) of the batch shape.

    Example:
      >>> import jax.numpy as jnp, jxent
      >>> lp = jnp.log(jnp.array([0.5, 0.5]))
      >>> jxent.kl_divergence_with_log_targets(lp, lp)
      Array(0., dtype=float32)
    """
    return _apply(_kl_log_impl, log_predictions, log_targets, axis, where, "log_targets")
