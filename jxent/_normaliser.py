"""The log-normaliser ``log Σ exp(x)`` and the exponentials, per platform.

On CPU a max pass then a sum of exponentials (:func:`exponentials`); on GPU and
TPU one pass (:func:`online_normaliser`, Milakov & Gimelshein's online normaliser).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jxent import _aux_outputs
from jxent._elementwise import mask, safe_reciprocal
from jxent._reductions import (
    block_size,
    class_reduce,
    class_sum,
    gpu_block_size,
    on_cpu,
    padded_blocks,
    platform_dependent,
    row_shift,
)


class Normaliser(NamedTuple):
    """``log Σ exp(x)`` over the last axis, kept as ``shift + log_sum`` (both keepdims).

    Keeping the two parts apart is what makes huge logits exact: for ``x = [3e38, 3e38]``,
    ``shift + log_sum`` rounds to ``3e38`` in float32, but the log-probabilities
    ``(x - shift) - log_sum = -log 2`` are exact.
    """

    shift: jax.Array  # the row max clipped to the finite floats, constant under autodiff
    log_sum: jax.Array  # log Σ exp(x - shift); -inf for an empty (all -inf / masked) row

    def lse(self) -> jax.Array:
        return self.shift + self.log_sum

    def lse_parts(self) -> tuple[jax.Array, jax.Array]:
        """``lse`` as an unevaluated sum ``hi + lo``: ``hi`` rounded, ``lo`` its exact error.

        For ``-log p = (hi - x) + lo``: as accurate as ``log_sum + (shift - x)`` (exact for
        ``x = [3e38, 3e38]``), but consumers see one broadcast per part rather than the
        shift, whose broadcast XLA:CPU would otherwise materialise as a logits-sized array
        shared with the exponentials. (Knuth's TwoSum.)

        On empty rows (``log_sum = -inf``) the parts are ``(+inf, 0)``: every ``-log p``
        there is ``+inf`` and ``exp(x - hi)`` is 0, never the NaN of ``-inf - (-inf)``,
        which ``jax.debug_nans`` would report for a fully masked row. Callers zero such
        rows after the reduction.
        """
        empty = jnp.isneginf(self.log_sum)
        log_sum = jnp.where(empty, jnp.zeros_like(self.log_sum), self.log_sum)
        hi = self.shift + log_sum
        b = hi - self.shift
        lo = (self.shift - (hi - b)) + (log_sum - b)
        return jnp.where(empty, jnp.full_like(hi, jnp.inf), hi), lo

    def log_probs(self, x: jax.Array) -> jax.Array:
        """``x - lse``; ``-inf`` (not NaN) on rows whose entries are all ``-inf``.

        ``(x - hi) - lo`` rather than ``(x - shift) - log_sum``: as exact, and it shares no
        logits-sized subexpression with the exponentials, which XLA would materialise.
        """
        empty = jnp.isneginf(self.log_sum)  # all -inf: log p = x - shift = -inf, not NaN
        log_sum = jnp.where(empty, jnp.zeros_like(self.log_sum), self.log_sum)
        hi, lo = Normaliser(self.shift, log_sum).lse_parts()
        return (x - hi) - lo


def log_normaliser(
    x: jax.Array,
    where: jax.Array | None = None,
    axis_name: Hashable | None = None,
    maxima: jax.Array | None = None,
) -> Normaliser:
    """The log-normaliser of ``x`` (masked by ``where``) over its last axis.

    The shift by the row max is held constant under autodiff: the result does not depend
    on it, and a non-finite max (an all ``-inf`` row) is replaced by 0 so that such a row
    gives ``-inf`` rather than NaN. The forward rules of the ``custom_vjp`` functions use
    this, and their outer derivatives (``grad`` of ``grad``) differentiate through it.
    ``maxima``: see :func:`exponentials`.
    """
    return exponentials(x, where, axis_name, maxima=maxima)[1]


def exponentials(
    x: jax.Array,
    where: jax.Array | None = None,
    axis_name: Hashable | None = None,
    *,
    read_first: jax.Array | None = None,
    maxima: jax.Array | None = None,
) -> tuple[jax.Array, Normaliser, jax.Array]:
    """``e = exp(x - shift)`` (0 where masked), the :class:`Normaliser` and ``1 / Σ e``.

    ``e · (1 / Σ e)`` is the softmax; ``1 / Σ e`` is 0 for an empty row (so that its zeros
    stay zeros) and NaN stays NaN.

    On CPU, a max pass then a sum of exponentials. The losses keep ``e`` for their backward
    pass: on CPU recomputing the exponentials costs more than storing them, and XLA writes
    the gradient over ``e`` in place, so no extra memory is held. For long rows everything
    is computed on the blocked view (see :func:`class_reduce`). ``read_first`` (see
    :func:`row_shift`) orders a gather from ``x`` before the passes that may overwrite
    ``x``'s buffer. ``maxima`` (CPU): ``x``'s
    :func:`~jxent._reductions.chunk_maxima`, from which the row max is taken.

    On GPU and TPU the normaliser comes from one pass over ``x`` (see
    :func:`online_normaliser`) and ``e`` is only a formula: the callers save the logits
    there (see :func:`exponentials_residual`), so XLA drops it.
    """

    def exp_shifted(x: Any, where: Any, shift: Any) -> Any:
        return jnp.exp(mask(x, where, -jnp.inf) - shift)

    def two_pass() -> tuple[jax.Array, Normaliser, jax.Array]:
        shift = row_shift(x, where, axis_name, read_first=read_first, maxima=maxima)
        e = exp_shifted(x, where, shift)
        if block_size(x.shape[-1]) is None:
            total = jnp.sum(e, axis=-1, keepdims=True)
        else:
            # Long rows: the sum recomputes the exponentials block by block (on CPU); the
            # callers then drop e (see exponentials_residual), so it is never materialised.
            total = class_reduce(jnp.sum, exp_shifted, x, where, shift, num_classes=x.shape[-1])
        if axis_name is not None:
            total = lax.psum(total, axis_name)
        return e, Normaliser(shift, jnp.log(total)), safe_reciprocal(total)

    def online() -> tuple[jax.Array, Normaliser, jax.Array]:
        norm, inverse, _ = online_normaliser(x, where, axis_name)
        return exp_shifted(x, where, norm.shift), norm, inverse

    return on_cpu(two_pass, online)


def _online_combine(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Merges two partial ``(max m, Σ exp(x - m), *sums)`` of the same row.

    The smaller partial is rescaled to the larger max with one exponential,
    ``exp(min - max) ≤ 1``; equal maxima (including two ``±inf``, whose difference would
    be NaN) are merged unscaled. A NaN max stays NaN (``maximum`` propagates it).
    """
    (m1, s1, *rest1), (m2, s2, *rest2) = a, b
    top, _, scale = _merge_maxima(m1, m2)
    total = jnp.where(m1 >= m2, s1 + s2 * scale, s1 * scale + s2)
    return (top, total, *(r1 + r2 for r1, r2 in zip(rest1, rest2, strict=True)))


def _merge_maxima(m1: jax.Array, m2: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The merged max, ``gap = smaller - larger`` (0 for equal maxima, including two
    ``±inf``) and ``exp(gap)``."""
    top = jnp.maximum(m1, m2)
    gap = jnp.where(m1 == m2, jnp.zeros_like(m1), jnp.minimum(m1, m2) - top)
    return top, gap, jnp.exp(gap)


def _lagged(gap: jax.Array) -> jax.Array:
    """``exp(gap)·(-gap)``: what rebasing a partial spread to a max ``-gap`` higher adds
    per unit of its sum; 0, never ``0·inf``, for an empty partial (``gap = -inf``)."""
    return jnp.exp(gap) * jnp.minimum(-gap, jnp.finfo(gap.dtype).max)


def _online_combine_aux(
    a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]
) -> tuple[jax.Array, ...]:
    """:func:`_online_combine` of ``(max m, Σ exp(x - m), spread, index, *sums)``, for the
    cross-entropies' ``return_aux``: ``spread = Σ exp(x - m)·(m - x)`` (rebased to the
    merged max like the sum: the entropy is ``log_sum + spread / Σ exp(x - m)``) and the
    first index of the max (the lower one of equal maxima, whatever the merge order)."""
    (m1, s1, w1, i1, *rest1), (m2, s2, w2, i2, *rest2) = a, b
    top, gap, scale = _merge_maxima(m1, m2)
    lagged = _lagged(gap)
    first = m1 >= m2
    total = jnp.where(first, s1 + s2 * scale, s1 * scale + s2)
    spread = jnp.where(first, w1 + scale * w2 + lagged * s2, scale * w1 + lagged * s1 + w2)
    index = jnp.where(m1 == m2, jnp.minimum(i1, i2), jnp.where(first, i1, i2))
    rest = (r1 + r2 for r1, r2 in zip(rest1, rest2, strict=True))
    return (top, total, spread, index, *rest)


def _online_reduce(operands: Sequence[jax.Array], aux: bool = False) -> list[jax.Array]:
    """:func:`_online_combine` over the last axis of ``(x, ones, *sums)`` (with ``aux``,
    :func:`_online_combine_aux` over ``(x, ones, zeros, class ids, *sums)``).

    On GPU a long row (> :data:`GPU_ROW`) is first reduced in blocks (see
    :func:`gpu_block_size`), then the ``[..., ceil(C / b)]`` partials: XLA:GPU splits a
    longer row reduction in two kernels itself, but with ``[..., 128]`` partial arrays per
    output that together outlive a buffer XLA can reuse (8 MiB of temporaries at
    8192 x 32000; the blocks' partials are 200 KiB). On TPU the row stays whole: its
    tiled layout would turn the block reshape into a copy, and XLA:TPU reduces long rows
    in one kernel.
    """
    last = operands[0].ndim - 1
    dtype = operands[0].dtype
    inits = tuple(np.asarray(v, dtype) for v in (-jnp.inf, *(0.0 for _ in operands[1:])))
    combine = _online_combine
    if aux:  # the class ids start from the largest int32: any id is lower
        ids = np.asarray(np.iinfo(np.int32).max, np.int32)
        inits = (*inits[:3], ids, *inits[4:])
        combine = _online_combine_aux

    def whole() -> list[jax.Array]:
        return list(lax.reduce(tuple(operands), inits, combine, (last,)))

    num_classes = operands[0].shape[-1]
    block = gpu_block_size(num_classes)
    if block is None:
        return whole()

    def blocked() -> list[jax.Array]:
        # Padding with the identity (-inf, 0, 0, ...) leaves each row's result unchanged.
        views = tuple(padded_blocks(a, block, v) for a, v in zip(operands, inits, strict=True))
        partial = lax.reduce(views, inits, combine, (last + 1,))
        return list(lax.reduce(tuple(partial), inits, combine, (last,)))

    return platform_dependent(cuda=blocked, rocm=blocked, default=whole)


@jax.custom_jvp
def _online_stats(x: jax.Array, ones: jax.Array, *sums: jax.Array) -> list[jax.Array]:
    """``(max m, Σ exp(x - m), *row sums)`` over the last axis (see :func:`_online_reduce`).

    A ``custom_jvp``: JAX's own derivative of a custom reduction is a pairwise tree of the
    combiner that reverse mode cannot transpose (``grad`` of ``grad`` failed with "reshape
    of a Zero"); here the tangents are plain class sums, linear and transposable.
    """
    return _online_reduce((x, ones, *sums))


@_online_stats.defjvp
def _online_stats_jvp(
    primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]
) -> tuple[list[jax.Array], list[jax.Array]]:
    # The max is held constant (zero tangent): m + log Σ exp(x - m) does not depend on it,
    # and Σ exp(x - m) then moves by Σ exp(x - m)·dx. An empty row (m = -inf) has no
    # exponentials, and its finite stand-in for m gives exp(-inf) = 0, never NaN.
    x, _, *_ = primals
    dx, _, *dsums = tangents
    top, total, *row_sums = _online_stats(*primals)
    finite_top = jnp.where(jnp.isfinite(top), top, jnp.zeros_like(top))
    e = jnp.exp(x - finite_top[..., None])
    dtotal = class_sum(e * dx)[..., 0]
    return [top, total, *row_sums], [
        jnp.zeros_like(top),
        dtotal,
        *(class_sum(d)[..., 0] for d in dsums),
    ]


@jax.custom_jvp
def _online_stats_aux(
    x: jax.Array, ones: jax.Array, zeros: jax.Array, ids: jax.Array, *sums: jax.Array
) -> list[jax.Array]:
    """``(max m, Σ exp(x - m), Σ exp(x - m)·(m - x), first argmax, *row sums)`` (see
    :func:`_online_combine_aux`); a ``custom_jvp`` for the reason :func:`_online_stats` is."""
    return _online_reduce((x, ones, zeros, ids, *sums), aux=True)


@_online_stats_aux.defjvp
def _online_stats_aux_jvp(
    primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]
) -> tuple[list[jax.Array], list[Any]]:
    # As _online_stats_jvp, m held constant; the spread moves by Σ e·((m - x) - 1)·dx, its
    # (m - x) capped so that a masked entry's e = 0 times it is 0. The argmax has none.
    x, *_ = primals
    dx, _, _, _, *dsums = tangents
    top, total, spread, index, *row_sums = _online_stats_aux(*primals)
    finite_top = jnp.where(jnp.isfinite(top), top, jnp.zeros_like(top))[..., None]
    e = jnp.exp(x - finite_top)
    lag = jnp.minimum(finite_top - x, jnp.finfo(x.dtype).max)
    tangent_sums = (class_sum(t)[..., 0] for t in (e * dx, e * (lag - 1.0) * dx, *dsums))
    dtotal, dspread, *dplain = tangent_sums
    dindex = np.zeros(index.shape, jax.dtypes.float0)
    primal_out = [top, total, spread, index, *row_sums]
    return primal_out, [jnp.zeros_like(top), dtotal, dspread, dindex, *dplain]


class OnlineAux(NamedTuple):
    """Per-row statistics of :func:`online_normaliser_aux` (over the global row)."""

    entropy: jax.Array  # -Σ p log p; 0 for an empty row
    argmax: jax.Array  # int32 global id of the first maximum; 0 for an empty row
    top: jax.Array  # the row's maximum; -inf for an empty row


def online_normaliser(
    x: jax.Array,
    where: jax.Array | None = None,
    axis_name: Hashable | None = None,
    sums: Sequence[jax.Array] = (),
) -> tuple[Normaliser, jax.Array, list[jax.Array]]:
    """The :class:`Normaliser`, ``1 / Σ exp(x - shift)`` and row sums of ``sums``, in one
    pass over ``x`` (Milakov & Gimelshein's online softmax normaliser).

    One variadic reduction carries the running max and the sum of exponentials relative
    to it (see :func:`_online_combine`), plus the plain sums of each ``[..., C]`` array in
    ``sums`` (e.g. the target logit, picked by a compare with the labels). XLA's GPU and
    TPU emitters turn it into one kernel that reads ``x`` once, where a max pass and then
    a sum-of-exponentials pass read it twice; half-precision ``x`` is converted inside the
    kernel, never stored as float32.

    Same values as the CPU form of :func:`exponentials`: the shift is the row max clipped to the
    finite floats (constant under autodiff), ``log_sum = log Σ exp(x - shift)`` is ``-inf``
    on empty rows and ``+inf`` on rows holding ``+inf``. ``log_sum`` is differentiable
    (see :func:`_online_stats`), for ``grad`` of ``grad`` and ``jax.hessian``.
    """
    norm, inverse, row_sums, _ = _online(x, where, axis_name, sums, aux=False)
    return norm, inverse, row_sums


def online_normaliser_aux(
    x: jax.Array,
    where: jax.Array | None = None,
    axis_name: Hashable | None = None,
    sums: Sequence[jax.Array] = (),
) -> tuple[Normaliser, jax.Array, list[jax.Array], OnlineAux]:
    """:func:`online_normaliser` and, from the same pass over ``x``, each row's entropy
    and argmax (see :func:`_online_combine_aux`), for the cross-entropies' ``return_aux``."""
    norm, inverse, row_sums, aux = _online(x, where, axis_name, sums, aux=True)
    assert aux is not None
    return norm, inverse, row_sums, aux


def _online(
    x: jax.Array,
    where: jax.Array | None,
    axis_name: Hashable | None,
    sums: Sequence[jax.Array],
    aux: bool,
) -> tuple[Normaliser, jax.Array, list[jax.Array], OnlineAux | None]:
    xm = mask(x, where, -jnp.inf)
    dtype = xm.dtype
    operands = (xm, jnp.ones_like(xm), *(jnp.asarray(v, dtype) for v in sums))
    if aux:
        ids = lax.broadcasted_iota(jnp.int32, xm.shape, xm.ndim - 1)
        top, total, spread, index, *row_sums = _online_stats_aux(
            xm, operands[1], jnp.zeros_like(xm), ids, *operands[2:]
        )
    else:
        top, total, *row_sums = _online_stats(*operands)
    local_top = top
    if axis_name is not None:
        global_top = lax.pmax(top, axis_name)
        local_gap = jnp.where(top == global_top, jnp.zeros_like(top), top - global_top)
        if aux:  # each shard's spread rebased to the global max (see _online_combine_aux)
            spread = lax.psum(jnp.exp(local_gap) * spread + _lagged(local_gap) * total, axis_name)
        total = lax.psum(total * jnp.exp(local_gap), axis_name)
        top = global_top
    stats = None
    if aux:
        # H = Σ p·(lse - x) = Σ p·(top - x) + log_sum, both sums relative to top.
        entropy = jnp.log(total) + spread * safe_reciprocal(total)
        entropy = jnp.where(jnp.isneginf(top), jnp.zeros_like(top), entropy)
        argmax = _aux_outputs.global_argmax(local_top, index, axis_name, xm.shape[-1])
        stats = OnlineAux(entropy, argmax, top)
    finfo = jnp.finfo(dtype)
    shift = lax.stop_gradient(jnp.clip(top, finfo.min, finfo.max))
    # total · exp(top - shift) = Σ exp(x - shift): 0 on an empty row (top = -inf), +inf on
    # one holding +inf. top keeps its gradient and shift does not, so that d log_sum / dx
    # is the softmax (the derivative of the running sum alone would lack the max's part).
    total = total * jnp.exp(top - shift)
    norm = Normaliser(shift[..., None], jnp.log(total)[..., None])
    return norm, safe_reciprocal(total)[..., None], row_sums, stats


def exponentials_residual(logits: jax.Array, e: jax.Array) -> jax.Array:
    """What a loss saves to rebuild ``e`` in its backward pass.

    On CPU, ``e`` itself for short rows: recomputing the exponentials costs more than
    storing them, and XLA writes the gradient over ``e`` in place. Long (blocked) rows keep
    the logits instead (XLA cannot write the gradient over a blocked ``e`` and would hold a
    second logits-sized buffer). On GPU and TPU the logits always: the backward pass then
    reads the logits once and writes the gradient once, the minimum traffic, and the
    forward pass writes nothing of the logits' size.
    """
    if block_size(logits.shape[-1]):
        return logits
    return on_cpu(lambda: e.astype(logits.dtype), lambda: logits)


def exponentials_from_residual(
    saved: jax.Array, where: jax.Array | None, norm: Normaliser, scale: float = 1.0
) -> jax.Array:
    """Inverse of :func:`exponentials_residual`, in the compute dtype. ``scale``: the factor
    the logits were multiplied by before the normaliser (``1 / temperature``)."""

    def recompute() -> jax.Array:
        x = saved.astype(norm.shift.dtype)
        x = x if scale == 1.0 else x * scale
        return jnp.exp(mask(x, where, -jnp.inf) - norm.shift)

    if block_size(saved.shape[-1]):
        return recompute()
    return on_cpu(lambda: saved.astype(norm.shift.dtype), recompute)


def stable_logsumexp(
    x: jax.Array, axis_name: Hashable | None = None, maxima: jax.Array | None = None
) -> jax.Array:
    """``log Σ exp(x)`` over the last axis (keepdims) of an already masked ``x``
    (``maxima``: see :func:`exponentials`)."""
    return log_normaliser(x, None, axis_name, maxima).lse()
