"""Softmax cross-entropy (integer and dense labels) and the negative log-likelihood loss.

Conventions shared by every loss here (they are PyTorch's ``cross_entropy`` / ``nll_loss``):

* per example ``n`` with class weights ``w`` (all 1 without ``class_weights``) and smoothing
  ``ε`` over the ``C`` classes of its row, with ``lp = log_softmax(logits)``:

  - integer label ``y``:
    ``loss = (1 - ε)·(-w_y·lp_y) + (ε / C)·Σ_c (-w_c·lp_c)``, and the example's weight is ``w_y``;
  - dense labels ``t``: ``loss = -Σ_c w_c·t'_c·lp_c`` with ``t' = (1 - ε)·t + ε / C``, and the
    example's weight is 1;
  - ``z_loss=ζ`` adds ``ζ·lse²`` (``lse`` the log-normaliser), PaLM's auxiliary loss;

* ``reduction="mean"`` divides the sum of the losses by the sum of the examples' weights; a
  mean over zero total weight is 0 with zero gradient when no counted label is invalid (all
  ignored, all masked, zero class weights, empty batch), and an invalid label's NaN is never
  hidden by a mean or sum (see :mod:`jxent._labels`);
* ignored examples and rows masked out entirely by ``where`` give loss 0, gradient 0 and
  weight 0. With ``where``, ``C`` counts the row's unmasked classes.

The kernels work on class-last arrays ``[..., C]``. Their backward rules form
``softmax - target`` (with weights, smoothing and z-loss folded in) in one elementwise
expression that XLA fuses; no one-hot or log-softmax array of the logits' size is made.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jxent import _common as c
from jxent import _labels as lb
from jxent import _sharding as sh

# ----------------------------------------------------------------------------- targets


def _resolve_targets(
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    ignore_index: int | None,
    axis_name: Hashable | None,
    dtype: Any,
    num_local: int,
) -> lb.Targets:
    """Labels against ``num_local`` classes, masked by ``where``: a row masked out entirely
    does not count, and a label pointing at a masked-out class is invalid."""
    return lb.resolve(
        labels,
        num_local=num_local,
        axis_name=axis_name,
        ignore_index=ignore_index,
        class_weights=weights,
        dtype=dtype,
        counted=None if where is None else c.class_any(where, axis_name)[..., 0],
        allowed=where,
    )


def _target_mask(targets: lb.Targets, num_local: int) -> jax.Array:
    """Boolean ``[..., C]`` "this is the target class"; an iota compare that XLA fuses."""
    classes = jax.lax.broadcasted_iota(
        targets.local.dtype, (*targets.local.shape, num_local), targets.local.ndim
    )
    return classes == targets.local[..., None]


def _add_at_targets(values: jax.Array, targets: lb.Targets, amounts: jax.Array) -> jax.Array:
    """``values[..., y] += amounts`` for each example whose label lives on this device.

    On CPU a scatter of one value per example: cheaper than an iota compare and a select
    over every class, and done in place on ``values``. On GPU and TPU the compare, which
    XLA fuses into the elementwise pass that forms ``values`` (one kernel writes the
    gradient) instead of a separate scatter kernel.
    """

    def scatter() -> jax.Array:
        num_local = values.shape[-1]
        rows = values.reshape(-1, num_local)
        # Labels on other devices (or out of range) point past the end and are dropped.
        cols = jnp.where(targets.in_shard, targets.local, num_local).reshape(-1)
        rows = rows.at[jnp.arange(rows.shape[0]), cols].add(amounts.reshape(-1), mode="drop")
        return rows.reshape(values.shape)

    def compare() -> jax.Array:
        is_target = _target_mask(targets, values.shape[-1]) & targets.in_shard[..., None]
        return values + jnp.where(is_target, amounts[..., None], jnp.zeros_like(values))

    return c.on_cpu(scatter, compare)


def _scatter_to_classes(
    values: jax.Array, targets: lb.Targets, num_local: int, dtype: Any
) -> jax.Array:
    """``Σ_n values_n · [y_n = c]`` for each local class ``c`` (a segment sum)."""
    values = jnp.where(targets.in_shard, values, jnp.zeros_like(values))
    index = jnp.clip(targets.local, 0, num_local - 1)
    return jnp.zeros((num_local,), dtype).at[index.reshape(-1)].add(values.reshape(-1))


def _batch_sum(x: jax.Array) -> jax.Array:
    """Sums a ``[..., C]`` array over everything but the class axis."""
    return jnp.sum(x, axis=tuple(range(x.ndim - 1)))


def _row_class_count(x: jax.Array, where: jax.Array | None, axis_name: Hashable | None) -> Any:
    """Number of classes taking part in each row (``C``, or the unmasked count)."""
    if where is None:
        return c.global_num_classes(x.shape[-1], axis_name)
    # At least 1: a fully masked row counts for nothing, and ε/0 = inf would turn the zeros
    # that mask it (0·inf) into NaN in its gradient and in the class-weight gradient.
    return jnp.maximum(c.class_sum(where.astype(jnp.int32), axis_name)[..., 0], 1)


def _expand(x: Any) -> Any:
    return x[..., None] if isinstance(x, jax.Array) else x


# ----------------------------------------------------------------------------- integer labels


class _IntegerConfig(NamedTuple):
    ignore_index: int | None
    label_smoothing: float
    z_loss: float
    axis_name: Hashable | None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _integer_ce_impl(
    logits: jax.Array,
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    cfg: _IntegerConfig,
) -> tuple[jax.Array, jax.Array]:
    return _integer_ce_fwd(logits, labels, where, weights, cfg)[0]


def _smoothing_weights(
    weights: jax.Array | None, where: jax.Array | None, shape: tuple[int, ...], dtype: Any
) -> jax.Array:
    """``w_c`` broadcast over the batch, 0 on masked classes: where the smoothing mass goes."""
    w = jnp.ones((), dtype) if weights is None else weights.astype(dtype)
    return c.mask(jnp.broadcast_to(w, shape), where, 0.0)


def _neg_log_probs(x: jax.Array, lse_hi: jax.Array, lse_lo: jax.Array) -> jax.Array:
    """``-log p = (hi - x) + lo`` from :meth:`~jxent._common.Normaliser.lse_parts`.

    Written so that XLA:CPU fuses it into the class sums that consume it (no subexpression
    shared with the exponentials, no select). Rows whose ``log_sum`` is ``-inf`` (all
    masked) come out ``+inf`` here; the callers zero those rows after the reduction.
    """
    return (lse_hi - x) + lse_lo


def _gather_then_normalise(
    logits: jax.Array, where: jax.Array | None, targets: lb.Targets, axis_name: Hashable | None
) -> tuple[jax.Array, jax.Array, c.Normaliser, jax.Array]:
    """CPU: the target logit by a gather, then :func:`~jxent._common.exponentials`.

    The gather reads the half-precision logits and converts one value per row. Its
    result also orders the gather before any pass that may overwrite the logits'
    buffer (``read_first``, see :func:`~jxent._common.row_shift`).
    """
    x_y = lb.take(logits, targets.local, targets.in_shard, axis_name)
    x_y = x_y.astype(c.compute_dtype(logits.dtype))
    active_x_y = jnp.where(targets.active, x_y, jnp.full_like(x_y, -jnp.inf))
    x = logits.astype(x_y.dtype)
    e, norm, inverse = c.exponentials(x, where, axis_name, read_first=active_x_y)
    return x_y, e, norm, inverse


def _normalise_and_pick(
    logits: jax.Array, where: jax.Array | None, targets: lb.Targets, axis_name: Hashable | None
) -> tuple[jax.Array, jax.Array, c.Normaliser, jax.Array]:
    """GPU / TPU: the normaliser and the target logit in one pass over the logits.

    The target logit is a third sum of the online reduction (the logit where the class
    id equals the label, else 0): one kernel reads the logits once, where a gather
    fused into another elementwise kernel would count as a second read of the whole
    array (and, on TPU, made XLA store a float32 copy of bf16 logits).
    """
    x = logits.astype(c.compute_dtype(logits.dtype))
    is_target = _target_mask(targets, x.shape[-1]) & targets.in_shard[..., None]
    picked = jnp.where(is_target, x, jnp.zeros_like(x))
    norm, inverse, (x_y,) = c.online_normaliser(x, where, axis_name, sums=(picked,))
    x_y = c.psum_over(x_y, axis_name)
    e = jnp.exp(c.mask(x, where, -jnp.inf) - norm.shift)  # unused: the residual is the logits
    return x_y, e, norm, inverse


def _integer_ce_fwd(
    logits: jax.Array,
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    cfg: _IntegerConfig,
) -> tuple[tuple[jax.Array, jax.Array], tuple[Any, ...]]:
    dtype = c.compute_dtype(logits.dtype)
    num_local = logits.shape[-1]
    targets = _resolve_targets(
        labels, where, weights, cfg.ignore_index, cfg.axis_name, dtype, num_local
    )
    # Only O(batch) values: the target's -log p from the target logit, no log-softmax array.
    x_y, e, norm, inverse = c.on_cpu(
        lambda: _gather_then_normalise(logits, where, targets, cfg.axis_name),
        lambda: _normalise_and_pick(logits, where, targets, cfg.axis_name),
    )
    x = logits.astype(dtype)
    eps = cfg.label_smoothing
    target_nll = norm.log_sum[..., 0] + (norm.shift[..., 0] - x_y)
    loss = (1.0 - eps) * c.weighted(targets.weight, target_nll)
    num_classes = _row_class_count(x, where, cfg.axis_name)
    smoothing_mass = jnp.zeros_like(loss)
    if eps:
        w = jnp.ones((), dtype) if weights is None else weights.astype(dtype)

        def smoothing_terms(w: Any, where: Any, x: Any, lse_hi: Any, lse_lo: Any) -> Any:
            neg_log_p = _neg_log_probs(c.mask(x, where, -jnp.inf), lse_hi, lse_lo)
            return c.mask(w, where, 0.0) * c.capped(neg_log_p)

        spread = c.class_reduce(
            jnp.sum,
            smoothing_terms,
            *(w, where, x, *norm.lse_parts()),
            num_classes=num_local,
            axis_name=cfg.axis_name,
        )[..., 0]
        loss = loss + eps / num_classes * spread
        smoothing_mass = c.class_sum(
            _smoothing_weights(weights, where, x.shape, dtype), cfg.axis_name
        )[..., 0]
    if cfg.z_loss:
        loss = loss + cfg.z_loss * norm.lse()[..., 0] ** 2
    loss = lb.nan_where_bad(targets, jnp.where(targets.active, loss, jnp.zeros_like(loss)))
    # The logits themselves are needed again only for the class-weight gradient's smoothing
    # term; otherwise the exponentials e (the one logits-sized residual) suffice.
    keep_logits = logits if (weights is not None and eps) else None
    residuals = (
        keep_logits,
        c.exponentials_residual(logits, e),
        where,
        weights,
        norm,
        inverse,
        targets,
        target_nll,
        num_classes,
        smoothing_mass,
    )
    return (loss, targets.weight), residuals


def _integer_ce_bwd(
    cfg: _IntegerConfig, residuals: tuple[Any, ...], cotangents: tuple[jax.Array, jax.Array]
) -> tuple[Any, ...]:
    (
        logits,
        saved_e,
        where,
        weights,
        norm,
        inverse,
        targets,
        target_nll,
        num_classes,
        smoothing_mass,
    ) = residuals
    g_loss, g_weight = cotangents
    dtype = norm.shift.dtype
    num_local = saved_e.shape[-1]
    eps = cfg.label_smoothing
    w_y = targets.weight  # already 0 for inactive examples
    coef = lb.nan_where_bad(targets, jnp.where(targets.active, g_loss, jnp.zeros_like(g_loss)))
    # d loss / d x_c = p_c·A - (1-ε)·w_y·[c = y] - (ε/C)·w_c, with A the total target mass.
    mass = (1.0 - eps) * w_y + eps / num_classes * smoothing_mass
    if cfg.z_loss:
        mass = mass + 2.0 * cfg.z_loss * c.finite_or_zero(norm.lse()[..., 0])
    mass = jnp.where(targets.active, mass, jnp.zeros_like(mass))
    p_scale = (coef * mass * inverse[..., 0])[..., None]
    e = c.exponentials_from_residual(saved_e, where, norm)
    grad = e * p_scale
    if eps:
        w = _smoothing_weights(weights, where, e.shape, dtype)
        grad = grad - _expand(coef * eps / num_classes) * w
    grad = _add_at_targets(grad, targets, -coef * (1.0 - eps) * w_y)
    dlogits = grad.astype(saved_e.dtype)

    dweights = None
    if weights is not None:
        # loss_n depends on w through w_y (the NLL term, and the mean's weight) and, with
        # smoothing, on every unmasked w_c.
        # (Inactive rows' target_nll may be infinite: zeroed first, so 0·inf never forms.)
        nll = jnp.where(targets.active, target_nll, jnp.zeros_like(target_nll))
        per_example = jnp.where(
            targets.active, coef * (1.0 - eps) * nll + g_weight, jnp.zeros_like(coef)
        )
        dw = _scatter_to_classes(per_example, targets, num_local, dtype)
        if eps:
            spread = c.mask(_neg_log_probs(logits.astype(dtype), *norm.lse_parts()), where, 0.0)
            dw = dw + _batch_sum(_expand(coef * eps / num_classes) * spread)
        dweights = sh.sum_to_primal(dw, weights).astype(weights.dtype)
    return dlogits, None, None, dweights


_integer_ce_impl.defvjp(_integer_ce_fwd, _integer_ce_bwd)


# ----------------------------------------------------------------------------- dense labels


class _DenseConfig(NamedTuple):
    label_smoothing: float
    z_loss: float
    axis_name: Hashable | None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dense_ce_impl(
    logits: jax.Array,
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    cfg: _DenseConfig,
) -> tuple[jax.Array, jax.Array]:
    return _dense_ce_fwd(logits, labels, where, weights, cfg)[0]


def _smoothed_weighted_targets(
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    num_classes: Any,
    cfg: _DenseConfig,
    dtype: Any,
) -> jax.Array:
    """``w_c·t'_c`` with ``t' = (1-ε)·t + ε/C``, 0 on masked classes.

    Elementwise: ``num_classes`` is a scalar or keeps its class axis (``[..., 1]``).
    """
    t = labels.astype(dtype)
    eps = cfg.label_smoothing
    if eps:
        t = (1.0 - eps) * t + eps / num_classes
    if weights is not None:
        t = t * weights.astype(dtype)
    return c.mask(t, where, 0.0)


def _dense_ce_fwd(
    logits: jax.Array,
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    cfg: _DenseConfig,
) -> tuple[tuple[jax.Array, jax.Array], tuple[Any, ...]]:
    dtype = c.compute_dtype(logits.dtype)
    x = logits.astype(dtype)
    e, norm, inverse = c.exponentials(x, where, cfg.axis_name)
    num_classes = _row_class_count(x, where, cfg.axis_name)

    def targets(labels: Any, where: Any, weights: Any, num_classes: Any) -> Any:
        return _smoothed_weighted_targets(labels, where, weights, num_classes, cfg, dtype)

    def loss_terms(*args: Any) -> Any:
        *target_args, x, lse_hi, lse_lo = args
        neg_log_p = _neg_log_probs(c.mask(x, args[1], -jnp.inf), lse_hi, lse_lo)
        # 0·log 0 = 0: a class with no target mass contributes nothing, even at x_c = -inf.
        return targets(*target_args) * c.capped(neg_log_p)

    target_args = (labels, where, weights, _expand(num_classes))
    reduce = functools.partial(
        c.class_reduce, jnp.sum, num_classes=x.shape[-1], axis_name=cfg.axis_name
    )
    loss = reduce(loss_terms, *target_args, x, *norm.lse_parts())[..., 0]
    mass = reduce(targets, *target_args)[..., 0]
    if cfg.z_loss:
        loss = loss + cfg.z_loss * norm.lse()[..., 0] ** 2
    row_valid = (
        jnp.ones(loss.shape, bool) if where is None else c.class_any(where, cfg.axis_name)[..., 0]
    )
    # A counted row whose logits are all -inf has no log-probabilities: NaN, as in the
    # integer CE (the capped class sum alone would give mass · 3.4e38).
    loss = c.nan_where(row_valid & jnp.isneginf(norm.log_sum[..., 0]), loss)
    loss = jnp.where(row_valid, loss, jnp.zeros_like(loss))
    if c.block_size(x.shape[-1]):
        # Long rows: the backward pass recomputes e from the logits and can write the
        # gradient over them. + min(|loss|, 0) is +0 (NaN only for a NaN loss, whose row's
        # gradient is NaN anyway), a data dependency that makes XLA finish the loss' read of
        # the logits first instead of copying them (see c.row_shift). Short rows keep e,
        # and the gradient overwrites e instead.
        mass = mass + jnp.minimum(jnp.abs(loss), 0.0)
    residuals = (
        logits,
        c.exponentials_residual(logits, e),
        labels,
        where,
        weights,
        norm,
        inverse,
        mass,
        num_classes,
        row_valid,
    )
    return (loss, row_valid.astype(dtype)), residuals


def _dense_ce_bwd(
    cfg: _DenseConfig, residuals: tuple[Any, ...], cotangents: tuple[jax.Array, jax.Array]
) -> tuple[Any, ...]:
    logits, e, labels, where, weights, norm, inverse, mass, num_classes, row_valid = residuals
    g_loss, _ = cotangents  # the example weight (row valid or not) is piecewise constant
    dtype = norm.shift.dtype
    coef = jnp.where(row_valid, g_loss, jnp.zeros_like(g_loss))[..., None]
    wt = _smoothed_weighted_targets(labels, where, weights, _expand(num_classes), cfg, dtype)
    if cfg.z_loss:
        mass = mass + 2.0 * cfg.z_loss * c.finite_or_zero(norm.lse()[..., 0])
    p_scale = coef * (mass * inverse[..., 0])[..., None]
    e = c.exponentials_from_residual(e, where, norm)
    dlogits = (e * p_scale - coef * wt).astype(logits.dtype)
    # d loss / d t_c = (1-ε)·w_c·(-log p_c): the negative log-probability, for distillation.
    # (XLA drops this computation when the labels' gradient is not used.)
    neg_log_p = c.mask(_neg_log_probs(logits.astype(dtype), *norm.lse_parts()), where, 0.0)
    w = jnp.ones((), dtype) if weights is None else weights.astype(dtype)
    dlabels = (coef * (1.0 - cfg.label_smoothing) * w * neg_log_p).astype(labels.dtype)
    dweights = None
    if weights is not None:
        t = _smoothed_weighted_targets(labels, where, None, _expand(num_classes), cfg, dtype)
        dw = _batch_sum(coef * c.weighted(t, neg_log_p))
        dweights = sh.sum_to_primal(dw, weights).astype(weights.dtype)
    return dlogits, dlabels, None, dweights


_dense_ce_impl.defvjp(_dense_ce_fwd, _dense_ce_bwd)


# ----------------------------------------------------------------------------- NLL


class _NLLConfig(NamedTuple):
    ignore_index: int | None
    axis_name: Hashable | None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _nll_impl(
    log_probs: jax.Array,
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    cfg: _NLLConfig,
) -> tuple[jax.Array, jax.Array]:
    return _nll_fwd(log_probs, labels, where, weights, cfg)[0]


def _nll_fwd(
    log_probs: jax.Array,
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    cfg: _NLLConfig,
) -> tuple[tuple[jax.Array, jax.Array], tuple[Any, ...]]:
    dtype = c.compute_dtype(log_probs.dtype)
    num_local = log_probs.shape[-1]
    targets = _resolve_targets(
        labels, where, weights, cfg.ignore_index, cfg.axis_name, dtype, num_local
    )
    # Gather, then convert one value per row: converting first made XLA:TPU store a float32
    # copy of bfloat16 log-probabilities (1,000 MiB of temporaries at 8192 x 32000).
    lp_y = lb.take(log_probs, targets.local, targets.in_shard, cfg.axis_name).astype(dtype)
    loss = jnp.where(targets.active, -targets.weight * lp_y, jnp.zeros_like(lp_y))
    loss = lb.nan_where_bad(targets, loss)
    return (loss, targets.weight), (log_probs, weights, targets, lp_y)


def _nll_bwd(
    cfg: _NLLConfig, residuals: tuple[Any, ...], cotangents: tuple[jax.Array, jax.Array]
) -> tuple[Any, ...]:
    log_probs, weights, targets, lp_y = residuals
    g_loss, g_weight = cotangents
    num_local = log_probs.shape[-1]
    coef = lb.nan_where_bad(targets, jnp.where(targets.active, g_loss, jnp.zeros_like(g_loss)))
    is_target = _target_mask(targets, num_local)
    scale = (-coef * targets.weight)[..., None]
    dlog_probs = jnp.where(is_target, scale, jnp.zeros_like(scale))
    # A row with an invalid label has no target entry to carry its NaN: mark the whole row.
    dlog_probs = lb.nan_where_bad(targets, dlog_probs).astype(log_probs.dtype)
    dweights = None
    if weights is not None:
        per_example = -coef * lp_y + jnp.where(targets.active, g_weight, 0.0)
        dw = _scatter_to_classes(per_example, targets, num_local, lp_y.dtype)
        dweights = sh.sum_to_primal(dw, weights).astype(weights.dtype)
    return dlog_probs, None, None, dweights


_nll_impl.defvjp(_nll_fwd, _nll_bwd)


# ----------------------------------------------------------------------------- public API


class _Prepared(NamedTuple):
    layout: c.ClassLayout
    logits: jax.Array
    where: jax.Array | None
    weights: jax.Array | None


def _prepare(
    logits: ArrayLike,
    axis: c.Axis,
    where: ArrayLike | None,
    class_weights: ArrayLike | None,
    reduction: str,
    axis_name: Hashable | None,
    name: str = "logits",
) -> _Prepared:
    c.check_reduction(reduction)
    c.check_axis_name(axis_name)
    x = c.as_floating(logits, name)
    layout = c.ClassLayout(x.shape, c.canonical_axes(axis, x.ndim))
    weights = c.class_weights_vector(class_weights, layout.num_classes, c.compute_dtype(x.dtype))
    return _Prepared(
        layout, layout.to_last(x), c.broadcast_where(where, layout, per_example=True), weights
    )


def _run_sharded(
    impl: Any, cfg: Any, prepared: _Prepared, labels: jax.Array, labels_kind: str
) -> tuple[jax.Array, jax.Array]:
    """``impl(logits, labels, where, weights, cfg)``: per example losses and weights.

    Logits sharded over explicit mesh axes are handled shard by shard (see
    :mod:`jxent._sharding`), their class axis with the ``axis_name`` collectives.
    """
    plan = sh.plan(prepared.logits)
    if plan is None:
        return impl(prepared.logits, labels, prepared.where, prepared.weights, cfg)
    cfg = cfg._replace(axis_name=plan.axis_name)
    args = (
        (prepared.logits, sh.LOGITS),
        (labels, labels_kind),
        (prepared.where, sh.LOGITS),
        (prepared.weights, sh.CLASSES),
    )
    return sh.map_shards(lambda *a: impl(*a, cfg), plan, args, (sh.BATCH, sh.BATCH))


def _as_array(value: ArrayLike, name: str) -> jax.Array:
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name} must be an array (or nested sequence of numbers): {error}"
        ) from None


def _labels_need_traced_check(
    inputs: ArrayLike, labels: ArrayLike, axis: c.Axis, ignore_index: int | None
) -> bool:
    """``check_labels=True`` outside ``jax.jit``: concrete labels are checked now (a
    ``ValueError`` naming the first bad one); returns whether a traced (checkify) check is
    still needed, i.e. whether the labels are traced."""
    if isinstance(labels, jax.core.Tracer):
        return True
    shape = np.shape(inputs)
    num_classes = c.ClassLayout(shape, c.canonical_axes(axis, len(shape))).num_classes
    lb.check_in_range(jnp.asarray(labels), num_classes, ignore_index)
    return False


def _integer_labels(
    labels: ArrayLike, layout: c.ClassLayout, ignore_index: int | None
) -> jax.Array:
    labels = c.as_integer_labels(labels)
    if labels.shape != layout.batch_shape:
        raise ValueError(
            f"integer labels must have the logits' shape without the class axes, "
            f"{layout.batch_shape} (logits {layout.shape}, class axes {layout.axes}); "
            f"got labels of shape {labels.shape}."
        )
    return lb.widen(labels, ignore_index)


_INTEGER_STATIC = (
    "axis",
    "ignore_index",
    "label_smoothing",
    "z_loss",
    "reduction",
    "check_labels",
    "axis_name",
)


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: Literal["none", "sum", "mean"] = "none",
    check_labels: bool = False,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy with integer labels, with a hand-written gradient.

    With ``lp = log_softmax(logits)``, class weights ``w`` (all 1 by default), smoothing
    ``ε`` over the row's ``C`` classes and z-loss coefficient ``ζ``:

    .. math::
        \ell_n = (1-\varepsilon)\,w_{y_n}\,(-lp_{n,y_n})
                 + \frac{\varepsilon}{C} \sum_c w_c\,(-lp_{n,c})
                 + \zeta\,\operatorname{lse}(x_n)^2,
        \qquad
        \frac{\partial \ell_n}{\partial x_{n,c}} = p_{n,c}\,A_n
                 - (1-\varepsilon)\,w_{y_n}[c = y_n] - \frac{\varepsilon}{C} w_c,

    with :math:`A_n = (1-\varepsilon) w_{y_n} + \frac{\varepsilon}{C}\sum_c w_c
    + 2\zeta\,\operatorname{lse}(x_n)`. This is PyTorch's
    ``torch.nn.functional.cross_entropy(logits, labels, weight=w, ignore_index=...,
    label_smoothing=ε, reduction=...)`` in value and gradient, plus the z-loss: with
    ``reduction="mean"`` the sum is divided by :math:`\sum_n w_{y_n}` over non-ignored
    examples. One deliberate difference: a mean over zero total weight is 0 (PyTorch: NaN)
    when no counted label is invalid; an invalid label makes the mean and sum NaN.

    Positional parameters match :func:`optax.softmax_cross_entropy_with_integer_labels`.

    Args:
      logits: floating ``[..., C]`` unnormalised log-probabilities.
      labels: integer class ids of the logits' shape without the class axes. Any integer
        dtype. An id outside ``[0, C)`` that is not ``ignore_index``, or one pointing at a
        class masked out by ``where``, gives a NaN loss for its example (never wrapped).
      axis: class axis, or tuple of axes (a label is then a flat index into them, as optax).
      where: boolean mask broadcastable to ``logits`` (or of the labels' shape, one flag per
        example); masked classes take no part, and a row masked out entirely gives loss 0,
        gradient 0 and no weight in the mean.
      class_weights: ``[C]`` per-class weights (PyTorch's ``weight``); differentiable.
      ignore_index: a label value whose examples give loss 0 and no weight in the mean.
      label_smoothing: ``ε`` in ``[0, 1]``.
      z_loss: ``ζ >= 0``.
      reduction: ``"none"`` (per-example losses), ``"sum"`` or ``"mean"`` (weighted).
      check_labels: also verify every label. Eagerly, a bad label raises ``ValueError``
        naming it; under ``jax.jit`` this adds a ``jax.experimental.checkify`` check, so wrap
        the jitted function in ``checkify.checkify`` and call ``err.throw()``.
      axis_name: vocabulary parallelism inside :func:`jax.shard_map`: the mesh axis over
        which the class axis (and ``class_weights``) is sharded; labels are global ids.

    Returns:
      float32 losses (float64 for float64 logits) of the labels' shape, or a scalar.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jxent
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([0, 1])
      >>> loss = jxent.softmax_cross_entropy_with_integer_labels(logits, labels)
      >>> print(np.asarray(loss).round(4))
      [0.2761 2.9518]
      >>> jax.grad(jxent.softmax_cross_entropy_with_integer_labels)(
      ...     jnp.array([0.0, 0.0]), jnp.array(1))  # softmax - one_hot
      Array([ 0.5, -0.5], dtype=float32)

    Note:
      Reverse mode only (a ``jax.custom_vjp``): ``jax.jvp`` and ``jax.jacfwd`` raise
      ``TypeError: can't apply forward-mode autodiff (jvp) to a custom_vjp function``. Use
      ``jax.jacrev`` for Jacobians and ``jax.hessian`` (forward over reverse, which works
      because the backward rule is differentiable) or ``jax.jacrev(jax.jacrev(f))`` for
      Hessians.

    References:
      Chowdhery et al., `PaLM <https://arxiv.org/abs/2204.02311>`_, 2022 (z-loss);
      Szegedy et al., `Rethinking the Inception Architecture
      <https://arxiv.org/abs/1512.00567>`_, 2016 (label smoothing).
    """
    check_labels = check_labels and _labels_need_traced_check(logits, labels, axis, ignore_index)
    return _integer_ce(
        logits,
        labels,
        where,
        class_weights,
        axis=axis,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
        check_labels=check_labels,
        axis_name=axis_name,
    )


