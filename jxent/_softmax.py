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
from jxent._docs import with_parts
from jxent._jit import jitted


def _masked(x: jax.Array, where: jax.Array | None) -> jax.Array:
    return _elementwise.mask(x.astype(_dtypes.compute_dtype(x.dtype)), where, -jnp.inf)


def _probabilities(
    x: jax.Array, where: jax.Array | None, norm: _normaliser.Normaliser
) -> jax.Array:
    """``exp(x - lse)`` in the compute dtype; 0 on masked entries and on all-masked rows."""
    return jnp.exp(norm.log_probs(_masked(x, where)))


# ----------------------------------------------------------------------------- the kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _normalise(
    x: jax.Array, where: jax.Array | None, axis_name: Hashable | None, log: bool
) -> jax.Array:
    """Softmax of ``x`` over its last axis, or log-softmax when ``log``."""
    return _normalise_fwd(x, where, axis_name, log)[0]


def _normalise_fwd(
    x: jax.Array, where: jax.Array | None, axis_name: Hashable | None, log: bool
) -> tuple[jax.Array, tuple[Any, ...]]:
    norm = _normaliser.log_normaliser(x.astype(_dtypes.compute_dtype(x.dtype)), where, axis_name)
    out = norm.log_probs(_masked(x, where)) if log else _probabilities(x, where, norm)
    return out.astype(x.dtype), (x, where, norm)


def _normalise_bwd(
    axis_name: Hashable | None, log: bool, residuals: tuple[Any, ...], g: jax.Array
) -> tuple[Any, ...]:
    x, where, norm = residuals
    p = _probabilities(x, where, norm)
    g = g.astype(p.dtype)
    if log:
        # d log p_i / d x_j = δ_ij - p_j, so Jᵀ g = g - p Σ g (masked entries take no part).
        g = _elementwise.mask(g, where, 0.0)
        total = _reductions.on_cpu(
            lambda: _reductions.class_sum(g), lambda: _row_sum_like_a_loss(g, x.dtype)
        )
        dx = g - p * _psum(total, axis_name)
    else:
        # J = diag(p) - p pᵀ, so Jᵀ g = p ⊙ (g - <g, p>); masked entries have p = 0.
        dx = p * (g - _inner_with_probabilities(g, x, where, norm, axis_name))
    return dx.astype(x.dtype), None


def _psum(total: jax.Array, axis_name: Hashable | None) -> jax.Array:
    return total if axis_name is None else jax.lax.psum(total, axis_name)


def _inner_with_probabilities(
    g: jax.Array,
    x: jax.Array,
    where: jax.Array | None,
    norm: _normaliser.Normaliser,
    axis_name: Any,
) -> jax.Array:
    """``<g, p>`` over the classes (keepdims), written per platform.

    CPU: ``exp(-lo) · Σ g·exp(x - hi)``, with ``lse = hi + lo``
    (:meth:`~jxent._normaliser.Normaliser.lse_parts`): neither the product ``g·p`` nor the
    forward pass's ``exp(x - shift)``, which XLA:CPU would merge with the forward pass (``p·g``
    appears there in an expected-value loss ``Σ p·r``, whose cotangent is ``r``) and
    materialise as a logits-sized array.

    GPU and TPU: ``Σ g·p`` with ``p`` exactly the forward's :func:`_probabilities`. Nothing
    per row is left to compute after the sum, so the row sum depends only on what the forward
    output depends on, and XLA can fuse it with a reduction of that output (the loss
    ``Σ p·r``: one read of ``r`` and ``x`` for both, as for ``jax.nn.softmax``). XLA:TPU
    merged the CPU form's rescaling after the sum with the forward's per-row values into one
    fusion, so the loss waited for the row sum and read ``r`` and ``x`` again; the sum's
    dtype must match too (see :func:`_row_sum_like_a_loss`).
    """

    def cpu() -> jax.Array:
        def weighted(g: Any, x: Any, where: Any, hi: Any) -> Any:
            return g * jnp.exp(_masked(x, where) - hi)

        hi, lo = norm.lse_parts()
        total = _reductions.class_reduce(
            jnp.sum, weighted, g, x, where, hi, num_classes=x.shape[-1]
        )
        # Empty rows (all masked) have hi = +inf, so total = 0; their p, and gradient, is 0.
        return jnp.where(jnp.isneginf(norm.log_sum), 0.0, total * jnp.exp(-lo))

    def accelerator() -> jax.Array:
        return _row_sum_like_a_loss(g * _probabilities(x, where, norm), x.dtype)

    # exp(-lo) and the empty-row zero are per row: the sum over devices can come last.
    return _psum(_reductions.on_cpu(cpu, accelerator), axis_name)


