"""Shared machinery: argument validation, layout, dtype policy and class-axis reductions.

Every public function moves its class axes to the end (flattened into one), runs a kernel
written for "classes on the last axis", and moves the result back. The kernels' reductions
over classes all go through :func:`class_max` and :func:`class_sum`, which is where long rows
are split into blocks and where vocab-parallel collectives (``axis_name``) are applied.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jxent import _sharding

Axis = int | tuple[int, ...] | None
Reduction = Literal["none", "sum", "mean"]
REDUCTIONS = ("none", "sum", "mean")

# XLA:CPU row reductions slow down sharply once a row is longer than ~32k elements
# (measured on the 2-core dev machine: logsumexp over 268M floats took ~80 ms at 32768
# columns and ~600 ms at >= 65536). Reducing sub-rows of about BLOCK elements first and
# then combining the per-block results keeps every reduction on the fast path.
LONG_ROW = 32768
BLOCK = 8192
MIN_BLOCK = 64

# XLA:GPU (jaxlib 0.10.2, H100 target) reduces rows of up to 16384 elements in one
# kernel and splits longer ones into two kernels with [rows, 128]-sized partials.
GPU_ROW = 16384


# ----------------------------------------------------------------------------- validation


def check_axis_name(axis_name: Hashable | None) -> None:
    if axis_name is not None and not isinstance(axis_name, Hashable):
        raise TypeError(f"axis_name must be a hashable mesh axis name or None, got {axis_name!r}.")


def canonical_axes(axis: Axis, ndim: int, *, name: str = "axis") -> tuple[int, ...]:
    """Returns ``axis`` as a tuple of non-negative ints in the order given, validated against
    ``ndim``. The order is the order in which class axes are flattened (major to minor), as
    in optax: ``axis=(3, 2)`` makes axis 3 the major one."""
    if axis is None:
        return tuple(range(ndim))
    raw = (axis,) if isinstance(axis, int | np.integer) else axis
    if not isinstance(raw, tuple) or not all(isinstance(a, int | np.integer) for a in raw):
        raise TypeError(f"{name} must be an int, a tuple of ints or None, got {axis!r}.")
    axes = []
    for a in raw:
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}={axis!r} is out of range for an array of rank {ndim}.")
        axes.append(int(a) % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(f"{name}={axis!r} repeats an axis.")
    return tuple(axes)


def jit_with_static(*static_argnames: str) -> Any:
    """``jax.jit`` with ``static_argnames``, where a static option passed as an array (or any
    unhashable value) gets jxent's error naming it instead of JAX's "Non-hashable static
    arguments". Static options select the compiled program, so they must be Python values.
    """

    def decorate(fn: Any) -> Any:
        jitted = jax.jit(fn, static_argnames=static_argnames)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for name in static_argnames:
                if name in kwargs:
                    _check_static(name, kwargs[name])
            return jitted(*args, **kwargs)

        call._cache_size = jitted._cache_size  # type: ignore[attr-defined]
        return call

    return decorate


def _check_static(name: str, value: Any) -> None:
    if isinstance(value, jax.Array | np.ndarray) or not isinstance(value, Hashable):
        raise TypeError(
            f"{name} must be a static Python value (it selects the compiled program), got "
            f"{type(value).__name__} {value!r}; pass a Python number, tuple or string, e.g. "
            f"float(...) of a concrete scalar."
        )


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def check_unit_interval(value: float, name: str) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python float, got a traced value {value}.")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}.")
    return value


def check_nonnegative(value: float, name: str) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python float, got a traced value {value}.")
    value = float(value)
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return value


def as_floating(x: ArrayLike, name: str) -> jax.Array:
    """Returns ``x`` as an array, requiring a floating dtype (losses never promote silently)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}.")
    return x


def inexact_dtype(dtype: Any) -> Any:
    """The floating dtype ``jax.nn`` computes a ``dtype`` input in: inexact dtypes stay;
    bools and integers of up to 32 bits become float32, 64-bit integers float64 (so with
    x64 on, an int32 input still gives float32, as in ``jax.nn``)."""
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.inexact):
        return dtype
    return np.dtype(np.float64 if dtype.itemsize == 8 else np.float32)