@c.jit_with_static(*_INTEGER_STATIC)
def _integer_ce(
    logits: ArrayLike,
    labels: ArrayLike,
    where: ArrayLike | None,
    class_weights: ArrayLike | None,
    *,
    axis: c.Axis,
    ignore_index: int | None,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
    check_labels: bool,
    axis_name: Hashable | None,
) -> jax.Array:
    c.check_ignore_index(ignore_index)
    cfg = _IntegerConfig(
        ignore_index,
        c.check_unit_interval(label_smoothing, "label_smoothing"),
        c.check_nonnegative(z_loss, "z_loss"),
        axis_name,
    )
    prepared = _prepare(logits, axis, where, class_weights, reduction, axis_name)
    if check_labels and axis_name is None:
        lb.check_in_range(labels, prepared.layout.num_classes, ignore_index)
    int_labels = _integer_labels(labels, prepared.layout, ignore_index)
    loss, weight = _run_sharded(_integer_ce_impl, cfg, prepared, int_labels, sh.BATCH)
    return c.reduce_loss(loss, weight, reduction)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    class_weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: Literal["none", "sum", "mean"] = "none",
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy with probability (dense) targets, with a hand-written gradient.

    With ``lp = log_softmax(logits)``, smoothed targets :math:`t' = (1-\varepsilon)t +
    \varepsilon/C`, class weights ``w`` and z-loss coefficient ``ζ``:

    .. math::
        \ell_n = -\sum_c w_c\,t'_{n,c}\,lp_{n,c} + \zeta\,\operatorname{lse}(x_n)^2,
        \qquad
        \frac{\partial \ell_n}{\partial x_{n,c}} = p_{n,c}\Big(\sum_k w_k t'_{n,k}
            + 2\zeta\operatorname{lse}(x_n)\Big) - w_c t'_{n,c},
        \qquad
        \frac{\partial \ell_n}{\partial t_{n,c}} = -(1-\varepsilon)\,w_c\,lp_{n,c}.

    PyTorch's ``cross_entropy`` with class-probability targets in value and gradient
    (``reduction="mean"`` divides by the number of examples, the weights do not enter the
    denominator), plus the z-loss; with ``where``, rows masked out entirely count for
    nothing. Unlike PyTorch and optax, a class with zero target mass contributes 0 even
    where its logit is ``-inf`` (``0·log 0 = 0``). The targets get a gradient too, for
    distillation.

    Positional parameters match :func:`optax.softmax_cross_entropy`.

    Args:
      logits: floating ``[..., C]`` unnormalised log-probabilities.
      labels: target probabilities, broadcastable to ``logits``.
      axis: class axis or tuple of axes.
      where: boolean mask broadcastable to ``logits`` (or one flag per example).
      class_weights: ``[C]`` per-class weights.
      label_smoothing: ``ε`` in ``[0, 1]``.
      z_loss: ``ζ >= 0``.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      axis_name: vocabulary parallelism inside :func:`jax.shard_map` (see
        :func:`softmax_cross_entropy_with_integer_labels`).

    Returns:
      float32 losses (float64 for float64 logits) of the batch shape, or a scalar.

    Example:
      >>> import jax.numpy as jnp, numpy as np, jxent
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print(np.asarray(jxent.softmax_cross_entropy(logits, labels)).round(4))
      [0.2761 2.9518]

    Note:
      Reverse mode only (a ``jax.custom_vjp``): ``jax.jvp`` and ``jax.jacfwd`` raise
      ``TypeError: can't apply forward-mode autodiff (jvp) to a custom_vjp function``. Use
      ``jax.jacrev`` for Jacobians and ``jax.hessian`` (forward over reverse, which works
      because the backward rule is differentiable) or ``jax.jacrev(jax.jacrev(f))`` for
      Hessians.
    """
    return _softmax_cross_entropy(
        logits=logits,
        labels=labels,
        axis=axis,
        where=where,
        class_weights=class_weights,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
        axis_name=axis_name,
    )


@c.jit_with_static("axis", "label_smoothing", "z_loss", "reduction", "axis_name")
def _softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    class_weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: Literal["none", "sum", "mean"] = "none",
    axis_name: Hashable | None = None,
) -> jax.Array:
    cfg = _DenseConfig(
        c.check_unit_interval(label_smoothing, "label_smoothing"),
        c.check_nonnegative(z_loss, "z_loss"),
        axis_name,
    )
    prepared = _prepare(logits, axis, where, class_weights, reduction, axis_name)
    targets = c.as_floating(labels, "labels (dense targets)")
    try:
        targets = jnp.broadcast_to(targets, prepared.layout.shape)
    except ValueError:
        raise ValueError(
            f"dense labels of shape {targets.shape} are not broadcastable to the logits' "
            f"shape {prepared.layout.shape}."
        ) from None
    targets = prepared.layout.to_last(targets)
    loss, weight = _run_sharded(_dense_ce_impl, cfg, prepared, targets, sh.LOGITS)
    return c.reduce_loss(loss, weight, reduction)


def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
    check_labels: bool = False,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Negative log-likelihood of integer labels under given log-probabilities.

    .. math::
        \ell_n = -w_{y_n}\,lp_{n,y_n},
        \qquad \frac{\partial \ell_n}{\partial lp_{n,c}} = -w_{y_n}[c = y_n].

    PyTorch's ``torch.nn.functional.nll_loss`` in value and gradient: ``reduction="mean"``
    divides by :math:`\sum_n w_{y_n}` over non-ignored examples (0 when there are none).
    ``cross_entropy(x, y)`` equals ``nll_loss(log_softmax(x), y)``.

    Args:
      log_probs: floating ``[..., C]`` log-probabilities (e.g. from :func:`log_softmax`).
      labels: integer class ids of the input's shape without the class axes; invalid ids
        give NaN (see :func:`softmax_cross_entropy_with_integer_labels`).
      axis: class axis or tuple of axes.
      where: boolean mask broadcastable to ``log_probs`` (or one flag per example).
      class_weights: ``[C]`` per-class weights.
      ignore_index: a label value whose examples give loss 0 and no weight in the mean.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      check_labels: verify every label (see
        :func:`softmax_cross_entropy_with_integer_labels`).
      axis_name: vocabulary parallelism inside :func:`jax.shard_map`.

    Returns:
      float32 losses (float64 for float64 inputs) of the labels' shape, or a scalar.

    Example:
      >>> import jax.numpy as jnp, jxent
      >>> jxent.nll_loss(jnp.log(jnp.array([[0.25, 0.75]])), jnp.array([1]))
      Array([0.2877], dtype=float32)
    """
    check_labels = check_labels and _labels_need_traced_check(log_probs, labels, axis, ignore_index)
    return _nll(
        log_probs,
        labels,
        where,
        class_weights,
        axis=axis,
        ignore_index=ignore_index,
        reduction=reduction,
        check_labels=check_labels,
        axis_name=axis_name,
    )