def _row_sum_like_a_loss(v: jax.Array, dtype: Any) -> jax.Array:
    """``Σ v`` over the classes (keepdims) on GPU and TPU, in ``v``'s (float32) dtype.

    On TPU, for half-precision inputs (``dtype``), ``v`` is first rounded to ``dtype`` and
    the sum (accumulated in float32, as ``jnp.sum`` does) rounded to it: the types of the
    loss's own reduction of the output (``Σ out·g`` in bfloat16), which XLA:TPU fuses with
    this one only when they match, so that ``g`` and ``x`` are read once for both (+525 MB at
    8192 x 32000 bf16 on v5e otherwise). That is one rounding of each term and of the sum
    more than in float32, as ``jax.nn``'s backward pass has in bfloat16.
    """

    def tpu() -> jax.Array:
        return _reductions.class_sum(v.astype(dtype)).astype(v.dtype)

    return _reductions.platform_dependent(tpu=tpu, default=lambda: _reductions.class_sum(v))


_normalise.defvjp(_normalise_fwd, _normalise_bwd)


# ----------------------------------------------------------------------------- public


def _apply(
    x: ArrayLike,
    axis: _validation.Axis,
    where: ArrayLike | None,
    axis_name: Hashable | None,
    log: bool,
) -> jax.Array:
    _validation.check_axis_name(axis_name)
    x = _dtypes.as_inexact(x)
    layout = _layout.ClassLayout(x.shape, _validation.canonical_axes(axis, x.ndim))
    x = layout.to_last(x)
    mask = _layout.broadcast_where(where, layout)
    out = _sharding.per_shard(
        lambda x, mask, axis_name: _normalise(x, mask, axis_name, log),
        ((x, _sharding.LOGITS), (mask, _sharding.LOGITS)),
        _sharding.LOGITS,
        axis_name,
    )
    return layout.from_last(out)


# softmax and log_softmax take jax.nn's parameters, so their signatures match; the rest of
# them (the kernel, _apply, the shared docstring parts) is written once.


@jitted("axis", "axis_name")
@with_parts
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
      {normaliser_args}

    Returns:
      An array of the shape and dtype of ``x`` whose entries along ``axis`` sum to 1.

    Example:
      >>> import jax.numpy as jnp, jxent
      >>> jxent.softmax(jnp.array([1000.0, 2000.0, 3000.0]))
      Array([0., 0., 1.], dtype=float32)

    Note:
      {reverse_mode_only}

    References:
      Milakov & Gimelshein, `Online normalizer calculation for softmax
      <https://arxiv.org/abs/1805.02867>`_, 2018.
    """
    return _apply(x, axis, where, axis_name, log=False)


@jitted("axis", "axis_name")
@with_parts
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
      {normaliser_args}

    Returns:
      An array of the shape and dtype of ``x``.

    Example:
      >>> import jax.numpy as jnp, jxent
      >>> jxent.log_softmax(jnp.array([0.0, 0.0]))
      Array([-0.6931472, -0.6931472], dtype=float32)

    Note:
      {reverse_mode_only}
    """
    return _apply(x, axis, where, axis_name, log=True)