def as_inexact(x: ArrayLike) -> jax.Array:
    """Returns ``x`` as an array, promoting integers and bools to float as ``jax.nn`` does."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(inexact_dtype(x.dtype))


def as_integer_labels(labels: ArrayLike) -> jax.Array:
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"integer labels must have an integer dtype, got {labels.dtype}.")
    return labels


def check_ignore_index(ignore_index: int | None) -> None:
    if ignore_index is not None and not isinstance(ignore_index, int | np.integer):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}.")


# ----------------------------------------------------------------------------- dtypes


def compute_dtype(dtype: Any) -> Any:
    """Half-precision inputs are accumulated in float32; float32/float64 stay as they are."""
    dtype = jnp.dtype(dtype)
    return jnp.float32 if dtype.itemsize < 4 else dtype


# ----------------------------------------------------------------------------- layout


class ClassLayout:
    """Moves the class axes of arrays shaped like ``shape`` to one flattened last axis.

    ``batch_shape`` is ``shape`` without the class axes; ``num_classes`` the product of the
    class dimensions. ``to_last`` and ``from_last`` are pure reshapes/transposes, so
    autodiff through them is exact and free of custom rules.
    """

    def __init__(self, shape: Sequence[int], axes: tuple[int, ...]):
        self.shape = tuple(shape)
        self.axes = axes
        self.batch_axes = tuple(i for i in range(len(shape)) if i not in axes)
        self.batch_shape = tuple(self.shape[i] for i in self.batch_axes)
        self.num_classes = math.prod(self.shape[i] for i in axes)
        self._perm = self.batch_axes + axes
        self._is_identity = self._perm == tuple(range(len(shape)))

    def to_last(self, x: jax.Array) -> jax.Array:
        if not self._is_identity:
            x = jnp.transpose(x, self._perm)
        _sharding.check_class_axes_mergeable(x, len(self.axes), self.axes)
        return x.reshape((*self.batch_shape, self.num_classes))

    def from_last(self, x: jax.Array) -> jax.Array:
        moved = [self.shape[i] for i in self._perm]
        x = x.reshape(moved)
        if not self._is_identity:
            x = jnp.transpose(x, tuple(int(i) for i in np.argsort(self._perm)))
        return x

    def keepdims_shape(self) -> tuple[int, ...]:
        return tuple(1 if i in self.axes else d for i, d in enumerate(self.shape))


def broadcast_where(
    where: ArrayLike | None, layout: ClassLayout, *, per_example: bool = False
) -> Any:
    """Broadcasts a mask to the full shape and moves it to the class-last layout.

    With ``per_example`` (the losses, as in optax), a mask of exactly the batch shape is
    one flag per example; otherwise masks follow NumPy broadcasting (as in ``jax.nn``).
    """
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
    given_shape = where.shape
    if per_example and given_shape == layout.batch_shape and where.ndim != len(layout.shape):
        where = jnp.expand_dims(where, layout.axes)
    try:
        where = jnp.broadcast_to(where, layout.shape)
    except ValueError:
        raise ValueError(
            f"where of shape {given_shape} is not broadcastable to the input shape "
            f"{layout.shape}"
            + (f" (nor equal to the batch shape {layout.batch_shape})." if per_example else ".")
        ) from None
    return layout.to_last(where)


def class_weights_vector(
    class_weights: ArrayLike | None, num_classes: int, dtype: Any
) -> jax.Array | None:
    if class_weights is None:
        return None
    weights = jnp.asarray(class_weights)
    if weights.shape != (num_classes,):
        raise ValueError(
            f"class_weights must have shape ({num_classes},) (one weight per class), "
            f"got shape {weights.shape}."
        )
    if not jnp.issubdtype(weights.dtype, jnp.floating):
        weights = weights.astype(dtype)
    return weights


# ----------------------------------------------------------------------------- reductions


def block_size(num_classes: Any) -> int | None:
    """The sub-row length for a long class axis on CPU, or None (no blocking).

    The divisor of ``num_classes`` nearest ``BLOCK`` among those in ``[MIN_BLOCK, LONG_ROW)``
    (50257 = 29 blocks of 1733, 128256 = 16 of 8016): every block is then a reshape of the
    row, which XLA:CPU reads in place. None for short rows, for lengths with no such divisor
    (primes, for one: a ragged last block would be a slice, which XLA:CPU copies before
    reducing, and measured slower than no blocking), and for symbolic dimensions
    (``jax.export``), where the unblocked reduction is correct for any size.
    """
    if not isinstance(num_classes, int) or num_classes < LONG_ROW:
        return None
    return _divisor_near_block(num_classes)


@functools.cache
def _divisor_near_block(num_classes: int) -> int | None:
    small = [d for d in range(1, math.isqrt(num_classes) + 1) if num_classes % d == 0]
    divisors = {*small, *(num_classes // d for d in small)}
    candidates = [b for b in divisors if MIN_BLOCK <= b < LONG_ROW]
    return min(candidates, key=lambda b: abs(b - BLOCK)) if candidates else None


def _blocked_reduce(
    op: Any, fn: Any, args: Sequence[Any], num_classes: int, block: int, *, barrier: bool = True
) -> Any:
    """``op`` over the last axis of ``fn(*args)``, block by block (keepdims).

    ``fn``'s ``[..., C]`` operands are viewed as ``[..., C // b, b]`` (``[..., 1]`` ones as
    ``[..., 1, 1]``). XLA fuses ``fn`` into fast per-block reductions; the optimization
    barrier keeps its simplifier from merging the two levels back into one long-row
    reduction (measured 6x faster for a (2048, 131072) logsumexp on the 2-core CPU).
    When ``b`` does not divide ``C`` (GPU only, see :func:`gpu_block_size`), ``fn``'s
    result is padded with ``op``'s identity to whole blocks, inside the reduction kernel.
    """
    if num_classes % block:
        values = fn(*args)
        # Sums pad with 0; maxima (only of floats here) with -inf, which _floored_max floors.
        identity = 0 if op is jnp.sum else -jnp.inf
        partial = op(_padded_blocks(values, block, identity), axis=-1)
    else:

        def blocks(a: Any) -> Any:
            if not isinstance(a, jax.Array) or a.ndim == 0:
                return a
            if a.shape[-1] == num_classes:
                return a.reshape((*a.shape[:-1], num_classes // block, block))
            return a[..., None]

        partial = op(fn(*(blocks(a) for a in args)), axis=-1)
    if barrier:
        partial = lax.optimization_barrier(partial)
    return op(partial, axis=-1, keepdims=True)


def _padded_blocks(a: jax.Array, block: int, fill: Any) -> jax.Array:
    """``a``'s last axis padded with ``fill`` to a multiple of ``block``, as
    ``[..., blocks, block]``. XLA:GPU fuses the pad into the reduction that consumes it:
    no padded copy is stored, and the logits are read once (two slices, one per block
    shape, would each count as a read of the whole row)."""
    count = -(-a.shape[-1] // block)
    pad = [(0, 0, 0)] * (a.ndim - 1) + [(0, count * block - a.shape[-1], 0)]
    padded = lax.pad(a, jnp.asarray(fill, a.dtype), pad)
    return padded.reshape((*a.shape[:-1], count, block))


def on_cpu(cpu: Any, default: Any) -> Any:
    """``cpu()`` when lowered for CPU, ``default()`` for CUDA, ROCm and TPU.

    Both are traced; ``lax.platform_dependent`` keeps the one for the platform being
    compiled, so one jitted (or exported) function carries the right code for each.
    Choices that work around XLA:CPU (blocked long rows, saved exponentials, in-place
    scatters) go in ``cpu``; ``default`` keeps the plain max / exp / sum "normalisation
    diamond" that XLA's GPU and TPU emitters fuse into one kernel.
    """
    return platform_dependent(cpu=cpu, default=default)


# Tests set this to "cuda" or "tpu" to run that platform's code path on the CPU (see
# tests/test_accelerator_paths.py); None means: let the lowering platform choose.
simulated_platform: str | None = None


def platform_dependent(**branches: Any) -> Any:
    """:func:`jax.lax.platform_dependent`, or the branch for :data:`simulated_platform`."""
    if simulated_platform is not None:
        return branches.get(simulated_platform, branches["default"])()
    return lax.platform_dependent(**branches)


def class_reduce(
    op: Any, fn: Any, *args: Any, num_classes: Any, axis_name: Hashable | None = None
) -> jax.Array:
    """``op`` (``jnp.sum`` or a max) over the class axis of ``fn(*args)``, keepdims.

    ``fn`` is elementwise and its ``[..., C]`` operands are broadcast against ``[..., 1]``
    ones. For long rows on CPU it is reduced block by block (see :func:`_blocked_reduce`).
    """

    def plain() -> Any:
        return op(fn(*args), axis=-1, keepdims=True)

    block, gpu_block = block_size(num_classes), gpu_block_size(num_classes)
    cpu = plain if block is None else lambda: _blocked_reduce(op, fn, args, num_classes, block)
    if gpu_block is None:
        result = on_cpu(cpu, plain) if block is not None else plain()
    else:
        # GPU: blocks of at most GPU_ROW, so that XLA does not split the row reduction
        # itself into [rows, 128]-sized partials (see _online_reduce).
        def gpu() -> Any:
            return _blocked_reduce(op, fn, args, num_classes, gpu_block)

        result = platform_dependent(cpu=cpu, cuda=gpu, rocm=gpu, default=plain)
    if axis_name is None:
        return result
    return lax.psum(result, axis_name) if op is jnp.sum else lax.pmax(result, axis_name)


def _identity(x: jax.Array) -> jax.Array:
    return x


def class_max(x: jax.Array, axis_name: Hashable | None = None) -> jax.Array:
    """Max over the last axis (keepdims), across devices when ``axis_name`` is given."""
    return class_reduce(jnp.max, _identity, x, num_classes=x.shape[-1], axis_name=axis_name)


def class_sum(x: jax.Array, axis_name: Hashable | None = None) -> jax.Array:
    """Sum over the last axis (keepdims), across devices when ``axis_name`` is given."""
    return class_reduce(jnp.sum, _identity, x, num_classes=x.shape[-1], axis_name=axis_name)


def class_any(x: jax.Array, axis_name: Hashable | None = None) -> jax.Array:
    return class_sum(x.astype(jnp.int32), axis_name) > 0


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
    x: jax.Array, where: jax.Array | None = None, axis_name: Hashable | None = None
) -> Normaliser:
    """The log-normaliser of ``x`` (masked by ``where``) over its last axis.

    The shift by the row max is held constant under autodiff: the result does not depend
    on it, and a non-finite max (an all ``-inf`` row) is replaced by 0 so that such a row
    gives ``-inf`` rather than NaN. The forward rules of the ``custom_vjp`` functions use
    this, and their outer derivatives (``grad`` of ``grad``) differentiate through it.
    """
    return exponentials(x, where, axis_name)[1]


def exponentials(
    x: jax.Array,
    where: jax.Array | None = None,
    axis_name: Hashable | None = None,
    *,
    read_first: jax.Array | None = None,
) -> tuple[jax.Array, Normaliser, jax.Array]:
    """``e = exp(x - shift)`` (0 where masked), the :class:`Normaliser` and ``1 / Σ e``.

    On GPU and TPU the normaliser comes from one pass over ``x`` (see
    :func:`online_normaliser`) and ``e`` is only a formula: the callers save the logits
    there (see :func:`exponentials_residual`), so XLA drops it. On CPU, see
    :func:`_two_pass_exponentials`.
    """

    def accelerator() -> tuple[jax.Array, Normaliser, jax.Array]:
        norm, inverse, _ = online_normaliser(x, where, axis_name)
        return jnp.exp(mask(x, where, -jnp.inf) - norm.shift), norm, inverse

    return on_cpu(
        lambda: _two_pass_exponentials(x, where, axis_name, read_first=read_first), accelerator
    )


def _two_pass_exponentials(
    x: jax.Array,
    where: jax.Array | None = None,
    axis_name: Hashable | None = None,
    *,
    read_first: jax.Array | None = None,
) -> tuple[jax.Array, Normaliser, jax.Array]:
    """The CPU form of :func:`exponentials`: a max pass, then a sum of exponentials.

    ``read_first`` (see :func:`row_shift`) orders a gather from ``x`` before the passes
    that may overwrite ``x``'s buffer.

    ``e · (1 / Σ e)`` is the softmax; ``1 / Σ e`` is 0 for an empty row (so that its zeros
    stay zeros) and NaN stays NaN. The losses keep ``e`` for their backward pass: on CPU
    recomputing the exponentials costs more than storing them, and XLA writes the
    gradient over ``e`` in place, so no extra memory is held. For long rows everything is
    computed on the blocked view (see :func:`class_reduce`).
    """
    shift = row_shift(x, where, axis_name, read_first=read_first)

    def exp_shifted(x: Any, where: Any, shift: Any) -> Any:
        return jnp.exp(mask(x, where, -jnp.inf) - shift)

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


def _online_combine(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Merges two partial ``(max m, Σ exp(x - m), *sums)`` of the same row.

    The smaller partial is rescaled to the larger max with one exponential,
    ``exp(min - max) ≤ 1``; equal maxima (including two ``±inf``, whose difference would
    be NaN) are merged unscaled. A NaN max stays NaN (``maximum`` propagates it).
    """
    (m1, s1, *rest1), (m2, s2, *rest2) = a, b
    top = jnp.maximum(m1, m2)
    gap = jnp.where(m1 == m2, jnp.zeros_like(m1), jnp.minimum(m1, m2) - top)
    scale = jnp.exp(gap)
    total = jnp.where(m1 >= m2, s1 + s2 * scale, s1 * scale + s2)
    return (top, total, *(r1 + r2 for r1, r2 in zip(rest1, rest2, strict=True)))


