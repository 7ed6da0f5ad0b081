"""The ``custom_vjp`` kernels of the cross-entropy losses (integer and dense labels, NLL).

The public functions are in :mod:`jxent._cross_entropy`; here is one ``custom_vjp``,
:func:`label_loss`, whose static ``Config.kind`` picks the forward and backward rules of one
loss (integer labels, dense labels, NLL), on class-last arrays.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jxent import (
    _aux_outputs,
    _dtypes,
    _elementwise,
    _labels,
    _loss_reduction,
    _normaliser,
    _reductions,
    _sharding,
    _symbolic_zeros,
)


class Config(NamedTuple):
    """Static options of one call (the custom_vjp's ``nondiff_argnums``)."""

    kind: str  # "integer", "dense" or "nll": which loss, i.e. which forward and backward rules
    axis_name: Hashable | None
    ignore_index: int | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    temperature: float = 1.0
    return_aux: bool = False


# ----------------------------------------------------------------------------- targets


def _resolve_targets(
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    ignore_index: int | None,
    axis_name: Hashable | None,
    dtype: Any,
    num_local: int,
) -> _labels.Targets:
    """Labels against ``num_local`` classes, masked by ``where``: a row masked out entirely
    does not count, and a label pointing at a masked-out class is invalid."""
    return _labels.resolve(
        labels,
        num_local=num_local,
        axis_name=axis_name,
        ignore_index=ignore_index,
        class_weights=weights,
        dtype=dtype,
        counted=None if where is None else _reductions.class_any(where, axis_name)[..., 0],
        allowed=where,
    )


def _target_mask(targets: _labels.Targets, num_local: int) -> jax.Array:
    """Boolean ``[..., C]`` "this is the target class"; an iota compare that XLA fuses."""
    classes = jax.lax.broadcasted_iota(
        targets.local.dtype, (*targets.local.shape, num_local), targets.local.ndim
    )
    return classes == targets.local[..., None]


def _add_at_targets(values: jax.Array, targets: _labels.Targets, amounts: jax.Array) -> jax.Array:
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

    return _reductions.on_cpu(scatter, compare)


def _scatter_to_classes(
    values: jax.Array, targets: _labels.Targets, num_local: int, dtype: Any
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
        return _loss_reduction.global_num_classes(x.shape[-1], axis_name)
    # At least 1: a fully masked row counts for nothing, and ε/0 = inf would turn the zeros
    # that mask it (0·inf) into NaN in its gradient and in the class-weight gradient.
    return jnp.maximum(_reductions.class_sum(where.astype(jnp.int32), axis_name)[..., 0], 1)


def _expand(x: Any) -> Any:
    return x[..., None] if isinstance(x, jax.Array) else x


def _scaled(logits: jax.Array, dtype: Any, temperature: float) -> jax.Array:
    """``logits / T`` in the compute dtype: an elementwise conversion that XLA fuses into
    the reductions reading it (half-precision logits are still read as such)."""
    x = logits.astype(dtype)
    return x if temperature == 1.0 else x * (1.0 / temperature)


# ----------------------------------------------------------------------------- aux outputs
# The per-row statistics of ``return_aux=True`` (see :mod:`jxent._aux_outputs`), computed
# from the normaliser a kernel already has; nothing here runs without ``return_aux``.


# Below the log of the smallest nonzero exponential (exp underflows to 0 past -746 even in
# float64), yet small enough that a coefficient times it cannot overflow.
_LOG_OF_ZERO = -(2.0**20)


def _shifted(x: Any, where: Any, shift: Any) -> Any:
    """``x - shift``, floored at :data:`_LOG_OF_ZERO` (masked and ``-inf`` entries too), so
    that ``exp(x - shift)`` times it, or times a multiple of it, is 0 there, never
    ``0·(-inf)``: the floor changes no entry whose exponential is nonzero. A ``maximum``,
    not a select, so that XLA:CPU fuses it into the class sums."""
    return jnp.maximum(_elementwise.mask(x, where, -jnp.inf) - shift, _LOG_OF_ZERO)


def _entropy(
    x: jax.Array,
    e: jax.Array,
    where: jax.Array | None,
    norm: _normaliser.Normaliser,
    inverse: jax.Array,
    axis_name: Hashable | None,
) -> jax.Array:
    """``H = Σ p·(-log p)`` per row (one more class sum); 0 for empty rows.

    Short rows, whose exponentials ``e = exp(x - shift)`` the normaliser stored: from
    ``-log p = log_sum - log e``, ``H = log_sum - (1 / Σ e)·Σ e·log e``, a class sum that
    reads ``e`` alone (each further operand, like ``x``, costs XLA:CPU's reduction
    (YNNPACK) about another pass over the row). Both terms are non-negative (``e ≤ 1``):
    no cancellation, and ``log e`` is within a rounding of ``x - shift``; ``e`` is floored
    at the smallest normal float so that a zero (masked, ``-inf``) entry gives
    ``0·log(tiny) = 0``. Long rows, whose ``e`` is never stored: :func:`_entropy_from_logits`.
    """
    if _reductions.block_size(x.shape[-1]) is not None:
        return _entropy_from_logits(x, where, norm, inverse, axis_name)
    tiny = jnp.finfo(e.dtype).tiny
    e_log_e = _reductions.class_sum(e * jnp.log(jnp.maximum(e, tiny)), axis_name)
    entropy = norm.log_sum - inverse * e_log_e
    return jnp.where(jnp.isneginf(norm.log_sum), jnp.zeros_like(entropy), entropy)[..., 0]


def _entropy_from_logits(
    x: jax.Array,
    where: jax.Array | None,
    norm: _normaliser.Normaliser,
    inverse: jax.Array,
    axis_name: Hashable | None,
) -> jax.Array:
    """``H = (1 / Σ e)·Σ e·(hi - x) + lo`` per row, with ``-log p = (hi - x) + lo``
    (:meth:`~jxent._normaliser.Normaliser.lse_parts`): non-negative terms, no
    cancellation; 0 for empty rows (``hi = inf``, ``lo = 0``).

    For long rows, whose blocked class sums make ``e = exp(x - shift)`` again block by
    block: ``hi - x`` capped so that a masked or ``-inf`` entry's ``0·inf`` is 0, and
    ``lo`` added after the sum: the fewest elementwise operations and broadcast operands,
    each of which costs XLA:CPU's reduction (YNNPACK) about a pass over the row. ``hi``
    rather than the shift: XLA:CPU would materialise the broadcast shift (a clamp, which
    YNNPACK lacks) as a logits-sized array."""
    hi, lo = norm.lse_parts()

    def terms(x: Any, where: Any, shift: Any, hi: Any) -> Any:
        x = _elementwise.mask(x, where, -jnp.inf)
        return jnp.exp(x - shift) * _elementwise.capped(hi - x)

    spread = _reductions.class_reduce(
        jnp.sum, terms, x, where, norm.shift, hi, num_classes=x.shape[-1], axis_name=axis_name
    )
    return (inverse * spread + lo)[..., 0]


def _first_argmax(
    x: jax.Array, where: jax.Array | None, top: jax.Array, axis_name: Hashable | None
) -> jax.Array:
    """The global id of the first class where ``x`` (masked) reaches the row's global
    maximum ``top`` (keepdims), as ``jnp.argmax``; 0 for rows that have none (all masked
    or ``-inf``). One max over ``C - c`` at the hits, blocked like the other class sums.

    The scores are floats where they are exact (``C ≤ 2**24``): XLA:CPU reduces them in
    its vectorised reduction, where an int32 max became a chain of reduce-windows."""
    num_local = x.shape[-1]
    exact = isinstance(num_local, int) and num_local <= 2**24
    dtype = x.dtype if exact else jnp.int32
    ids = jnp.arange(num_local, dtype=dtype)

    def score(x: Any, where: Any, top: Any, ids: Any) -> Any:
        hit = _elementwise.mask(x, where, -jnp.inf) >= top
        return hit.astype(dtype) * (num_local - ids)

    found_at = _reductions.class_reduce(jnp.max, score, x, where, top, ids, num_classes=num_local)[
        ..., 0
    ]
    found = found_at > 0
    local_max = jnp.where(found, top[..., 0], -jnp.inf)
    first = jnp.where(found, num_local - found_at, jnp.zeros((), dtype)).astype(jnp.int32)
    return _aux_outputs.global_argmax(local_max, first, axis_name, num_local)


def _first_argmax_in_chunks(
    x: jax.Array,
    where: jax.Array | None,
    maxima: jax.Array,
    top: jax.Array,
    axis_name: Hashable | None,
) -> jax.Array:
    """As :func:`_first_argmax`, from the row's :func:`~jxent._reductions.chunk_maxima`
    (those the normaliser's max pass made; see
    :func:`~jxent._aux_outputs.first_argmax_in_chunks`): no pass over the whole row."""
    found, first = _aux_outputs.first_argmax_in_chunks(x, where, maxima, top)
    local_max = jnp.where(found, top[..., 0], -jnp.inf)
    return _aux_outputs.global_argmax(local_max, first, axis_name, x.shape[-1])


def _logits_argmax(
    x: jax.Array,
    where: jax.Array | None,
    norm: _normaliser.Normaliser,
    axis_name: Hashable | None,
    maxima: jax.Array | None = None,
) -> jax.Array:
    """Argmax from the normaliser's row max (clipped to the finite floats: a row holding
    ``+inf``, whose ``log_sum`` is ``+inf``, is compared with ``+inf`` instead), found
    through the chunk ``maxima`` when given (see :func:`_first_argmax_in_chunks`)."""
    top = jnp.where(norm.log_sum == jnp.inf, jnp.full_like(norm.shift, jnp.inf), norm.shift)
    if maxima is not None:
        return _first_argmax_in_chunks(x, where, maxima, top, axis_name)
    return _first_argmax(x, where, top, axis_name)


def _cpu_row_stats(
    x: jax.Array,
    e: jax.Array,
    where: jax.Array | None,
    norm: _normaliser.Normaliser,
    inverse: jax.Array,
    axis_name: Hashable | None,
    maxima: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """CPU: ``(entropy, argmax)`` of each row of the (scaled) logits ``x``: a class sum
    after the normaliser's two passes, and the argmax from its max pass's chunk ``maxima``.
    (On GPU and TPU they come from the normaliser's own pass:
    :func:`~jxent._normaliser.online_normaliser_aux`.)"""
    entropy = _entropy(x, e, where, norm, inverse, axis_name)
    return entropy, _logits_argmax(x, where, norm, axis_name, maxima)


def _exponentials_and_stats(
    x: jax.Array, where: jax.Array | None, axis_name: Hashable | None
) -> tuple[jax.Array, _normaliser.Normaliser, jax.Array, tuple[jax.Array, jax.Array]]:
    """:func:`~jxent._normaliser.exponentials` and each row's ``(entropy, argmax)``."""

    def cpu() -> Any:
        maxima = _reductions.chunk_maxima(x, where)
        e, norm, inverse = _normaliser.exponentials(x, where, axis_name, maxima=maxima)
        return e, norm, inverse, _cpu_row_stats(x, e, where, norm, inverse, axis_name, maxima)

    def accelerator() -> Any:
        norm, inverse, _, stats = _normaliser.online_normaliser_aux(x, where, axis_name)
        e = jnp.exp(_elementwise.mask(x, where, -jnp.inf) - norm.shift)  # a formula only
        return e, norm, inverse, (stats.entropy, stats.argmax)

    return _reductions.on_cpu(cpu, accelerator)


def _softmax_factor(
    p_scale: jax.Array,
    x: jax.Array | None,
    where: jax.Array | None,
    norm: _normaliser.Normaliser,
    inverse: jax.Array,
    entropy: jax.Array | None,
    stat_cotangents: Any,
    inv_t: float,
) -> jax.Array:
    """What multiplies ``e = exp(x - shift)`` in the logits' gradient: the loss's
    ``p_scale`` plus, with ``return_aux``, the aux outputs' share

        d(g_lse·lse + g_H·H)/dz_c = p_c·(g_lse - g_H·(log p_c + H)),   z = x / T,

    with ``log p_c = (z_c - shift) - log_sum`` (the caller multiplies by ``e``, not ``p``,
    so ``inverse`` enters here). ``x``: the scaled logits, None without ``return_aux``;
    ``stat_cotangents``: those of ``(lse, entropy)``, None when both are symbolic zeros (aux
    outputs that are only logged: no term, and no pass over the logits, for them)."""
    if x is None or entropy is None or stat_cotangents is None:
        return p_scale
    g_lse, g_entropy = (jnp.asarray(g, norm.shift.dtype) for g in stat_cotangents)
    log_sum = norm.log_sum[..., 0]
    log_sum = jnp.where(jnp.isneginf(log_sum), jnp.zeros_like(log_sum), log_sum)
    row = inverse * (inv_t * (g_lse - g_entropy * (entropy - log_sum)))[..., None]
    per_class = inverse * (inv_t * g_entropy)[..., None]
    return p_scale + row - per_class * _shifted(x, where, norm.shift)


# ----------------------------------------------------------------------------- integer labels


def _smoothing_weights(
    weights: jax.Array | None, where: jax.Array | None, shape: tuple[int, ...], dtype: Any
) -> jax.Array:
    """``w_c`` broadcast over the batch, 0 on masked classes: where the smoothing mass goes."""
    w = jnp.ones((), dtype) if weights is None else weights.astype(dtype)
    return _elementwise.mask(jnp.broadcast_to(w, shape), where, 0.0)


def _neg_log_probs(x: jax.Array, lse_hi: jax.Array, lse_lo: jax.Array) -> jax.Array:
    """``-log p = (hi - x) + lo`` from :meth:`~jxent._normaliser.Normaliser.lse_parts`.

    Written so that XLA:CPU fuses it into the class sums that consume it (no subexpression
    shared with the exponentials, no select). Rows whose ``log_sum`` is ``-inf`` (all
    masked) come out ``+inf`` here; the callers zero those rows after the reduction.
    """
    return (lse_hi - x) + lse_lo


# (target logit, exponentials, normaliser, 1 / Σ e, (entropy, argmax) or ())
_Normalised = tuple[jax.Array, jax.Array, _normaliser.Normaliser, jax.Array, tuple[Any, ...]]


def _gather_then_normalise(
    logits: jax.Array, where: jax.Array | None, targets: _labels.Targets, cfg: Config
) -> _Normalised:
    """CPU: the target logit by a gather, then :func:`~jxent._normaliser.exponentials`
    (and with ``cfg.return_aux`` each row's entropy and argmax, see :func:`_cpu_row_stats`).

    The gather reads the half-precision logits and converts one value per row. Its
    result also orders the gather before any pass that may overwrite the logits'
    buffer (``read_first``, see :func:`~jxent._reductions.row_shift`).
    """
    axis_name = cfg.axis_name
    x_y = _labels.take(logits, targets.local, targets.in_shard, axis_name)
    x_y = _scaled(x_y, _dtypes.compute_dtype(logits.dtype), cfg.temperature)
    active_x_y = jnp.where(targets.active, x_y, jnp.full_like(x_y, -jnp.inf))
    x = _scaled(logits, x_y.dtype, cfg.temperature)
    maxima = _reductions.chunk_maxima(x, where) if cfg.return_aux else None
    e, norm, inverse = _normaliser.exponentials(
        x, where, axis_name, read_first=active_x_y, maxima=maxima
    )
    stats = _cpu_row_stats(x, e, where, norm, inverse, axis_name, maxima) if cfg.return_aux else ()
    return x_y, e, norm, inverse, stats


def _normalise_and_pick(
    logits: jax.Array, where: jax.Array | None, targets: _labels.Targets, cfg: Config
) -> _Normalised:
    """GPU / TPU: the normaliser and the target logit in one pass over the logits (with
    ``cfg.return_aux`` also each row's entropy and argmax, in the same pass).

    The target logit is a third sum of the online reduction (the logit where the class
    id equals the label, else 0): one kernel reads the logits once, where a gather
    fused into another elementwise kernel would count as a second read of the whole
    array (and, on TPU, made XLA store a float32 copy of bf16 logits).
    """
    axis_name = cfg.axis_name
    x = _scaled(logits, _dtypes.compute_dtype(logits.dtype), cfg.temperature)
    is_target = _target_mask(targets, x.shape[-1]) & targets.in_shard[..., None]
    picked = jnp.where(is_target, x, jnp.zeros_like(x))
    stats: tuple[jax.Array, ...] = ()
    if cfg.return_aux:
        norm, inverse, (x_y,), online = _normaliser.online_normaliser_aux(
            x, where, axis_name, sums=(picked,)
        )
        stats = (online.entropy, online.argmax)
    else:
        norm, inverse, (x_y,) = _normaliser.online_normaliser(x, where, axis_name, sums=(picked,))
    x_y = _loss_reduction.psum_over(x_y, axis_name)
    e = jnp.exp(
        _elementwise.mask(x, where, -jnp.inf) - norm.shift
    )  # unused: the residual is the logits
    return x_y, e, norm, inverse, stats


def _integer_ce_fwd(
    logits: jax.Array,
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    cfg: Config,
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    dtype = _dtypes.compute_dtype(logits.dtype)
    num_local = logits.shape[-1]
    targets = _resolve_targets(
        labels, where, weights, cfg.ignore_index, cfg.axis_name, dtype, num_local
    )
    # Only O(batch) values: the target's -log p from the target logit, no log-softmax array.
    args = (logits, where, targets, cfg)
    x_y, e, norm, inverse, stats = _reductions.on_cpu(
        lambda: _gather_then_normalise(*args), lambda: _normalise_and_pick(*args)
    )
    x = _scaled(logits, dtype, cfg.temperature)
    eps = cfg.label_smoothing
    target_nll = norm.log_sum[..., 0] + (norm.shift[..., 0] - x_y)
    loss = (1.0 - eps) * _elementwise.weighted(targets.weight, target_nll)
    num_classes = _row_class_count(x, where, cfg.axis_name)
    smoothing_mass = jnp.zeros_like(loss)
    if eps:
        w = jnp.ones((), dtype) if weights is None else weights.astype(dtype)

        def smoothing_terms(w: Any, where: Any, x: Any, lse_hi: Any, lse_lo: Any) -> Any:
            neg_log_p = _neg_log_probs(_elementwise.mask(x, where, -jnp.inf), lse_hi, lse_lo)
            return _elementwise.mask(w, where, 0.0) * _elementwise.capped(neg_log_p)

        spread = _reductions.class_reduce(
            jnp.sum,
            smoothing_terms,
            *(w, where, x, *norm.lse_parts()),
            num_classes=num_local,
            axis_name=cfg.axis_name,
        )[..., 0]
        loss = loss + eps / num_classes * spread
        smoothing_mass = _reductions.class_sum(
            _smoothing_weights(weights, where, x.shape, dtype), cfg.axis_name
        )[..., 0]
    if cfg.z_loss:
        loss = loss + cfg.z_loss * norm.lse()[..., 0] ** 2
    loss = _labels.nan_where_bad(targets, jnp.where(targets.active, loss, jnp.zeros_like(loss)))
    outputs: tuple[Any, ...] = (loss, targets.weight)
    entropy = None
    if cfg.return_aux:
        entropy, argmax = stats
        correct = _aux_outputs.correct_predictions(argmax, labels, targets)
        outputs = (*outputs, (norm.lse()[..., 0], entropy, argmax, correct, targets.active))
        inverse = _aux_outputs.after(stats, inverse)
    # The logits themselves are needed again only for the class-weight gradient's smoothing
    # term and the entropy's gradient; otherwise the exponentials e (the one logits-sized
    # residual) suffice.
    keep_logits = logits if (weights is not None and eps) or cfg.return_aux else None
    residuals = (
        keep_logits,
        _normaliser.exponentials_residual(logits, e),
        where,
        weights,
        norm,
        inverse,
        targets,
        target_nll,
        num_classes,
        smoothing_mass,
        entropy,
    )
    return outputs, residuals


def _integer_ce_bwd(
    cfg: Config, residuals: tuple[Any, ...], cotangents: tuple[Any, ...]
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
        entropy,
    ) = residuals
    g_loss, g_weight, g_stats = _split_cotangents(cotangents, cfg)
    dtype = norm.shift.dtype
    num_local = saved_e.shape[-1]
    eps = cfg.label_smoothing
    inv_t = 1.0 / cfg.temperature  # d(x / T)/dx: every logits term carries it
    w_y = targets.weight  # already 0 for inactive examples
    coef = _labels.nan_where_bad(targets, jnp.where(targets.active, g_loss, jnp.zeros_like(g_loss)))
    # d loss / d x_c = p_c·A - (1-ε)·w_y·[c = y] - (ε/C)·w_c, with A the total target mass.
    mass = (1.0 - eps) * w_y + eps / num_classes * smoothing_mass
    if cfg.z_loss:
        mass = mass + 2.0 * cfg.z_loss * _elementwise.finite_or_zero(norm.lse()[..., 0])
    mass = jnp.where(targets.active, mass, jnp.zeros_like(mass))
    coef_x = coef * inv_t
    p_scale = (coef_x * mass * inverse[..., 0])[..., None]
    e = _normaliser.exponentials_from_residual(saved_e, where, norm, inv_t)
    x = None if entropy is None else _scaled(logits, dtype, cfg.temperature)
    grad = e * _softmax_factor(p_scale, x, where, norm, inverse, entropy, g_stats, inv_t)
    if eps:
        w = _smoothing_weights(weights, where, e.shape, dtype)
        grad = grad - _expand(coef_x * eps / num_classes) * w
    grad = _add_at_targets(grad, targets, -coef_x * (1.0 - eps) * w_y)
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
            spread = _elementwise.mask(
                _neg_log_probs(_scaled(logits, dtype, cfg.temperature), *norm.lse_parts()),
                where,
                0.0,
            )
            dw = dw + _batch_sum(_expand(coef * eps / num_classes) * spread)
        dweights = _sharding.sum_to_primal(dw, weights).astype(weights.dtype)
    return dlogits, None, None, dweights


# ----------------------------------------------------------------------------- dense labels


def _smoothed_weighted_targets(
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    num_classes: Any,
    cfg: Config,
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
    return _elementwise.mask(t, where, 0.0)


def _dense_ce_fwd(
    logits: jax.Array,
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    cfg: Config,
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    dtype = _dtypes.compute_dtype(logits.dtype)
    x = _scaled(logits, dtype, cfg.temperature)
    if cfg.return_aux:
        e, norm, inverse, stats = _exponentials_and_stats(x, where, cfg.axis_name)
    else:
        e, norm, inverse = _normaliser.exponentials(x, where, cfg.axis_name)
    num_classes = _row_class_count(x, where, cfg.axis_name)

    def targets(labels: Any, where: Any, weights: Any, num_classes: Any) -> Any:
        return _smoothed_weighted_targets(labels, where, weights, num_classes, cfg, dtype)

    def loss_terms(*args: Any) -> Any:
        *target_args, x, lse_hi, lse_lo = args
        neg_log_p = _neg_log_probs(_elementwise.mask(x, args[1], -jnp.inf), lse_hi, lse_lo)
        # 0·log 0 = 0: a class with no target mass contributes nothing, even at x_c = -inf.
        return targets(*target_args) * _elementwise.capped(neg_log_p)

    target_args = (labels, where, weights, _expand(num_classes))
    reduce = functools.partial(
        _reductions.class_reduce, jnp.sum, num_classes=x.shape[-1], axis_name=cfg.axis_name
    )
    loss = reduce(loss_terms, *target_args, x, *norm.lse_parts())[..., 0]
    mass = reduce(targets, *target_args)[..., 0]
    if cfg.z_loss:
        loss = loss + cfg.z_loss * norm.lse()[..., 0] ** 2
    row_valid = (
        jnp.ones(loss.shape, bool)
        if where is None
        else _reductions.class_any(where, cfg.axis_name)[..., 0]
    )
    # A counted row whose logits are all -inf has no log-probabilities: NaN, as in the
    # integer CE (the capped class sum alone would give mass · 3.4e38).
    loss = _elementwise.nan_where(row_valid & jnp.isneginf(norm.log_sum[..., 0]), loss)
    loss = jnp.where(row_valid, loss, jnp.zeros_like(loss))
    if _reductions.block_size(x.shape[-1]):
        # Long rows: the backward pass recomputes e from the logits and can write the
        # gradient over them. + min(|loss|, 0) is +0 (NaN only for a NaN loss, whose row's
        # gradient is NaN anyway), a data dependency that makes XLA finish the loss' read of
        # the logits first instead of copying them (see _reductions.row_shift). Short rows keep e,
        # and the gradient overwrites e instead.
        mass = mass + jnp.minimum(jnp.abs(loss), 0.0)
    outputs: tuple[Any, ...] = (loss, row_valid.astype(dtype))
    entropy = None
    if cfg.return_aux:
        entropy, argmax = stats
        inverse = _aux_outputs.after(stats, inverse)
        lse = norm.lse()[..., 0]
        t = labels.astype(dtype)
        top = _reductions.class_max(_elementwise.mask(t, where, -jnp.inf), cfg.axis_name)
        correct = (argmax == _first_argmax(t, where, top, cfg.axis_name)) & row_valid
        outputs = (*outputs, (lse, entropy, argmax, correct, row_valid))
    residuals = (
        logits,
        _normaliser.exponentials_residual(logits, e),
        labels,
        where,
        weights,
        norm,
        inverse,
        mass,
        num_classes,
        row_valid,
        entropy,
    )
    return outputs, residuals


def _dense_ce_bwd(
    cfg: Config, residuals: tuple[Any, ...], cotangents: tuple[Any, ...]
) -> tuple[Any, ...]:
    (logits, e, labels, where, weights, norm, inverse, mass, num_classes, row_valid, entropy) = (
        residuals
    )
    # The example weight (row valid or not) is piecewise constant: its cotangent is unused.
    g_loss, _, g_stats = _split_cotangents(cotangents, cfg)
    dtype = norm.shift.dtype
    inv_t = 1.0 / cfg.temperature  # d(x / T)/dx: every logits term carries it
    coef = jnp.where(row_valid, g_loss, jnp.zeros_like(g_loss))[..., None]
    wt = _smoothed_weighted_targets(labels, where, weights, _expand(num_classes), cfg, dtype)
    if cfg.z_loss:
        mass = mass + 2.0 * cfg.z_loss * _elementwise.finite_or_zero(norm.lse()[..., 0])
    p_scale = coef * inv_t * (mass * inverse[..., 0])[..., None]
    e = _normaliser.exponentials_from_residual(e, where, norm, inv_t)
    x = _scaled(logits, dtype, cfg.temperature)
    factor = _softmax_factor(
        p_scale, None if entropy is None else x, where, norm, inverse, entropy, g_stats, inv_t
    )
    dlogits = (e * factor - (coef * inv_t) * wt).astype(logits.dtype)
    # d loss / d t_c = (1-ε)·w_c·(-log p_c): the negative log-probability, for distillation.
    # (XLA drops this computation when the labels' gradient is not used.)
    neg_log_p = _elementwise.mask(_neg_log_probs(x, *norm.lse_parts()), where, 0.0)
    w = jnp.ones((), dtype) if weights is None else weights.astype(dtype)
    dlabels = (coef * (1.0 - cfg.label_smoothing) * w * neg_log_p).astype(labels.dtype)
    dweights = None
    if weights is not None:
        t = _smoothed_weighted_targets(labels, where, None, _expand(num_classes), cfg, dtype)
        dw = _batch_sum(coef * _elementwise.weighted(t, neg_log_p))
        dweights = _sharding.sum_to_primal(dw, weights).astype(weights.dtype)
    return dlogits, dlabels, None, dweights


# ----------------------------------------------------------------------------- NLL


def _nll_fwd(
    log_probs: jax.Array,
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    cfg: Config,
) -> tuple[tuple[jax.Array, jax.Array], tuple[Any, ...]]:
    dtype = _dtypes.compute_dtype(log_probs.dtype)
    num_local = log_probs.shape[-1]
    targets = _resolve_targets(
        labels, where, weights, cfg.ignore_index, cfg.axis_name, dtype, num_local
    )
    # Gather, then convert one value per row: converting first made XLA:TPU store a float32
    # copy of bfloat16 log-probabilities (1,000 MiB of temporaries at 8192 x 32000).
    lp_y = _labels.take(log_probs, targets.local, targets.in_shard, cfg.axis_name).astype(dtype)
    loss = jnp.where(targets.active, -targets.weight * lp_y, jnp.zeros_like(lp_y))
    loss = _labels.nan_where_bad(targets, loss)
    return (loss, targets.weight), (log_probs, weights, targets, lp_y)


def _nll_bwd(
    cfg: Config, residuals: tuple[Any, ...], cotangents: tuple[jax.Array, jax.Array]
) -> tuple[Any, ...]:
    log_probs, weights, targets, lp_y = residuals
    g_loss, g_weight, _ = _split_cotangents(cotangents, cfg)
    num_local = log_probs.shape[-1]
    coef = _labels.nan_where_bad(targets, jnp.where(targets.active, g_loss, jnp.zeros_like(g_loss)))
    is_target = _target_mask(targets, num_local)
    scale = (-coef * targets.weight)[..., None]
    dlog_probs = jnp.where(is_target, scale, jnp.zeros_like(scale))
    # A row with an invalid label has no target entry to carry its NaN: mark the whole row.
    dlog_probs = _labels.nan_where_bad(targets, dlog_probs).astype(log_probs.dtype)
    dweights = None
    if weights is not None:
        per_example = -coef * lp_y + jnp.where(targets.active, g_weight, 0.0)
        dw = _scatter_to_classes(per_example, targets, num_local, lp_y.dtype)
        dweights = _sharding.sum_to_primal(dw, weights).astype(weights.dtype)
    return dlog_probs, None, None, dweights


# ----------------------------------------------------------------------------- the custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def label_loss(
    logits: jax.Array,
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    cfg: Config,
) -> tuple[Any, ...]:
    """``(loss, weight)`` per example of the loss ``cfg.kind`` names, on class-last arrays.

    With ``cfg.return_aux`` (integer and dense labels) a third output ``(lse, entropy,
    argmax, correct, counted)`` (see :mod:`jxent._aux_outputs`); for dense labels
    ``correct`` compares with the targets' argmax. The log-probabilities of ``"nll"`` come as
    ``logits``."""
    return _fwd(logits, labels, where, weights, cfg)[0]


def _fwd(
    logits: jax.Array,
    labels: jax.Array,
    where: jax.Array | None,
    weights: jax.Array | None,
    cfg: Config,
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    forward, _ = _RULES[cfg.kind]
    return forward(logits, labels, where, weights, cfg)


def _fwd_rule(
    logits: Any, labels: Any, where: Any, weights: Any, cfg: Config
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """:func:`_fwd` on the arrays (``symbolic_zeros=True`` wraps each in a record)."""
    logits, labels, where, weights = _symbolic_zeros.primal_values((logits, labels, where, weights))
    return _fwd(logits, labels, where, weights, cfg)


def _split_cotangents(cotangents: tuple[Any, ...], cfg: Config) -> tuple[Any, Any, Any]:
    """``(g_loss, g_weight, g_stats)`` as arrays (zeros for symbolic zeros); ``g_stats``:
    the cotangents of the aux outputs ``(lse, entropy)``, None without ``return_aux`` or
    when both are symbolic zeros."""
    g_loss, g_weight = (_symbolic_zeros.dense(g) for g in cotangents[:2])
    if not cfg.return_aux:
        return g_loss, g_weight, None
    g_lse, g_entropy = cotangents[2][:2]
    if _symbolic_zeros.is_zero(g_lse) and _symbolic_zeros.is_zero(g_entropy):
        return g_loss, g_weight, None
    return g_loss, g_weight, (_symbolic_zeros.dense(g_lse), _symbolic_zeros.dense(g_entropy))


def _bwd(cfg: Config, residuals: tuple[Any, ...], cotangents: tuple[Any, ...]) -> tuple[Any, ...]:
    _, backward = _RULES[cfg.kind]
    return backward(cfg, residuals, cotangents)


_RULES: dict[str, tuple[Any, Any]] = {
    "integer": (_integer_ce_fwd, _integer_ce_bwd),
    "dense": (_dense_ce_fwd, _dense_ce_bwd),
    "nll": (_nll_fwd, _nll_bwd),
}
# Symbolic zeros: the aux outputs' share of the gradient is skipped when they are only logged.
label_loss.defvjp(_fwd_rule, _bwd, symbolic_zeros=True)