@c.jit_with_static("axis", "ignore_index", "reduction", "check_labels", "axis_name")
def _nll(
    log_probs: ArrayLike,
    labels: ArrayLike,
    where: ArrayLike | None,
    class_weights: ArrayLike | None,
    *,
    axis: c.Axis,
    ignore_index: int | None,
    reduction: str,
    check_labels: bool,
    axis_name: Hashable | None,
) -> jax.Array:
    c.check_ignore_index(ignore_index)
    prepared = _prepare(log_probs, axis, where, class_weights, reduction, axis_name, "log_probs")
    if check_labels and axis_name is None:
        lb.check_in_range(labels, prepared.layout.num_classes, ignore_index)
    int_labels = _integer_labels(labels, prepared.layout, ignore_index)
    cfg = _NLLConfig(ignore_index, axis_name)
    loss, weight = _run_sharded(_nll_impl, cfg, prepared, int_labels, sh.BATCH)
    return c.reduce_loss(loss, weight, reduction)


def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: Literal["none", "sum", "mean"] = "mean",
    check_labels: bool = False,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy that picks its form from the labels' dtype; mean by default.

    .. math::
        \ell_n = -\sum_c w_c\,t_{n,c}\,\log\operatorname{softmax}(x_n)_c

    Integer ``labels`` go to :func:`softmax_cross_entropy_with_integer_labels` (``t`` is
    one-hot), floating ones to :func:`softmax_cross_entropy` (``t`` are probabilities);
    every keyword means what it means there. This is the function to put under
    ``jax.grad``, like PyTorch's ``torch.nn.functional.cross_entropy``.

    Args:
      logits: floating ``[..., C]`` unnormalised log-probabilities.
      labels: integer class ids, or target probabilities.
      axis: class axis or tuple of axes.
      where: boolean mask (see :func:`softmax_cross_entropy_with_integer_labels`).
      class_weights: ``[C]`` per-class weights.
      ignore_index: integer labels only.
      label_smoothing: ``ε`` in ``[0, 1]``.
      z_loss: ``ζ >= 0``.
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
      check_labels: integer labels only; see
        :func:`softmax_cross_entropy_with_integer_labels`.
      axis_name: vocabulary parallelism inside :func:`jax.shard_map`.

    Returns:
      The reduced loss (float32, or float64 for float64 logits), or per-example losses.

    Example:
      >>> import jax, jax.numpy as jnp, jxent
      >>> logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
      >>> jxent.cross_entropy(logits, jnp.array([0, 1]))
      Array(0.2395, dtype=float32)
      >>> jax.grad(jxent.cross_entropy)(logits, jnp.array([0, 1])).shape
      (2, 3)
    """
    labels = _as_array(labels, "labels")
    label_dtype = labels.dtype
    if jnp.issubdtype(label_dtype, jnp.integer):
        return softmax_cross_entropy_with_integer_labels(
            logits,
            labels,
            axis,
            where,
            class_weights=class_weights,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            reduction=reduction,
            check_labels=check_labels,
            axis_name=axis_name,
        )
    if not jnp.issubdtype(label_dtype, jnp.floating):
        raise TypeError(
            f"labels must be integer class ids or floating probabilities, got dtype {label_dtype}."
        )
    if ignore_index is not None:
        raise ValueError(
            f"ignore_index={ignore_index} applies to integer labels; got floating labels."
        )
    if check_labels:
        raise ValueError("check_labels=True applies to integer labels; got floating labels.")
    if labels.shape != np.shape(logits):
        # PyTorch reads floating labels as probabilities only when they have the input's
        # shape; broadcasting class ids given as floats would silently compute another loss.
        raise ValueError(
            f"floating labels are read as class probabilities and must have the logits' "
            f"shape {np.shape(logits)}; got labels of shape {labels.shape} and dtype "
            f"{label_dtype}. For class ids, pass integers (e.g. labels.astype(jnp.int32)); "
            f"for broadcast probabilities, use jxent.softmax_cross_entropy."
        )
    return softmax_cross_entropy(
        logits,
        labels,
        axis,
        where,
        class_weights=class_weights,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
        axis_name=axis_name,
    )