def _online_reduce(operands: Sequence[jax.Array]) -> list[jax.Array]:
    """:func:`_online_combine` over the last axis of ``(x, ones, *sums)``.

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

    def whole() -> list[jax.Array]:
        return list(lax.reduce(tuple(operands), inits, _online_combine, (last,)))

    num_classes = operands[0].shape[-1]
    block = gpu_block_size(num_classes)
    if block is None:
        return whole()

    def blocked() -> list[jax.Array]:
        # Padding with the identity (-inf, 0, 0, ...) leaves each row's result unchanged.
        views = tuple(_padded_blocks(a, block, v) for a, v in zip(operands, inits, strict=True))
        partial = lax.reduce(views, inits, _online_combine, (last + 1,))
        return list(lax.reduce(tuple(partial), inits, _online_combine, (last,)))

    return platform_dependent(cuda=blocked, rocm=blocked, default=whole)


def gpu_block_size(num_classes: Any) -> int | None:
    """The block length for a row reduction of ``num_classes`` on GPU, or None (whole).

    Few blocks of at most :data:`GPU_ROW`: each block adds one partial per row and output
    that the second level reads back ([8192, 29] x 3 float32 partials, 2.8 MiB, were
    measured for 50257 = 29 x 1733). With ``k = ceil(C / GPU_ROW)``, the first block count
    ``n`` in ``[k, 2k]`` that divides ``C`` gives blocks that are a reshape of the row
    (32000 -> 2 x 16000, 128256 -> 8 x 16032); otherwise ``k`` blocks of
    ``ceil(C / k)`` with a shorter last one (50257 -> 3 x 12565 + 12562, 32003 -> 16002 +
    16001), the row padded to whole blocks inside the reduction kernel (see
    :func:`_padded_blocks`). None for short rows and symbolic dimensions.
    """
    if not isinstance(num_classes, int) or num_classes <= GPU_ROW:
        return None
    fewest = -(-num_classes // GPU_ROW)
    for count in range(fewest, 2 * fewest + 1):
        if num_classes % count == 0:
            return num_classes // count
    return -(-num_classes // fewest)


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

    Same values as :func:`_two_pass_exponentials`: the shift is the row max clipped to the
    finite floats (constant under autodiff), ``log_sum = log Σ exp(x - shift)`` is ``-inf``
    on empty rows and ``+inf`` on rows holding ``+inf``. ``log_sum`` is differentiable
    (see :func:`_online_stats`), for ``grad`` of ``grad`` and ``jax.hessian``.
    """
    xm = mask(x, where, -jnp.inf)
    dtype = xm.dtype
    operands = (xm, jnp.ones_like(xm), *(jnp.asarray(v, dtype) for v in sums))
    top, total, *row_sums = _online_stats(*operands)
    if axis_name is not None:
        global_top = lax.pmax(top, axis_name)
        local_gap = jnp.where(top == global_top, jnp.zeros_like(top), top - global_top)
        total = lax.psum(total * jnp.exp(local_gap), axis_name)
        top = global_top
    finfo = jnp.finfo(dtype)
    shift = lax.stop_gradient(jnp.clip(top, finfo.min, finfo.max))
    # total · exp(top - shift) = Σ exp(x - shift): 0 on an empty row (top = -inf), +inf on
    # one holding +inf. top keeps its gradient and shift does not, so that d log_sum / dx
    # is the softmax (the derivative of the running sum alone would lack the max's part).
    total = total * jnp.exp(top - shift)
    norm = Normaliser(shift[..., None], jnp.log(total)[..., None])
    return norm, safe_reciprocal(total)[..., None], row_sums


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
    saved: jax.Array, where: jax.Array | None, norm: Normaliser
) -> jax.Array:
    """Inverse of :func:`exponentials_residual`, in the compute dtype."""

    def recompute() -> jax.Array:
        return jnp.exp(mask(saved.astype(norm.shift.dtype), where, -jnp.inf) - norm.shift)

    if block_size(saved.shape[-1]):
        return recompute()
    return on_cpu(lambda: saved.astype(norm.shift.dtype), recompute)


