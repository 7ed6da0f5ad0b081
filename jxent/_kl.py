"""Kullback-Leibler divergences with hand-written gradients."""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _dtypes, _elementwise, _layout, _reductions, _sharding, _validation
from jxent._docs import with_parts
from jxent._jit import jitted


class _Targets(NamedTuple):
    """The target distribution, whichever way it was given."""

    probs: jax.Array  # t
    logs: jax.Array  # log t, but 0 where dropped (finite: no NaN from it below)
    dropped: jax.Array  # t = 0 (log t = -inf): 0·log 0 = 0, the class takes no part


def _targets(t: jax.Array, log_targets: bool) -> _Targets:
    if log_targets:
        dropped = jnp.isneginf(t)
        return _Targets(jnp.exp(t), jnp.where(dropped, jnp.zeros_like(t), t), dropped)
    dropped = t == 0
    return _Targets(t, jnp.log(jnp.where(dropped, jnp.ones_like(t), t)), dropped)


def _log_ratio(targets: _Targets, lp: jax.Array) -> jax.Array:
    """``log t - lp``, but 0 for dropped classes: never ``-inf - (-inf)`` nor, after it,
    ``0 · inf``, whose NaN ``jax.debug_nans`` reports even in a discarded branch. One select
    over one difference: XLA:CPU fuses it into the reduction's operand (a select of the
    logs and one of ``lp`` were two logits-sized arrays there)."""
    return jnp.where(targets.dropped, jnp.zeros_like(lp), targets.logs - lp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _kl(
    lp: jax.Array,
    t: jax.Array,
    where: jax.Array | None,
    axis_name: Hashable | None,
    log_targets: bool,
) -> jax.Array:
    """``Σ_c t_c (log t_c - lp_c)`` over the last axis (summed over ``axis_name`` when the
    classes are sharded); ``t`` given as logs if ``log_targets``."""
    return _kl_fwd(lp, t, where, axis_name, log_targets)[0]


def _kl_fwd(
    lp: jax.Array,
    t: jax.Array,
    where: jax.Array | None,
    axis_name: Hashable | None,
    log_targets: bool,
) -> tuple[jax.Array, tuple[Any, ...]]:
    dtype = _dtypes.compute_dtype(jnp.result_type(lp, t))
    targets = _targets(t.astype(dtype), log_targets)
    terms = targets.probs * _log_ratio(targets, lp.astype(dtype))
    total = _reductions.class_sum(_elementwise.mask(terms, where, 0.0), axis_name)[..., 0]
    return _kept_apart_on_gpu(total, lp.shape), (lp, t, where)


def _kept_apart_on_gpu(row_sums: jax.Array, shape: tuple[Any, ...]) -> jax.Array:
    """``row_sums``, on GPU kept from merging with a sum over the rows when there are fewer
    rows than classes and the rows are reduced in one kernel.

    A mean of the KL (``jnp.mean(kl)``) is a reduction of its row sums, which XLA's
    simplifier merges into one reduction over all ``N·C`` terms; XLA:GPU then splits that
    in about ``sqrt(N·C)`` float32 partials (2048 at 1024 x 4096) that are written and read
    back, where the row sums themselves are ``N`` (optax's, kept apart by their conversion
    to bfloat16). The barrier keeps the ``N``: fewer when ``N < C``, more when ``N > C``
    (65536 x 128), so it is set only for the former. Long rows, reduced in blocks on GPU
    (see :func:`~jxent._reductions.gpu_block_size`), already write per-block partials; a
    barrier there added a kernel and their row sums' traffic (8192 x 32000).
    """
    classes, rows = shape[-1], shape[:-1]
    static = all(isinstance(d, int) for d in shape)
    if not static or math.prod(rows) >= classes or _reductions.gpu_block_size(classes):
        return row_sums

    def kept() -> jax.Array:
        return jax.lax.optimization_barrier(row_sums)

    return _reductions.platform_dependent(cuda=kept, rocm=kept, default=lambda: row_sums)


def _kl_bwd(
    axis_name: Hashable | None, log_targets: bool, residuals: tuple[Any, ...], g: jax.Array
) -> tuple[Any, ...]:
    del axis_name  # each term's derivative is its own class's: nothing crosses devices
    lp, t, where = residuals
    g = g[..., None]
    lpf = lp.astype(g.dtype)
    targets = _targets(t.astype(g.dtype), log_targets)
    dlp = -g * targets.probs
    if log_targets:  # d/d(log t) = t · d/dt, 0 at t = 0
        dt = jnp.where(
            targets.dropped, jnp.zeros_like(lpf), targets.probs * g * (_log_ratio(targets, lpf) + 1)
        )
    else:
        # d/dt [t (log t - lp)] = log t + 1 - lp for t > 0; at t = 0 the 0·log 0 branch is
        # constant (as optax), leaving -lp.
        dt = g * (jnp.where(targets.dropped, jnp.zeros_like(lpf), targets.logs + 1.0) - lpf)
    return (
        _elementwise.mask(dlp, where, 0.0).astype(lp.dtype),
        _elementwise.mask(dt, where, 0.0).astype(t.dtype),
        None,
    )


_kl.defvjp(_kl_fwd, _kl_bwd)


# ----------------------------------------------------------------------------- public


def _apply(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: _validation.Axis,
    where: ArrayLike | None,
    log_targets: bool,
) -> jax.Array:
    target_name = "log_targets" if log_targets else "targets"
    lp = _dtypes.as_floating(log_predictions, "log_predictions")
    t = _dtypes.as_floating(targets, target_name)
    if t.shape != lp.shape:
        raise ValueError(
            f"{target_name} of shape {t.shape} must match log_predictions of shape {lp.shape}."
        )
    layout = _layout.ClassLayout(lp.shape, _validation.canonical_axes(axis, lp.ndim))
    lp, t = layout.to_last(lp), layout.to_last(t)
    mask = _layout.broadcast_where(where, layout)
    return _sharding.per_shard(
        lambda lp, t, mask, axis_name: _kl(lp, t, mask, axis_name, log_targets),
        ((lp, _sharding.LOGITS), (t, _sharding.LOGITS), (mask, _sharding.LOGITS)),
        _sharding.BATCH,
        None,
    )


@jitted("axis")
@with_parts
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
      {kl_args}

    Returns:
      {kl_returns}

    Example:
      >>> import jax.numpy as jnp, jxent
      >>> jxent.kl_divergence(jnp.log(jnp.array([0.5, 0.5])), jnp.array([1.0, 0.0]))
      Array(0.6931, dtype=float32)
    """
    return _apply(log_predictions, targets, axis, where, log_targets=False)


@jitted("axis")
@with_parts
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
      {kl_args}

    Returns:
      {kl_returns}

    Example:
      >>> import jax.numpy as jnp, jxent
      >>> lp = jnp.log(jnp.array([0.5, 0.5]))
      >>> jxent.kl_divergence_with_log_targets(lp, lp)
      Array(0., dtype=float32)
    """
    return _apply(log_predictions, log_targets, axis, where, log_targets=True)
