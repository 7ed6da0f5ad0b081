"""Reductions over the class axis, with their platform-specific (CPU and GPU) variants.

The kernels' reductions over classes all go through :func:`class_max`, :func:`class_sum`
and :func:`class_reduce`, which is where long rows are split into blocks (on CPU, and on
GPU past :data:`GPU_ROW`) and where vocab-parallel collectives (``axis_name``) are applied.
:func:`platform_dependent` / :func:`on_cpu` choose between the variants at lowering time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jxent import _sharding
from jxent._elementwise import mask

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
    candidates = [b for b in _divisors(num_classes) if MIN_BLOCK <= b < LONG_ROW]
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
        # Sums pad with 0; maxima with the lowest value (-inf for floats, which
        # _floored_max floors).
        identity = 0 if op is jnp.sum else _lowest(values.dtype)
        partial = op(padded_blocks(values, block, identity), axis=-1)
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


def _lowest(dtype: Any) -> Any:
    """The identity of a max over ``dtype``: ``-inf``, or the most negative integer."""
    return -jnp.inf if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype).min


def padded_blocks(a: jax.Array, block: int, fill: Any) -> jax.Array:
    """``a``'s last axis padded with ``fill`` to a multiple of ``block``, as
    ``[..., blocks, block]``. XLA:GPU fuses the pad into the reduction that consumes it:
    no padded copy is stored, and the logits are read once (two slices, one per block
    shape, would each count as a read of the whole row)."""
    count = -(-a.shape[-1] // block)
    pad = [(0, 0, 0)] * (a.ndim - 1) + [(0, count * block - a.shape[-1], 0)]
    padded = lax.pad(a, jnp.asarray(fill, a.dtype), pad)
    return padded.reshape((*a.shape[:-1], count, block))


def on_cpu(cpu: Any, default: Any, on: Sequence[jax.Array] = ()) -> Any:
    """``cpu()`` when lowered for CPU, ``default()`` for CUDA, ROCm and TPU.

    Both are traced; ``lax.platform_dependent`` keeps the one for the platform being
    compiled, so one jitted (or exported) function carries the right code for each.
    Choices that work around XLA:CPU (blocked long rows, saved exponentials, in-place
    scatters) go in ``cpu``; ``default`` keeps the plain max / exp / sum "normalisation
    diamond" that XLA's GPU and TPU emitters fuse into one kernel. ``on``: see
    :func:`platform_dependent`.
    """
    return platform_dependent(on=on, cpu=cpu, default=default)


# Tests set this to "cuda" or "tpu" to run that platform's code path on the CPU (see
# tests/library/test_accelerator_paths.py); None means: let the lowering platform choose.
simulated_platform: str | None = None


def platform_dependent(on: Sequence[jax.Array] = (), **branches: Any) -> Any:
    """:func:`jax.lax.platform_dependent`, or the branch for :data:`simulated_platform`,
    or, when the arrays ``on`` are typed on a mesh of TPU devices, the TPU branch, taken at
    trace time.

    Why: ``lax.platform_dependent`` lowers to a conditional even for one platform, which
    XLA does not inline when its branch holds collectives (a ``shard_map``'s ``psum``).
    XLA:TPU then lays out the branch's parameters by default, and copied a ``[D, V]``
    ``w`` whose lane axis is not a multiple of 128 into the other layout (252 MiB per
    device on v5e 2x2, docs/bench/mesh_layouts.md). Not on GPU meshes, where the program
    without the conditional held more (8 x H100, explicit axes, the fused loss in
    bfloat16: 11.4 -> 16.4 MiB per device). Arrays on a TPU mesh run on TPUs; a function
    exported from there for other platforms as well carries the TPU code for them
    (correct, not tuned)."""
    if simulated_platform is not None:
        return branches.get(simulated_platform, branches["default"])()
    if _sharding.mesh_platform(*on) == "tpu":
        return branches.get("tpu", branches["default"])()
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


def gpu_block_size(num_classes: Any) -> int | None:
    """The block length for a row reduction of ``num_classes`` on GPU, or None (whole).

    Few blocks of at most :data:`GPU_ROW`: each block adds one partial per row and output
    that the second level reads back ([8192, 29] x 3 float32 partials, 2.8 MiB, were
    measured for 50257 = 29 x 1733). With ``k = ceil(C / GPU_ROW)``, the first block count
    ``n`` in ``[k, 2k]`` that divides ``C`` gives blocks that are a reshape of the row
    (32000 -> 2 x 16000, 128256 -> 8 x 16032); otherwise ``k`` blocks of
    ``ceil(C / k)`` with a shorter last one (50257 -> 3 x 12565 + 12562, 32003 -> 16002 +
    16001), the row padded to whole blocks inside the reduction kernel (see
    :func:`padded_blocks`). None for short rows and symbolic dimensions.
    """
    if not isinstance(num_classes, int) or num_classes <= GPU_ROW:
        return None
    fewest = -(-num_classes // GPU_ROW)
    for count in range(fewest, 2 * fewest + 1):
        if num_classes % count == 0:
            return num_classes // count
    return -(-num_classes // fewest)


def argmax_chunk(num_classes: Any) -> int | None:
    """The run of classes :func:`chunk_maxima` reduces: the divisor of ``num_classes``
    nearest ``2·sqrt(num_classes)`` among those in ``[8, LONG_ROW)``, or None (rows under
    64 classes, no such divisor, or a symbolic dimension).

    The first argmax then costs, beyond the row max, a search through ``C / chunk`` maxima
    and one gathered chunk, a few percent of the row (1000 classes: 20 chunks of 50;
    32000: 100 of 320), instead of one more pass over the logits. Shorter chunks make the
    maxima's reduction slower on XLA:CPU, longer ones the gather."""
    if not isinstance(num_classes, int) or num_classes < 64:
        return None
    target = 2.0 * math.sqrt(num_classes)
    divisors = _divisors(num_classes)
    candidates = [d for d in divisors if 8 <= d < LONG_ROW and d < num_classes]
    return min(candidates, key=lambda d: abs(d - target)) if candidates else None


@functools.cache
def _divisors(n: int) -> tuple[int, ...]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return tuple(sorted({*small, *(n // d for d in small)}))


def chunk_maxima(x: jax.Array, where: jax.Array | None) -> jax.Array | None:
    """The max of each run of :func:`argmax_chunk` classes of ``x`` masked by ``where``
    (``-inf`` for a run with no unmasked entry; NaN for one holding NaN): ``[..., C /
    chunk]``, no gradient; None when the row has no such run. From them :func:`row_shift`
    takes the row max and the aux outputs the first argmax; runs this short are on
    XLA:CPU's fast reduction path whatever the row's length."""
    chunk = argmax_chunk(x.shape[-1])
    if chunk is None:
        return None
    x = mask(lax.stop_gradient(x), where, -jnp.inf)
    runs = x.reshape((*x.shape[:-1], x.shape[-1] // chunk, chunk))
    maxima = lax.reduce(runs, np.asarray(-np.inf, x.dtype), lax.max, (x.ndim,))
    # Without the barrier XLA's simplifier turns the row max taken from them back into a
    # reduction over the whole row: a second pass over x.
    return lax.optimization_barrier(maxima)


def row_shift(
    x: jax.Array,
    where: jax.Array | None = None,
    axis_name: Hashable | None = None,
    *,
    read_first: jax.Array | None = None,
    maxima: jax.Array | None = None,
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

    ``maxima``: the :func:`chunk_maxima` of ``x``, already computed: their max is the row's
    (no other pass over ``x``).
    """
    if maxima is None:
        m = class_reduce(
            _floored_max,
            lambda x, w: mask(x, w, -jnp.inf),
            lax.stop_gradient(x),
            where,
            num_classes=x.shape[-1],
            axis_name=axis_name,
        )
    else:
        m = jnp.max(maxima, axis=-1, keepdims=True)
        m = m if axis_name is None else lax.pmax(m, axis_name)
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