def row_shift(
    x: jax.Array,
    where: jax.Array | None = None,
    axis_name: Hashable | None = None,
    *,
    read_first: jax.Array | None = None,
) -> jax.Array:
    """The row max (keepdims) as a constant for autodiff, clipped to the finite floats.

    Finite even for rows of all ``-inf`` (see :func:`_floored_max`) and rows holding
    ``+inf`` (whose ``exp(x - shift)`` is then ``+inf``, so their log-sum-exp is ``+inf`` as
    in ``jax.nn``); NaN in a row makes it NaN.

    ``read_first``: one value per row gathered from ``x`` (an unmasked entry, or ``-inf``),
    so never above the row max: taking the max with it leaves the shift unchanged but makes
    everything downstream of the shift wait for that gather. Without that data dependency
    XLA cannot order the gather before the backward pass writes the gradient and, when it
    would write it into ``x``'s buffer (donated logits), it first copies all of ``x``.
    """
    m = class_reduce(
        _floored_max,
        lambda x, w: mask(x, w, -jnp.inf),
        lax.stop_gradient(x),
        where,
        num_classes=x.shape[-1],
        axis_name=axis_name,
    )
    if read_first is not None:
        m = jnp.maximum(m, read_first[..., None])
    # The clip from below is needed although the max starts at the floor: XLA drops a
    # reduction's initial value when the reduced axis has size 1, so a single -inf class
    # (or a masked one) would reach here as -inf. A clip on the O(batch) result, unlike a
    # select, does not split the fusions.
    finfo = jnp.finfo(m.dtype)
    return lax.stop_gradient(jnp.clip(m, finfo.min, finfo.max))


def _floored_max(x: jax.Array, axis: int, keepdims: bool = False) -> jax.Array:
    """``max(x, axis)`` started from the most negative finite float instead of ``-inf``.

    An all ``-inf`` row then has a finite shift and ``x - shift`` is ``-inf``, never NaN,
    without a select after the reduction, which would split XLA:CPU's fusions. (For a
    reduced axis of size 1 XLA ignores the start value; :func:`row_shift` clips.)
    """
    floor = np.asarray(jnp.finfo(x.dtype).min, x.dtype)
    result = lax.reduce(x, floor, lax.max, (axis % x.ndim,))
    return jnp.expand_dims(result, axis) if keepdims else result


def capped(x: jax.Array) -> jax.Array:
    """``min(x, largest finite float)``, so that a zero weight times it is 0, never NaN.

    Used for ``-log p`` inside class sums: a select (``where``) there would keep XLA:CPU
    from fusing the elementwise work into the reduction and materialise a logits-sized
    array, a ``minimum`` does not. The price: positive mass on a class whose ``-log p``
    is infinite contributes ``mass · 3.4e38`` (float32) instead of ``inf``.
    """
    return jnp.minimum(x, jnp.finfo(x.dtype).max)


def stable_logsumexp(x: jax.Array, axis_name: Hashable | None = None) -> jax.Array:
    """``log Σ exp(x)`` over the last axis (keepdims) of an already masked ``x``."""
    return log_normaliser(x, None, axis_name).lse()


def finite_or_zero(x: jax.Array) -> jax.Array:
    """Replaces ``±inf`` by 0 (NaN stays NaN)."""
    return jnp.where(jnp.isinf(x), jnp.zeros_like(x), x)


def class_offset(num_local_classes: int, axis_name: Hashable | None) -> Any:
    """Global id of this shard's first class (0 without vocab parallelism)."""
    if axis_name is None:
        return 0
    return lax.axis_index(axis_name) * num_local_classes


def global_num_classes(num_local_classes: int, axis_name: Hashable | None) -> Any:
    if axis_name is None:
        return num_local_classes
    return lax.psum(num_local_classes, axis_name)


def psum_over(x: jax.Array, axis_name: Hashable | None) -> jax.Array:
    """``x`` summed over the mesh axis ``axis_name`` (unchanged without one)."""
    return x if axis_name is None else lax.psum(x, axis_name)


def batch_total(values: jax.Array, batch_axes: tuple[Hashable, ...] = ()) -> jax.Array:
    """Sum over every example, including those on other devices when ``batch_axes`` (mesh
    axes the examples are sharded over inside ``shard_map``) are given."""
    total = jnp.sum(values)
    return lax.psum(total, batch_axes) if batch_axes else total


def safe_reciprocal(x: jax.Array) -> jax.Array:
    """``1 / x``, and 0 where ``x`` is 0."""
    return jnp.where(x == 0, jnp.zeros_like(x), 1.0 / jnp.where(x == 0, jnp.ones_like(x), x))


def reduce_loss(
    loss: jax.Array,
    weight: jax.Array | None,
    reduction: str,
    batch_axes: tuple[Hashable, ...] = (),
) -> jax.Array:
    """Applies ``reduction``; ``mean`` divides by the total weight.

    A mean over zero total weight is 0 with zero gradient (PyTorch gives NaN) when every
    example was ignored, masked or weighted 0, but NaN when any loss is NaN: an invalid
    label is never hidden by a mean (its loss is NaN and its weight 0).
    """
    if reduction == "none":
        return loss
    total = batch_total(loss, batch_axes)
    if reduction == "sum":
        return total
    if weight is None:
        denominator = jnp.asarray(loss.size, loss.dtype)
    else:
        denominator = batch_total(weight, batch_axes)
    safe = jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)
    # Zero weight: 0, or NaN if the total is NaN. Selected rather than total · 0, which
    # would make a NaN from an infinite total (a valid -inf logit in the BCE) that
    # jax.debug_nans reports even though this branch is discarded.
    empty = jnp.where(jnp.isnan(total), total, jnp.zeros_like(total))
    return jnp.where(denominator == 0, empty, total / safe)
