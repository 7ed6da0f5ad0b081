"""The kernels of :func:`jxent.fused_linear_cross_entropy` (its public API is in
:mod:`jxent._fused_linear`).

Fused linear + softmax cross-entropy that never materialises the ``[N, V]`` logits.

Two kernels; ``lax.platform_dependent`` picks one per platform inside one jitted function.

CPU, the chunked kernel: the tokens are processed in chunks of ``T`` rows inside a
``lax.scan``: each step forms the chunk's logits ``x_c @ w`` (``[T, V]``, float32), reduces them
to per-row statistics and, when the loss is a scalar (``reduction="sum"``/``"mean"``),
immediately turns them into the chunk's share of every gradient (``dx_c = dz_c @ wᵀ``,
``dw += x_cᵀ @ dz_c``, ``db += Σ dz_c``). The gradients are therefore computed during the
forward pass (as Liger-Kernel does) and the backward pass only scales them by the incoming
cotangent: three matmuls in all, the same as the unfused computation, with a ``[T, V]``
working set instead of ``[N, V]``. With ``reduction="none"`` the cotangent differs per
example, so the backward pass re-forms each chunk's logits from ``x``, ``w`` and the saved
per-row log-normalisers (four matmuls in all). The price is a float32 ``[D, V]`` accumulator
for ``dw``: on the CPU, where ``w``'s gradient is float32 anyway, it is the gradient itself.
The auxiliary outputs (``return_aux``) are per-row statistics of the same passes; their
cotangents (``lse``, ``entropy``) arrive only in the backward pass, so when they are nonzero
the backward pass re-forms the chunks for them (three more matmuls with ``"sum"``/``"mean"``;
none more with ``"none"``, whose backward pass re-forms anyway). The custom_vjp receives
symbolic zeros, so aux outputs that are only logged cost no re-forming.

GPU and TPU, the vocabulary-blocked kernel (see "vocabulary blocks" below): the loops run over
blocks of classes covering all tokens, the forward pass saves one log-normaliser per row,
and the backward pass writes each block's ``dw`` once, in ``w``'s dtype, while the ``[N, D]``
input gradient accumulates in float32: no buffer the size of ``w`` beyond its gradient. On
meshes the budgets are per device, and the backward pass is split into that pass for ``dw``
alone and a pass over tiles of rows for ``dx`` (see "row tiles" below): five matmuls.

``w`` comes as ``[D, V]`` (``w_layout="dv"``) or ``[V, D]`` (``"vd"``, a tied embedding
table); every product names its contracting dimension (``lax.dot_general``), so neither layout
is transposed or copied, and ``w``'s gradient comes back in ``w``'s layout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import core as jax_core
from jax.sharding import AxisType

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

# The default chunk keeps one [T, V] float32 logits block within this many bytes: big enough
# for few scan steps (each re-reads w and updates the [D, V] gradient), small enough that
# the block-sized temporaries (about 1.2 blocks) stay far below the unfused [N, V] logits
# and their gradient. Measured on the 2-core dev machine: at N=4096, D=512, V=32000 two
# chunks match the unfused time where four cost ~5% more; at N=8192, D=1024, V=128256 the
# 16 chunks of 512 rows hold ~300 MB of temporaries against ~8 GB unfused.
_CHUNK_BYTES = 256 * 2**20
_SYMBOLIC_CHUNK = 256
# Classes per block when adding a chunk's ``xᵀ @ dz`` into the ``[D, V]`` gradient.
_DW_BLOCK = 8192
# GPU/TPU (the vocabulary-blocked kernel): one float32 [N, block] logits block within this
# many bytes, per accelerator, read off the compiled loop bodies (docs/accelerators.md, "The
# fused loss's vocabulary block, per platform"; make vocab-blocks). XLA:GPU writes each
# block's logits to memory: 64 MiB instead of 32 cuts the bytes per class by a third for
# 48 MiB more temp. XLA:TPU keeps a block of up to 32 MiB inside the GEMM's fused epilogue
# (temp 0), a 64 MiB one not in bfloat16.
_VOCAB_BLOCK_BYTES = {"gpu": 64 * 2**20, "tpu": 32 * 2**20}
# On meshes (GSPMD's Auto axes, shard_map) the blocked kernel's budgets are per device and far
# below the one-device ones: a device's share of the [N, V] logits is a fraction of them, and
# the fused loss's temporaries are held to a sixteenth of that share (docs/fused_linear.md).
# One block's float32 logits and the block of w they are formed from (which XLA:GPU copies
# out of w for the GEMM; counted in float32) within _MESH_BLOCK_BYTES; the float32 [rows, D]
# dx sum of one row tile (all its row groups together) within _MESH_ROWS_BYTES.
_MESH_BLOCK_BYTES = 12 * 2**20
_MESH_ROWS_BYTES = 4 * 2**20
_TPU_LANES = 128  # the minor dimension of a TPU vector register (and of its memory tiles)
_MIN_VOCAB_BLOCK = 128
_SYMBOLIC_VOCAB_BLOCK = 1024
KERNELS = ("auto", "chunked", "blocked")
W_LAYOUTS = ("dv", "vd")


class Config(NamedTuple):
    """Static options of one call (hashable: the ``nondiff_argnums`` of the custom_vjp)."""

    chunk_size: int  # 0 until local_loss chooses it (chunk_size=None)
    num_rows: int  # this device's N before padding to a multiple of chunk_size
    ignore_index: int | None
    label_smoothing: float
    z_loss: float
    logit_softcap: float | None
    reduction: str
    axis_name: Hashable | None
    batch_axes: tuple[Hashable, ...] = ()  # mesh axes the rows are sharded over (explicit mode)
    kernel: str = "auto"  # "chunked" / "blocked" force a kernel (tests); "auto": per platform
    vocab_block: int = 0  # classes per block of the blocked kernel; 0: from _VOCAB_BLOCK_BYTES
    accelerator: str = "gpu"  # the blocked kernel's platform: "gpu" or "tpu"
    temperature: float = 1.0  # the logits are divided by it after the soft cap
    return_aux: bool = False  # the kernels also return RowStats
    w_layout: str = "dv"  # "dv": w is [D, V]; "vd": [V, D]
    vocab_groups: int = 1  # G: the blocked kernel's vocabulary viewed as [G, V / G] (GSPMD)
    auto_devices: int = 1  # devices of the mesh of Auto axes the arrays live on (GSPMD)


class Operands(NamedTuple):
    """The arrays of one call, the rows flattened: the custom_vjps' one primal argument."""

    x: jax.Array  # [N, D]
    w: jax.Array  # [D, V] ("dv") or [V, D] ("vd")
    bias: jax.Array | None  # [V]
    labels: Any  # [N], widened to a signed dtype (None in a cotangent: no gradient)
    class_weights: jax.Array | None  # [V]; constants (no gradient)
    token_weights: jax.Array | None  # [N]; multiply each example's loss and mean weight


class RowStats(NamedTuple):
    """Per-row statistics the kernels return with ``return_aux``: the log-normaliser and the
    entropy of ``softmax(z / T)`` (differentiable) and the first maximum's global class id."""

    lse: jax.Array
    entropy: jax.Array
    argmax: jax.Array


class AuxCotangent(NamedTuple):
    """The cotangents of ``RowStats.lse`` and ``.entropy`` (per row) and the entropy values,
    which the entropy's gradient ``-p (log p + H)`` needs."""

    lse: jax.Array
    entropy: jax.Array
    entropy_value: jax.Array


def default_chunk_size(num_rows: Any, num_local_classes: Any) -> int:
    """Rows per chunk when ``chunk_size=None``.

    The ``N`` rows are split into ``K = ceil(N · V · 4 bytes / 256 MiB)`` equal chunks (so
    one float32 ``[T, V]`` logits block stays within 256 MiB) of ``T = ceil(N / K)`` rows,
    rounded up to a multiple of 8. Equal chunks keep the padding small; as few chunks as
    the budget allows keep the per-chunk cost (re-reading ``w``, updating the ``[D, V]``
    gradient) small.

    Symbolic dimensions (``jax.export``): with ``N`` symbolic, ``T`` is the most rows whose
    block fits the budget (a multiple of 8); with ``V`` symbolic too, 256 rows (within the
    budget up to ``V = 262144``).
    """
    if not isinstance(num_local_classes, int):
        return _SYMBOLIC_CHUNK
    if not isinstance(num_rows, int):
        return max(8, _CHUNK_BYTES // (4 * max(num_local_classes, 1)) // 8 * 8)
    num_rows = max(num_rows, 1)
    total_bytes = num_rows * max(num_local_classes, 1) * 4
    num_chunks = max(1, -(-total_bytes // _CHUNK_BYTES))
    rows = -(-num_rows // num_chunks)
    return -(-rows // 8) * 8


# ----------------------------------------------------------------------------- w's layout


def vocab_axis(w_layout: str) -> int:
    """The axis of ``w`` that indexes the classes."""
    return 1 if w_layout == "dv" else 0


def num_local_classes(w: jax.Array, cfg: Config) -> Any:
    return w.shape[vocab_axis(cfg.w_layout)]


def _logits_product(x: jax.Array, w: jax.Array, cfg: Config, dtype: Any) -> jax.Array:
    """``x @ w`` (``[T, V]``) for either layout of ``w``."""
    if cfg.w_layout == "dv":
        return jnp.matmul(x, w, preferred_element_type=dtype)
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=dtype)


def _input_grad_product(dz: jax.Array, w: jax.Array, cfg: Config, dtype: Any) -> jax.Array:
    """``dz @ wᵀ`` (``[T, D]``) for either layout of ``w``."""
    if cfg.w_layout == "dv":
        return jnp.matmul(dz, w.T, preferred_element_type=dtype)
    return lax.dot_general(dz, w, (((1,), (0,)), ((), ())), preferred_element_type=dtype)


def _weight_grad_product(x: jax.Array, dz: jax.Array, cfg: Config, dtype: Any) -> jax.Array:
    """``xᵀ @ dz`` in ``w``'s layout: ``[D, V]`` or ``[V, D]``."""
    if cfg.w_layout == "dv":
        return jnp.matmul(x.T, dz, preferred_element_type=dtype)
    return lax.dot_general(dz, x, (((0,), (0,)), ((), ())), preferred_element_type=dtype)


def _classes_slice(a: jax.Array, start: Any, size: Any, cfg: Config) -> jax.Array:
    """Classes ``[start, start + size)`` of ``w`` (or of its gradient)."""
    return lax.dynamic_slice_in_dim(a, start, size, axis=vocab_axis(cfg.w_layout))


def _classes_update(a: jax.Array, block: jax.Array, start: Any, cfg: Config) -> jax.Array:
    return lax.dynamic_update_slice_in_dim(a, block, start, axis=vocab_axis(cfg.w_layout))


# ----------------------------------------------------------------------------- chunk kernels


def _chunk_logits(
    x: jax.Array, w: jax.Array, bias: jax.Array | None, cfg: Config
) -> tuple[jax.Array, jax.Array | None]:
    """float32 logits of one chunk, soft-capped and divided by the temperature, and
    ``tanh(z/s)`` for the cap's derivative."""
    return _scaled_logits(_product_logits(x, w, bias, cfg), cfg)


def _product_logits(x: jax.Array, w: jax.Array, bias: jax.Array | None, cfg: Config) -> jax.Array:
    """``x @ w + bias`` in float32 (the bias in the GEMM on CPU)."""
    dtype = _dtypes.compute_dtype(x.dtype)
    if bias is None:
        return _logits_product(x, w, cfg, dtype)
    b = bias

    def bias_added() -> jax.Array:
        return _logits_product(x, w, cfg, dtype) + b.astype(dtype)

    if x.dtype == w.dtype == b.dtype:  # else the bias would be rounded to w's dtype
        return _reductions.on_cpu(lambda: _matmul_with_bias_row(x, w, b, cfg, dtype), bias_added)
    return bias_added()


def _scaled_logits(z: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array | None]:
    """The soft cap and the temperature applied, and ``tanh(z/s)`` for the cap's derivative."""
    capped = None
    if cfg.logit_softcap is not None:
        capped = jnp.tanh(z / cfg.logit_softcap)
        z = cfg.logit_softcap * capped
    return _tempered(z, cfg), capped


def _tempered(z: jax.Array, cfg: Config) -> jax.Array:
    return z if cfg.temperature == 1.0 else z / cfg.temperature


def _matmul_with_bias_row(
    x: jax.Array, w: jax.Array, bias: jax.Array, cfg: Config, dtype: Any
) -> jax.Array:
    """``[x, 1] @ [w; bias]``: the bias added by the GEMM itself (CPU).

    XLA:CPU's reductions do not fuse a producer, so ``x @ w + bias`` is written to a second
    ``[T, V]`` buffer for the log-normaliser while the gradient re-reads the product beside it:
    two chunk-sized arrays live at once. With the bias as one more row of ``w`` (and a column
    of ones in ``x``) the GEMM's output is the logits, and their gradient overwrites them.
    """
    ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
    x_1 = jnp.concatenate([x, ones], axis=-1)
    row = bias[None, :] if cfg.w_layout == "dv" else bias[:, None]
    w_b = jnp.concatenate([w, row], axis=1 - vocab_axis(cfg.w_layout))
    return _logits_product(x_1, w_b, cfg, dtype)


def _target_logits(
    x: jax.Array, w: jax.Array, bias: jax.Array | None, rows: _labels.Targets, cfg: Config
) -> jax.Array:
    """``z[n, y_n]`` of one chunk from ``x_n · w[:, y_n]``, on whichever device holds ``y_n``.

    Computed from the inputs rather than gathered from the chunk's logits, so that nothing
    reads the logits after their gradient is formed and XLA can write it in their buffer.
    """
    dtype = _dtypes.compute_dtype(x.dtype)
    axis = vocab_axis(cfg.w_layout)
    index = jnp.clip(rows.local, 0, w.shape[axis] - 1)
    columns = jnp.take(w, index, axis=axis).astype(dtype)  # [D, T] or [T, D]
    z = jnp.sum(x.astype(dtype) * (columns.T if axis == 1 else columns), axis=1)
    if bias is not None:
        z = z + bias.astype(dtype)[index]
    if cfg.logit_softcap is not None:
        z = cfg.logit_softcap * jnp.tanh(z / cfg.logit_softcap)
    z = jnp.where(rows.in_shard, _tempered(z, cfg), jnp.zeros_like(z))
    return _loss_reduction.psum_over(z, cfg.axis_name)


class _Classes(NamedTuple):
    """The class-weight totals the smoothing term needs: ``Σ_c w_c`` (over all devices'
    classes) and the global number of classes ``C``, with this device's class weights."""

    weights: jax.Array | None
    total: jax.Array
    count: Any


def _chunk_loss(
    z: jax.Array,
    target: jax.Array,
    rows: _labels.Targets,
    classes: _Classes,
    cfg: Config,
    maxima: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-row losses (0 when inactive, NaN when bad) and log-normalisers of one chunk
    (``maxima``: ``z``'s :func:`~jxent._reductions.chunk_maxima`, the row max's source)."""
    lse = _normaliser.stable_logsumexp(z, cfg.axis_name, maxima)[:, 0]
    weighted = None
    if cfg.label_smoothing:
        # Σ_c w_c (lse - z_c) = W·lse - Σ_c w_c z_c: one matrix-vector product for the chunk.
        weighted = (
            _reductions.class_sum(z, cfg.axis_name)[:, 0]
            if classes.weights is None
            else _loss_reduction.psum_over(
                jnp.matmul(z, classes.weights.astype(z.dtype)), cfg.axis_name
            )
        )
    return _row_losses(lse, target, weighted, rows, classes, cfg), lse


def _row_losses(
    lse: jax.Array,
    target: jax.Array,
    weighted: jax.Array | None,
    rows: _labels.Targets,
    classes: _Classes,
    cfg: Config,
) -> jax.Array:
    """Per-row losses from the log-normalisers, target logits and (with label smoothing)
    the class-weighted logit sums ``Σ_c w_c z_c``: 0 when inactive, NaN when bad."""
    eps = cfg.label_smoothing
    loss = (1.0 - eps) * rows.weight * (lse - target)
    if eps and weighted is not None:
        loss = loss + eps / classes.count * (classes.total * lse - weighted)
    if cfg.z_loss:
        loss = loss + cfg.z_loss * lse**2
    loss = jnp.where(rows.active, loss, jnp.zeros_like(loss))
    return _labels.nan_where_bad(rows, loss)


def _entropy_and_max(
    z: jax.Array,
    lse: jax.Array,
    raw: jax.Array,
    fresh: jax.Array | None = None,
    own_lse: bool = True,
    maxima: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Over the columns of ``z`` (those ``fresh`` marks): ``Σ_c p_c (lse - z_c)`` with
    ``p = exp(z - lse)``, and each row's first maximum of the logits ``raw`` before the soft
    cap and the temperature, and its column.

    The cap and the temperature keep the order of the logits, so the predicted class is the
    same; ``raw`` is what the GEMM wrote (or that plus the bias), which every fusion reads
    alike. ``z`` is not: XLA recomputes an elementwise producer in each fusion that consumes
    it and may contract ``z / T - max`` into one fused multiply-add, or round ``tanh`` two
    ways, so that no capped or tempered logit compares equal to their maximum.

    With the row's full log-normaliser this is the row's share of the entropy
    ``H = -Σ p log p``; with a block's own, the block's entropy to merge (:func:`_rebased`).
    Written around the maximum ``m`` as ``e^{m - lse}·((lse - m)·Σ e^{z-m} + Σ e^{z-m}(m - z))``,
    sums of non-negative terms (``lse - Σ p z`` would cancel to noise for large logits). When
    ``lse`` is over these very columns (``own_lse``), ``Σ e^{z-m} = e^{lse - m}`` and one sum
    is left. Each sum reads ``z`` through its own expression: XLA:CPU stores an elementwise
    result that two consumers share (``exp(z - lse)`` with the gradient's ``p``, say) as one
    more ``[T, V]`` array, but fuses one that feeds a single reduction.

    ``maxima`` (the chunked kernel, when ``z`` is ``raw``): the
    :func:`~jxent._reductions.chunk_maxima` the log-normaliser's max pass made; the row
    max, the shift and the first maximum then come from them, without the two passes
    over the chunk (a max and :func:`_first_max_column`) they take otherwise.
    """
    if fresh is not None:
        raw = jnp.where(fresh, raw, jnp.asarray(-jnp.inf, raw.dtype))
        shift = _elementwise.finite_or_zero(
            jnp.max(jnp.where(fresh, z, jnp.asarray(-jnp.inf, z.dtype)), axis=1)
        )
        # The columns not counted sit at the maximum: their terms e^0·0 vanish, without the
        # 0·inf a -inf logit would give (a NaN that jax.debug_nans reports).
        z = jnp.where(fresh, z, shift[:, None])
    elif maxima is not None:
        shift = _elementwise.finite_or_zero(jnp.max(maxima, axis=1))
    else:
        shift = _elementwise.finite_or_zero(jnp.max(z, axis=1))
    below = shift[:, None] - z  # >= 0
    spread = jnp.sum(jnp.exp(-below) * below, axis=1)
    offset = _elementwise.finite_or_zero(lse) - shift
    if own_lse:
        entropy = offset + jnp.exp(-offset) * spread
    else:
        total = jnp.sum(jnp.exp(z - shift[:, None]), axis=1)
        entropy = jnp.exp(-offset) * (offset * total + spread)
    if maxima is not None:
        top = jnp.max(maxima, axis=1)
        found, first = _aux_outputs.first_argmax_in_chunks(raw, None, maxima, top[:, None])
        return entropy, top, jnp.where(jnp.isnan(top), -1, jnp.where(found, first, 0))
    top = jnp.max(raw, axis=1)
    return entropy, top, _first_max_column(raw, top)


def _first_max_column(z: jax.Array, top: jax.Array) -> jax.Array:
    """``jnp.argmax(z, axis=1)`` given the rows' maxima ``top``: the first column where ``z``
    equals them, as one max reduction of ``sign(z - top)·2^30 - column`` (``sign`` is 0 at a
    maximum, -1 elsewhere). XLA:CPU vectorises that reduction but not ``argmax``'s variadic
    one: 19 ms against 112 ms over 1024 x 14,114 logits on the 2-core dev machine. Columns
    are exact in float32 below 2^24; longer rows take ``jnp.argmax``. A row with a NaN logit
    gives -1 (``jnp.argmax``: the first NaN), so that it is never counted as correct. Only
    for logits that every fusion reads alike (see :func:`_entropy_and_max`)."""
    num_columns = z.shape[1]
    if not isinstance(num_columns, int) or num_columns >= 2**24:
        return jnp.argmax(z, axis=1)
    column = lax.broadcasted_iota(z.dtype, z.shape, 1)
    score = jnp.sign(z - top[:, None]) * 2.0**30 - column
    first = (-jnp.max(score, axis=1)).astype(jnp.int32)
    return jnp.where(jnp.isnan(top), -1, first)


def _rebased(lse: jax.Array, entropy: jax.Array, total: jax.Array) -> jax.Array:
    """The share in ``-Σ p log p`` under the log-normaliser ``total`` of the classes whose
    own log-normaliser is ``lse`` and entropy ``entropy``: with ``a = exp(lse - total)``,
    ``a·(entropy + total - lse)`` (0 for an empty set of classes, ``lse = -inf``)."""
    empty = jnp.isneginf(lse)
    lse = jnp.where(empty, total, lse)  # no inf - inf, hence no NaN, in the discarded branch
    share = jnp.exp(lse - total) * (entropy + total - lse)
    return jnp.where(empty, jnp.zeros_like(share), share)


def _chunk_row_stats(
    z: jax.Array,
    lse: jax.Array,
    raw: jax.Array,
    num_local: Any,
    cfg: Config,
    maxima: jax.Array | None = None,
) -> RowStats:
    """One chunk's aux statistics from its logits (scaled and raw) and full log-normalisers
    (``maxima``: see :func:`_entropy_and_max`)."""
    own_lse = cfg.axis_name is None
    entropy, top, arg = _entropy_and_max(z, lse, raw, own_lse=own_lse, maxima=maxima)
    entropy = _loss_reduction.psum_over(entropy, cfg.axis_name)
    return RowStats(lse, entropy, _aux_outputs.global_argmax(top, arg, cfg.axis_name, num_local))


def _chunk_logits_grad(
    z: jax.Array,
    capped: jax.Array | None,
    lse: jax.Array,
    rows: _labels.Targets,
    scale: jax.Array | None,
    classes: _Classes,
    cfg: Config,
    aux: AuxCotangent | None = None,
) -> jax.Array:
    """``scale_n · d loss_n / d z_raw`` (plus the aux outputs' share) for one chunk: one
    elementwise expression XLA fuses.

    d loss_n / d u_c = p_c·A_n - (1-ε)·w_y·[c = y] - (ε/C)·w_c with the target mass
    A_n = (1-ε)·w_y + (ε/C)·W + 2ζ·lse_n for the tempered logits ``u = z / T``; ``lse``'s
    cotangent adds ``g·p_c``, the entropy's ``-g·p_c (log p_c + H)``; then ``1/T`` and the
    soft cap's 1 - tanh²(z_raw/s).
    """
    p = jnp.exp(z - _elementwise.finite_or_zero(lse)[:, None])
    grad = None
    if scale is not None:
        eps = cfg.label_smoothing
        mass = (
            (1.0 - eps) * rows.weight + eps / classes.count * classes.total + 2.0 * cfg.z_loss * lse
        )
        classes_iota = lax.broadcasted_iota(rows.local.dtype, z.shape, 1)
        is_target = classes_iota == rows.local[:, None]
        grad = p * mass[:, None] - jnp.where(is_target, ((1.0 - eps) * rows.weight)[:, None], 0.0)
        if eps:
            spread = 1.0 if classes.weights is None else classes.weights.astype(z.dtype)[None, :]
            grad = grad - (eps / classes.count) * spread
        grad = scale[:, None] * grad
    if aux is not None:
        log_p = z - _elementwise.finite_or_zero(lse)[:, None]
        aux_grad = p * (
            aux.lse[:, None] - aux.entropy[:, None] * (log_p + aux.entropy_value[:, None])
        )
        grad = aux_grad if grad is None else grad + aux_grad
    assert grad is not None
    if cfg.temperature != 1.0:
        grad = grad / cfg.temperature
    if capped is not None:
        grad = grad * (1.0 - capped * capped)
    return grad


def _add_input_grad_product(dw: jax.Array, x: jax.Array, dz: jax.Array, cfg: Config) -> jax.Array:
    """``dw + xᵀ @ dz``; on CPU when ``D > T``, one block of ``_DW_BLOCK`` classes at a time.

    XLA:CPU writes a dot into a fresh buffer before adding it, so a single ``xᵀ @ dz`` would
    hold a second ``[D, V]`` array; unrolled blocks do not help either (the scheduler runs
    all their dots first). In a loop the scratch is one ``[D, _DW_BLOCK]`` product and every
    update lands in place in the accumulator. All blocks have the same size (a static
    remainder block would make XLA recompute its slice of ``dz`` from the logits, keeping
    more ``[T, V]`` arrays alive): the last one starts at ``V - _DW_BLOCK`` and masks out the
    columns its predecessor already added.
    """
    num_rows, num_features = x.shape
    num_classes = dz.shape[1]

    def one_dot() -> jax.Array:
        return dw + _weight_grad_product(x, dz, cfg, dw.dtype)

    if not isinstance(num_classes, int) or num_classes <= _DW_BLOCK or num_features <= num_rows:
        # The [D, V] product is no bigger than the chunk's [T, V] logits: one dot is fastest
        # (the blocked loop costs ~15% of the whole step at N=4096, D=512, V=32000). A
        # symbolic V (jax.export) takes the one dot too: it is correct for any size.
        return one_dot()
    # GPU and TPU: one dot; XLA folds the addition into the GEMM's accumulator (beta = 1).
    return _reductions.on_cpu(lambda: _add_product_by_blocks(dw, x, dz, cfg), one_dot)


def _add_product_by_blocks(dw: jax.Array, x: jax.Array, dz: jax.Array, cfg: Config) -> jax.Array:
    """``dw + xᵀ @ dz`` one block of ``_DW_BLOCK`` classes at a time (CPU)."""
    num_classes = dz.shape[1]
    num_blocks = -(-num_classes // _DW_BLOCK)
    columns = lax.broadcasted_iota(jnp.int32, (1, _DW_BLOCK), 1)

    def add_block(i: Any, dw: jax.Array) -> jax.Array:
        nominal = i * _DW_BLOCK
        start = jnp.minimum(nominal, num_classes - _DW_BLOCK)
        dz_block = lax.dynamic_slice_in_dim(dz, start, _DW_BLOCK, axis=1)
        dz_block = jnp.where(start + columns >= nominal, dz_block, jnp.zeros_like(dz_block))
        product = _weight_grad_product(x, dz_block, cfg, dw.dtype)
        block = _classes_slice(dw, start, _DW_BLOCK, cfg) + product
        return _classes_update(dw, block, start, cfg)

    return lax.fori_loop(0, num_blocks, add_block, dw)


def _accumulate_chunk_grads(
    dz: jax.Array,
    x: jax.Array,
    w: jax.Array,
    dw: jax.Array,
    db: jax.Array | None,
    cfg: Config,
) -> tuple[tuple[jax.Array, jax.Array | None], jax.Array]:
    """From one chunk's logits gradient ``dz``: its ``dx`` (summed over the vocabulary's
    devices) and the ``w`` / ``bias`` gradient accumulators with its share added."""
    dz_op = dz.astype(x.dtype)
    dx = _loss_reduction.psum_over(_input_grad_product(dz_op, w, cfg, dz.dtype), cfg.axis_name)
    dw = _add_input_grad_product(dw, x, dz_op, cfg)
    if db is not None:
        db = db + jnp.sum(dz, axis=0)
    return (dw, db), dx.astype(x.dtype)


def _gradient_accumulators(
    x: jax.Array, w: jax.Array, bias: jax.Array | None
) -> tuple[jax.Array, jax.Array | None]:
    """Zero float accumulators for the ``w`` and ``bias`` gradients.

    Under ``shard_map`` they hold this device's classes and rows' contributions, so they
    are marked as varying over the mesh axes ``x`` and ``w`` vary over (the scan carries
    them through updates that do).
    """
    dtype = _dtypes.compute_dtype(w.dtype)
    dw = jnp.zeros(w.shape, dtype)
    db = None if bias is None else jnp.zeros(bias.shape, dtype)
    axes = tuple(sorted(_sharding.varying_axes(x) | _sharding.varying_axes(w), key=str))
    if axes:
        dw = lax.pcast(dw, axes, to="varying")
        db = None if db is None else lax.pcast(db, axes, to="varying")
    return dw, db


def _parameter_grads(
    dw: jax.Array, db: jax.Array | None, w: jax.Array, bias: jax.Array | None
) -> tuple[jax.Array, jax.Array | None]:
    """The accumulated ``w`` and ``bias`` gradients in their dtypes, summed over the devices
    that hold other rows of the batch (when the rows are sharded and ``w`` is not)."""
    dw = _sharding.sum_to_primal(dw, w).astype(w.dtype)
    if db is None or bias is None:
        return dw, None
    return dw, _sharding.sum_to_primal(db, bias).astype(bias.dtype)


def _to_chunks(tree: Any, chunk: int) -> Any:
    return jax.tree.map(lambda a: a.reshape((a.shape[0] // chunk, chunk, *a.shape[1:])), tree)


def _from_chunks(tree: Any) -> Any:
    return jax.tree.map(lambda a: a.reshape((-1, *a.shape[2:])), tree)


def _row_scale(rows: _labels.Targets, cotangent: Any) -> jax.Array:
    """Per-row factor of the logits' gradient: the cotangent for rows that count, 0 for rows
    that do not (ignored, padding), NaN for rows with an invalid label (their loss is NaN)."""
    g = jnp.broadcast_to(jnp.asarray(cotangent, rows.weight.dtype), rows.weight.shape)
    return _labels.nan_where_bad(rows, jnp.where(rows.active, g, jnp.zeros_like(g)))


def _mean_weights(rows: _labels.Targets, token_weights: jax.Array | None) -> jax.Array:
    """Each row's weight in the mean's denominator: ``w_y`` times its token weight."""
    return _loss_reduction.with_token_weights(rows.weight, rows.weight, token_weights)[1]


def _mean_scale(rows: _labels.Targets, token_weights: jax.Array | None, cfg: Config) -> jax.Array:
    """d mean / d loss_n = 1 / Σ w_y·t over every row (0 when nothing counts)."""
    total = _loss_reduction.batch_total(_mean_weights(rows, token_weights), cfg.batch_axes)
    return _elementwise.safe_reciprocal(total)


def _loss_scale(
    rows: _labels.Targets, token_weights: jax.Array | None, g: Any, cfg: Config
) -> jax.Array:
    """Per-row factor of the logits' gradient for the loss's cotangent ``g`` (a scalar, or
    per row for ``"none"``; None: 1): ``g`` times the token weight, over the mean's total."""
    factor = g
    if cfg.reduction == "mean":
        mean = _mean_scale(rows, token_weights, cfg)
        factor = mean if factor is None else factor * mean
    if token_weights is not None:
        factor = token_weights if factor is None else factor * token_weights
    return _row_scale(rows, 1.0 if factor is None else factor)


def _token_weight_grad(
    losses: jax.Array,
    rows: _labels.Targets,
    token_weights: jax.Array | None,
    loss: jax.Array,
    g: Any,
    cfg: Config,
) -> jax.Array | None:
    """``g · d loss / d t_n`` from the per-row losses ``ℓ_n`` (before the token weights):
    ``ℓ_n`` for ``"sum"`` / ``"none"``, ``(ℓ_n - mean·w_y) / Σ w_y·t`` for ``"mean"``."""
    if token_weights is None:
        return None
    grad = losses
    if cfg.reduction == "mean":
        grad = (losses - loss * rows.weight) * _mean_scale(rows, token_weights, cfg)
    return (g * grad).astype(token_weights.dtype)


def _class_totals(
    class_weights: jax.Array | None, num_local: int, cfg: Config, dtype: Any
) -> _Classes:
    """(w_c, W = Σ_c w_c over all classes, C) for the smoothing term."""
    num_classes = _loss_reduction.global_num_classes(num_local, cfg.axis_name)
    if class_weights is None:
        return _Classes(None, jnp.asarray(num_classes, dtype), num_classes)
    total = _loss_reduction.psum_over(jnp.sum(class_weights.astype(dtype)), cfg.axis_name)
    return _Classes(class_weights, total, num_classes)


def resolve_rows(labels: jax.Array, ops: Operands, cfg: Config) -> _labels.Targets:
    """Where each row's label points and whether it counts (padding rows do not)."""
    return _labels.resolve(
        labels,
        num_local=num_local_classes(ops.w, cfg),
        axis_name=cfg.axis_name,
        ignore_index=cfg.ignore_index,
        class_weights=ops.class_weights,
        dtype=_dtypes.compute_dtype(ops.x.dtype),
        counted=jnp.arange(labels.shape[0]) < cfg.num_rows,  # padding rows count for nothing
    )


def _setup(ops: Operands, cfg: Config) -> tuple[_labels.Targets, _Classes]:
    dtype = _dtypes.compute_dtype(ops.x.dtype)
    rows = resolve_rows(ops.labels, ops, cfg)
    return rows, _class_totals(ops.class_weights, num_local_classes(ops.w, cfg), cfg, dtype)


def _assemble(
    losses: jax.Array,
    stats: RowStats | None,
    rows: _labels.Targets,
    token_weights: jax.Array | None,
    cfg: Config,
) -> Any:
    """The kernels' output from the per-row losses: the reduced loss (token-weighted), with
    the rows' aux statistics when ``return_aux``."""
    loss, weight = _loss_reduction.with_token_weights(losses, rows.weight, token_weights)
    loss = _loss_reduction.reduce_loss(loss, weight, cfg.reduction, cfg.batch_axes)
    return (loss, stats) if cfg.return_aux else loss


def _split_cotangent(
    ct: Any, stats: RowStats | None, cfg: Config
) -> tuple[Any, AuxCotangent | None]:
    """The loss's cotangent (zeros for a symbolic zero) and the aux outputs' (None when
    both are symbolic zeros: nothing to re-form for)."""
    dense = _symbolic_zeros.dense
    if not cfg.return_aux:
        return dense(ct), None
    g, stats_ct = ct
    if _symbolic_zeros.is_zero(stats_ct.lse) and _symbolic_zeros.is_zero(stats_ct.entropy):
        return dense(g), None
    assert stats is not None
    return dense(g), AuxCotangent(dense(stats_ct.lse), dense(stats_ct.entropy), stats.entropy)


# ----------------------------------------------------------------------------- custom_vjp


def _chunk_forward(
    x: jax.Array, rows: _labels.Targets, ops: Operands, classes: _Classes, cfg: Config
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array, RowStats | None]:
    """One chunk's logits, ``tanh(z/s)`` (or None), per-row losses, log-normalisers and
    (with ``return_aux``) aux statistics."""
    raw = _product_logits(x, ops.w, ops.bias, cfg)
    z, capped = _scaled_logits(raw, cfg)
    target = _target_logits(x, ops.w, ops.bias, rows, cfg)
    maxima = _run_maxima(raw, cfg) if cfg.return_aux else None
    loss, lse = _chunk_loss(z, target, rows, classes, cfg, maxima)
    stats = None
    if cfg.return_aux:
        stats = _chunk_row_stats(z, lse, raw, num_local_classes(ops.w, cfg), cfg, maxima)
    return z, capped, loss, lse, stats


def _run_maxima(raw: jax.Array, cfg: Config) -> jax.Array | None:
    """With ``return_aux``: the chunk's :func:`~jxent._reductions.chunk_maxima`, from which
    the log-normaliser's row max and the aux outputs' argmax both come (one max pass over
    the chunk instead of three); None when the logits are capped or tempered (``z`` is not
    ``raw``) or the row has no suitable divisor."""
    if cfg.logit_softcap is not None or cfg.temperature != 1.0:
        return None
    return _reductions.chunk_maxima(raw, None)


def _chunked_rows(ops: Operands, cfg: Config) -> tuple[Any, ...]:
    """The rows' targets, losses, log-normalisers and aux statistics, chunk by chunk (no
    gradients)."""
    rows, classes = _setup(ops, cfg)

    def step(carry: None, chunk: tuple[Any, ...]) -> tuple[None, Any]:
        x_c, rows_c = chunk
        *_, loss, lse, stats = _chunk_forward(x_c, rows_c, ops, classes, cfg)
        return carry, (loss, lse, stats)

    _, out = lax.scan(step, None, _to_chunks((ops.x, rows), cfg.chunk_size))
    return rows, *_from_chunks(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _impl(ops: Operands, cfg: Config) -> Any:
    """Loss only (no gradient work): the path taken by evaluation."""
    rows, losses, _, stats = _chunked_rows(ops, cfg)
    return _assemble(losses, stats, rows, ops.token_weights, cfg)


def _fwd(ops: Operands, cfg: Config) -> tuple[Any, tuple[Any, ...]]:
    ops = _symbolic_zeros.primal_values(ops)
    if cfg.reduction == "none":
        return _fwd_reforming(ops, cfg)
    rows, classes = _setup(ops, cfg)
    # Gradients for a unit cotangent; the backward pass scales them by the real one.
    scale = _loss_scale(rows, ops.token_weights, None, cfg)

    def step(carry: tuple[Any, ...], chunk: tuple[Any, ...]) -> tuple[Any, Any]:
        dw, db = carry
        x_c, rows_c, scale_c = chunk
        z, capped, loss, lse, stats = _chunk_forward(x_c, rows_c, ops, classes, cfg)
        dz = _chunk_logits_grad(z, capped, lse, rows_c, scale_c, classes, cfg)
        (dw, db), dx_c = _accumulate_chunk_grads(dz, x_c, ops.w, dw, db, cfg)
        return (dw, db), (loss, dx_c, stats)

    init = _gradient_accumulators(ops.x, ops.w, ops.bias)
    chunks = _to_chunks((ops.x, rows, scale), cfg.chunk_size)
    (dw, db), (losses, dx, stats) = lax.scan(step, init, chunks)
    losses, stats = _from_chunks((losses, stats))
    out = _assemble(losses, stats, rows, ops.token_weights, cfg)
    loss = out[0] if cfg.return_aux else out
    dt = _token_weight_grad(losses, rows, ops.token_weights, loss, 1.0, cfg)
    grads = (dx.reshape(ops.x.shape), *_parameter_grads(dw, db, ops.w, ops.bias), dt)
    # For aux cotangents, which only the backward pass sees: what re-forming needs.
    reform = (ops, rows, stats.lse) if cfg.return_aux else None
    return out, (grads, reform, stats)


def _fwd_reforming(ops: Operands, cfg: Config) -> tuple[Any, tuple[Any, ...]]:
    """``reduction="none"``: the losses now, every gradient re-formed in the backward pass."""
    rows, losses, lse, stats = _chunked_rows(ops, cfg)
    out = _assemble(losses, stats, rows, ops.token_weights, cfg)
    saved_losses = None if ops.token_weights is None else losses
    return out, ((ops, rows, lse), saved_losses, stats)


def _bwd(cfg: Config, residuals: tuple[Any, ...], ct: Any) -> tuple[Operands]:
    g, aux = _split_cotangent(ct, residuals[2], cfg)
    if cfg.reduction == "none":
        saved, losses, _ = residuals
        ops, rows = saved[0], saved[1]
        scale = _loss_scale(rows, ops.token_weights, g, cfg)
        dx, dw, db = _reformed_grads(saved, scale, aux, cfg)
        dt = _token_weight_grad(losses, rows, ops.token_weights, None, g, cfg)  # type: ignore[arg-type]
        return (Operands(dx, dw, db, None, None, dt),)
    grads, reform, _ = residuals
    scale = g.astype(_dtypes.compute_dtype(g.dtype))
    grads = [None if d is None else (scale * d).astype(d.dtype) for d in grads]
    if aux is not None:
        extra = _reformed_grads(reform, None, aux, cfg)
        grads[:3] = [None if d is None else d + e for d, e in zip(grads[:3], extra, strict=True)]
    dx, dw, db, dt = grads
    return (Operands(dx, dw, db, None, None, dt),)


def _reformed_grads(
    saved: tuple[Any, ...], scale: jax.Array | None, aux: AuxCotangent | None, cfg: Config
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Every chunk's logits re-formed from ``x``, ``w`` and the saved log-normalisers, and
    their gradient for the per-row loss factors ``scale`` (None: none) and aux cotangents."""
    ops, rows, lse = saved
    classes = _class_totals(
        ops.class_weights,
        num_local_classes(ops.w, cfg),
        cfg,
        _dtypes.compute_dtype(ops.x.dtype),
    )

    def step(carry: tuple[Any, ...], chunk: tuple[Any, ...]) -> tuple[Any, Any]:
        dw, db = carry
        x_c, rows_c, lse_c, scale_c, aux_c = chunk
        z, capped = _chunk_logits(x_c, ops.w, ops.bias, cfg)
        dz = _chunk_logits_grad(z, capped, lse_c, rows_c, scale_c, classes, cfg, aux_c)
        return _accumulate_chunk_grads(dz, x_c, ops.w, dw, db, cfg)

    init = _gradient_accumulators(ops.x, ops.w, ops.bias)
    chunks = _to_chunks((ops.x, rows, lse, scale, aux), cfg.chunk_size)
    (dw, db), dx = lax.scan(step, init, chunks)
    return (dx.reshape(ops.x.shape), *_parameter_grads(dw, db, ops.w, ops.bias))


_impl.defvjp(_fwd, _bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- vocabulary blocks
#
# GPU and TPU. The chunked kernel above computes every gradient during the forward pass, so it
# must keep a float32 [D, V] accumulator for dw beside the gradient it returns (a second copy
# of w, twice its size in bfloat16). Here the loop runs over blocks of the vocabulary instead,
# each covering all N tokens, in the manner of Cut Cross-Entropy's backward: the forward pass
# merges the blocks' log-normalisers (online logsumexp) and saves one float per row; the
# backward pass re-forms each block's logits, forms its dw slice in a single GEMM with float32
# accumulation over all tokens and writes it once, in w's dtype, into the gradient it returns,
# while the [N, D] input gradient is the float32 accumulator. Four matmuls in all (one more
# than the chunked kernel) and temporaries bounded by the block: no N·V, no D·V buffer. The
# aux statistics merge like the log-normaliser (the entropy by _rebased, the first maximum
# by comparison), and aux cotangents join the backward pass's re-formed logits for free.
# Under GSPMD (meshes of Auto axes) the blocks run over vocabulary groups (_Block,
# _vocabulary_groups) so that each device's share of a block is a slice of its own classes.


class _Block(NamedTuple):
    """One vocabulary block: columns ``[start, start + size)`` of this device's classes, of
    which those before ``nominal`` (the last block's overlap with its predecessor) are not
    this block's to count.

    With ``groups = G > 1`` (meshes of ``Auto`` axes, see :func:`_vocabulary_groups`) the
    classes are viewed as ``[G, V / G]`` and the block is columns ``[start, start + size)``
    of every group, ``G · size`` classes laid out group by group: block column ``c`` is class
    ``(c // size) · V / G + start + c % size``. GSPMD shards the ``G`` axis like ``w``'s
    vocabulary, so every device reads a block of its own classes."""

    start: jax.Array
    fresh: jax.Array  # [1, groups · size] bool: the column belongs to this block
    size: Any  # columns per group
    groups: int
    group_length: Any  # V / G
    w: jax.Array
    bias: jax.Array | None
    class_weights: jax.Array | None


def vocab_block_size(
    num_rows: Any,
    num_local_classes: Any,
    requested: int = 0,
    accelerator: str = "gpu",
    budget_bytes: int = 0,
) -> Any:
    """Classes per block of the vocabulary-blocked kernel (GPU, TPU).

    The most multiples of 128 classes (TPU's lane width) whose float32 ``[N, block]`` logits
    fit ``budget_bytes`` (0: the accelerator's ``_VOCAB_BLOCK_BYTES``), at least 128, at most
    ``V``. With ``N`` symbolic (``jax.export``), ``_SYMBOLIC_VOCAB_BLOCK`` classes; with ``V``
    symbolic, ``min(V, ·)``. ``requested`` (> 0) replaces the budget's choice (tests use small
    blocks).
    """
    if requested:
        block = requested
    elif isinstance(num_rows, int):
        budget = budget_bytes or _VOCAB_BLOCK_BYTES[accelerator]
        block = budget // (4 * max(num_rows, 1)) // 128 * 128
        block = max(_MIN_VOCAB_BLOCK, block)
    else:
        block = _SYMBOLIC_VOCAB_BLOCK
    if isinstance(num_local_classes, int):
        return min(block, max(num_local_classes, 1))
    return jax_core.min_dim(num_local_classes, block)


def _num_blocks(num_classes: Any, block: Any) -> Any:
    """``ceil(V / block)``: a Python int, or a traced one for symbolic shapes (then the loops
    are while loops, which reverse-mode differentiation of the backward rule cannot enter)."""
    if isinstance(num_classes, int) and isinstance(block, int):
        return -(-num_classes // block)
    num_classes, block = jnp.asarray(num_classes), jnp.asarray(block)
    return (num_classes + block - 1) // block


def _group_length(w: jax.Array, cfg: Config) -> Any:
    """Classes per group of the blocked kernel's vocabulary (``V / G``; ``V`` for ``G = 1``)."""
    return num_local_classes(w, cfg) // cfg.vocab_groups


def _blocked_size(x: jax.Array, w: jax.Array, cfg: Config, num_rows: Any = None) -> Any:
    """Classes per group and block: the budget's ``[rows, block]`` float32 logits per block
    and group (``rows``: all ``N``, or a row tile's). With ``G`` groups over ``G`` devices that
    share the rows and the classes, each device holds ``G / devices`` of the
    ``[rows, G · block]`` logits: one budget. On meshes the budget is ``_MESH_BLOCK_BYTES``."""
    rows = x.shape[0] if num_rows is None else num_rows
    if not _on_mesh(x, w, cfg):
        return vocab_block_size(rows, _group_length(w, cfg), cfg.vocab_block, cfg.accelerator)
    # A block's bytes per class on a mesh: its float32 logits column and the block of w it
    # is re-formed from, which XLA:GPU copies out of w for the GEMM (counted in float32).
    per_class_rows = rows + x.shape[1] if isinstance(rows, int) else rows
    return vocab_block_size(
        per_class_rows, _group_length(w, cfg), cfg.vocab_block, cfg.accelerator, _MESH_BLOCK_BYTES
    )


def _on_mesh(x: jax.Array, w: jax.Array, cfg: Config) -> bool:
    """Whether the kernel runs for one device of several: under GSPMD (a mesh of ``Auto``
    axes) or per shard (``shard_map``, explicit axes), where its budgets are per device."""
    return cfg.auto_devices > 1 or bool(_sharding.varying_axes(x) | _sharding.varying_axes(w))


def _vocab_block(i: Any, size: Any, ops: Operands, cfg: Config) -> _Block:
    """Block ``i``. All blocks have the same size (static shapes); the last starts at
    ``V / G - size`` and leaves its overlap with the previous block to that block."""
    nominal = i * size
    groups, length = cfg.vocab_groups, _group_length(ops.w, cfg)
    start = jnp.minimum(nominal, length - size)
    column = lax.broadcasted_iota(jnp.int32, (1, groups * size), 1)
    fresh = start + (column if groups == 1 else column % size) >= nominal
    block = _Block(start, fresh, size, groups, length, ops.w, None, None)

    def cut(a: jax.Array | None) -> jax.Array | None:
        return None if a is None else _block_columns(a, block, axis=a.ndim - 1)

    w_block = _block_columns(ops.w, block, vocab_axis(cfg.w_layout))
    if cfg.accelerator == "tpu" and w_block.dtype == jnp.float32:
        w_block = _varying_in_loop(w_block, i)
    return block._replace(w=w_block, bias=cut(ops.bias), class_weights=cut(ops.class_weights))


def _grouped(a: jax.Array, block: _Block | _Rows, axis: int) -> jax.Array:
    """``a`` with its vocabulary ``axis`` split into ``[G, V / G]`` (a local reshape when
    the vocabulary's shards are whole groups)."""
    return a.reshape((*a.shape[:axis], block.groups, -1, *a.shape[axis + 1 :]))


def _ungrouped(a: jax.Array, axis: int) -> jax.Array:
    """``a`` with axes ``axis`` and ``axis + 1`` (groups, columns) merged again."""
    return a.reshape((*a.shape[:axis], -1, *a.shape[axis + 2 :]))


def _block_columns(a: jax.Array, block: _Block | _Rows, axis: int) -> jax.Array:
    """The block's columns of ``a`` along its vocabulary ``axis``: ``[.., G · size, ..]``."""
    if block.groups == 1:
        return lax.dynamic_slice_in_dim(a, block.start, block.size, axis=axis)
    grouped = _grouped(a, block, axis)
    return _ungrouped(lax.dynamic_slice_in_dim(grouped, block.start, block.size, axis + 1), axis)


def _write_block(a: jax.Array, new: jax.Array, block: _Block | _Rows, axis: int) -> jax.Array:
    """``a`` with the block's own columns (along ``axis``) replaced by ``new``'s; its
    overlap with the previous block keeps the previous block's values."""
    keep = _keep_fresh(block, new, _block_columns(a, block, axis), axis)
    if block.groups == 1:
        return lax.dynamic_update_slice_in_dim(a, keep, block.start, axis=axis)
    grouped = _grouped(a, block, axis)
    keep = _grouped(keep, block, axis)
    return _ungrouped(lax.dynamic_update_slice_in_dim(grouped, keep, block.start, axis + 1), axis)


def _column_classes(column: jax.Array, block: _Block) -> jax.Array:
    """This device's class ids of block columns."""
    if block.groups == 1:
        return column + block.start
    return (column // block.size) * block.group_length + block.start + column % block.size


def _class_columns(classes: jax.Array, block: _Block) -> jax.Array:
    """The block columns of class ids, outside ``[0, G · size)`` for classes not in it."""
    if block.groups == 1:
        return classes - block.start
    group, offset = jnp.divmod(classes, block.group_length)
    offset = offset - block.start
    inside = (offset >= 0) & (offset < block.size)
    return jnp.where(inside, group * block.size + offset, -1)


def _varying_in_loop(w_block: jax.Array, i: Any) -> jax.Array:
    """``w_block · (1 + 0·i)``: the same values, but no longer a slice of the loop-invariant
    ``w``. At its default precision XLA:TPU multiplies float32 in bfloat16 and hoists the
    conversion of a loop-invariant operand out of the loop: a bfloat16 copy of all of ``w``
    (1,002 MiB at D=4096, V=128256) held beside it. A factor that depends on the loop index
    keeps the conversion in the loop, block by block; XLA does not fold ``0.0 · i`` (it would
    be NaN for an infinite ``i``). Compiled for TPU v5e: fused-loss temp 1,131 -> 129 MiB."""
    return w_block * (1.0 + 0.0 * jnp.asarray(i, w_block.dtype))


def _keep_fresh(block: _Block | _Rows, new: jax.Array, old: jax.Array, axis: int = -1) -> jax.Array:
    """``new`` in the block's own classes (along ``axis``), ``old`` (the previous block's)
    in its overlap."""
    fresh = block.fresh[0]
    return jnp.where(fresh if axis in (-1, new.ndim - 1) else fresh[:, None], new, old)


def _varying_like(arrays: Any, *references: jax.Array) -> Any:
    """Loop carries marked as varying over the mesh axes ``references`` vary over (inside
    ``shard_map`` a loop's carry must keep its type through updates that depend on them)."""
    axes = tuple(sorted(frozenset().union(*map(_sharding.varying_axes, references)), key=str))
    if not axes:
        return arrays
    return jax.tree.map(lambda a: lax.pcast(a, axes, to="varying"), arrays)


def _blocked_statistics(ops: Operands, rows: _labels.Targets, cfg: Config) -> tuple[Any, ...]:
    """Per-row log-normalisers over all classes (and ``Σ_c w_c z_c`` for label smoothing,
    the aux statistics, and with vocabulary groups the target logits), merged block by
    block: an online logsumexp, then one across the vocabulary's devices."""
    x = ops.x
    num_local = num_local_classes(ops.w, cfg)
    size = _blocked_size(x, ops.w, cfg)
    dtype = _dtypes.compute_dtype(x.dtype)
    smoothing = bool(cfg.label_smoothing)
    # Under GSPMD (groups), gathering w's columns at the labels from a sharded vocabulary is
    # an all-reduce of [N, D] (and on TPU a transposed copy of w for the gather): the target
    # logit is read off the blocks' logits instead, a sum over one block column per row.
    picks_target = cfg.vocab_groups > 1

    def add_block(i: Any, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        lse, weighted, target, aux = carry
        block = _vocab_block(i, size, ops, cfg)
        raw = _product_logits(x, block.w, block.bias, cfg)
        z, _ = _scaled_logits(raw, cfg)
        block_lse, block_aux = _block_lse_and_aux(z, raw, block, with_aux=aux is not None)
        total = jnp.logaddexp(lse, block_lse)
        if block_aux is not None:
            aux = _merge_block_stats(aux, lse, block_lse, total, block_aux, block)
        lse = total
        if smoothing:
            weights = 1.0 if block.class_weights is None else block.class_weights.astype(dtype)
            spread = jnp.where(block.fresh, weights, 0.0)
            weighted = weighted + jnp.sum(z * spread, axis=1)
        if picks_target:
            target = target + _block_target_logits(z, rows.local, block)
        return lse, weighted, target, aux

    num_rows = x.shape[0]
    aux_init = None
    if cfg.return_aux:
        aux_init = (
            jnp.zeros((num_rows,), dtype),
            jnp.full((num_rows,), -jnp.inf, dtype),
            jnp.zeros((num_rows,), jnp.int32),
        )
    zeros = jnp.zeros((num_rows,), dtype)
    init = (jnp.full((num_rows,), -jnp.inf, dtype), zeros, zeros, aux_init)
    init = _varying_like(init, x, ops.w)
    num_blocks = _num_blocks(_group_length(ops.w, cfg), size)
    lse, weighted, target, aux = lax.fori_loop(0, num_blocks, add_block, init)
    total = _merge_devices_lse(lse, cfg.axis_name)
    stats = None
    if aux is not None:
        entropy, top, arg = aux
        entropy = _loss_reduction.psum_over(_rebased(lse, entropy, total), cfg.axis_name)
        argmax = _aux_outputs.global_argmax(top, arg, cfg.axis_name, num_local)
        stats = RowStats(total, entropy, argmax)
    weighted = _loss_reduction.psum_over(weighted, cfg.axis_name) if smoothing else None
    return total, weighted, stats, (target if picks_target else None)


def _block_target_logits(z: jax.Array, labels: jax.Array, block: _Block) -> jax.Array:
    """Each row's logit at its label if the label is one of the block's own classes, else 0."""
    column = lax.broadcasted_iota(jnp.int32, z.shape, 1)
    hit = block.fresh & (column == _class_columns(labels, block)[:, None])
    return jnp.sum(jnp.where(hit, z, jnp.zeros_like(z)), axis=1)


def _block_lse_and_aux(
    z: jax.Array, raw: jax.Array, block: _Block, with_aux: bool
) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
    """A block's log-normaliser and, ``with_aux``, its (entropy, maximum, first column of
    it). For logits neither capped nor tempered (``z`` is ``raw``), all from one variadic
    reduction over the block (see :func:`~jxent._normaliser.online_normaliser_aux`), where
    the log-normaliser and then :func:`_entropy_and_max` read it three times."""
    masked = jnp.where(block.fresh, z, jnp.asarray(-jnp.inf, z.dtype))
    if with_aux and z is raw:
        norm, _, _, stats = _normaliser.online_normaliser_aux(masked)
        return norm.lse()[:, 0], (stats.entropy, stats.top, stats.argmax)
    lse = _normaliser.stable_logsumexp(masked)[:, 0]
    return lse, _entropy_and_max(z, lse, raw, block.fresh) if with_aux else None


def _merge_block_stats(
    aux: tuple[jax.Array, ...],
    lse: jax.Array,
    block_lse: jax.Array,
    total: jax.Array,
    block_aux: tuple[jax.Array, ...],
    block: _Block,
) -> tuple[jax.Array, ...]:
    """The running (entropy, maximum, its class) with one more block's merged in: the
    entropy under the merged log-normaliser ``total``, the earlier maximum kept on ties."""
    entropy, top, arg = aux
    block_entropy, block_top, block_arg = block_aux
    entropy = _rebased(lse, entropy, total) + _rebased(block_lse, block_entropy, total)
    better = block_top > top
    arg = jnp.where(better, _column_classes(block_arg, block).astype(arg.dtype), arg)
    return entropy, jnp.where(better, block_top, top), arg


def _merge_devices_lse(lse: jax.Array, axis_name: Hashable | None) -> jax.Array:
    """``log Σ_devices exp(lse_d)``: each device's log-normaliser over its classes, combined
    with one ``pmax`` and one ``psum`` of a value per row."""
    if axis_name is None:
        return lse
    shift = _elementwise.finite_or_zero(lax.pmax(lse, axis_name))
    return shift + jnp.log(lax.psum(jnp.exp(lse - shift), axis_name))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _blocked_impl(ops: Operands, cfg: Config) -> Any:
    return _blocked_forward(ops, cfg)[0]


def _blocked_fwd(ops: Operands, cfg: Config) -> tuple[Any, tuple[Any, ...]]:
    return _blocked_forward(_symbolic_zeros.primal_values(ops), cfg)


def _blocked_forward(ops: Operands, cfg: Config) -> tuple[Any, tuple[Any, ...]]:
    """The loss over all ``N`` rows and what the backward pass needs."""
    rows, classes = _setup(ops, cfg)
    lse, weighted, stats, target = _blocked_statistics(ops, rows, cfg)
    if target is None:
        target = _target_logits(ops.x, ops.w, ops.bias, rows, cfg)
    losses = _row_losses(lse, target, weighted, rows, classes, cfg)
    out = _assemble(losses, stats, rows, ops.token_weights, cfg)
    # What the token weights' gradient needs: the per-row losses and the reduced loss.
    for_tokens = None
    if ops.token_weights is not None:
        for_tokens = (losses, out[0] if cfg.return_aux else out)
    return out, (ops, rows, lse, for_tokens, stats)


def _blocked_bwd(cfg: Config, saved: tuple[Any, ...], ct: Any) -> tuple[Operands]:
    ops, rows, lse, for_tokens, stats = saved
    x, w = ops.x, ops.w
    g, aux = _split_cotangent(ct, stats, cfg)
    dtype = _dtypes.compute_dtype(x.dtype)
    classes = _class_totals(ops.class_weights, num_local_classes(w, cfg), cfg, dtype)
    g = g.astype(dtype)
    per_row = _RowInputs(rows, lse, _loss_scale(rows, ops.token_weights, g, cfg), aux)
    if _splits_backward(x, w, cfg):
        dx = _input_grad_by_row_tiles(ops, per_row, classes, cfg)
        dw_ops = _after(dx, ops, cfg)
        _, dw, db = _grads_by_vocab_blocks(dw_ops, per_row, classes, cfg, with_dx=False)
    else:
        summed_dx, dw, db = _grads_by_vocab_blocks(ops, per_row, classes, cfg, with_dx=True)
        assert summed_dx is not None
        dx = summed_dx
    dt = None
    if for_tokens is not None:
        losses, loss = for_tokens
        dt = _token_weight_grad(losses, rows, ops.token_weights, loss, g, cfg)
    dw, db = _parameter_grads(dw, db, w, ops.bias)
    return (Operands(dx, dw, db, None, None, dt),)


def _after(dx: jax.Array, ops: Operands, cfg: Config) -> Operands:
    """``ops`` with ``x`` read only once ``dx`` is formed, so that the ``dw`` pass runs after
    the ``dx`` pass: XLA may then place the ``dx`` pass's temporaries (and, on TPU, the copy
    of ``w`` it makes to split its lane axis into vocabulary groups) in the buffer of ``w``'s
    gradient, which only the ``dw`` pass writes. Not on TPU without groups, where XLA:TPU,
    left to order the passes itself, keeps the ``dx`` sums out of the temporaries it counts
    (in memory space 1). An optimisation barrier's outputs vary over the union of its
    operands' manual axes: ``dx`` is paired only with what varies alike."""
    if cfg.accelerator == "tpu" and cfg.vocab_groups == 1:
        return ops
    if _sharding.varying_axes(dx) != _sharding.varying_axes(ops.x):
        return ops
    _, x = lax.optimization_barrier((dx, ops.x))
    return ops._replace(x=x)


class _RowInputs(NamedTuple):
    """What the logits' gradient needs of each row (all ``[N]``, or ``None``): where its
    label points, its log-normaliser, its loss factor and the aux outputs' cotangents."""

    rows: _labels.Targets
    lse: jax.Array
    scale: jax.Array
    aux: AuxCotangent | None


def _block_logits_grad(
    x: jax.Array, per_row: _RowInputs, block: _Block, classes: _Classes, cfg: Config
) -> jax.Array:
    """The float32 gradient of the logits ``x @ block.w`` (re-formed), 0 in the columns that
    are not the block's own."""
    z, capped = _chunk_logits(x, block.w, block.bias, cfg)
    block_rows = per_row.rows._replace(local=_class_columns(per_row.rows.local, block))
    block_classes = classes._replace(weights=block.class_weights)
    dz = _chunk_logits_grad(
        z, capped, per_row.lse, block_rows, per_row.scale, block_classes, cfg, per_row.aux
    )
    return jnp.where(block.fresh, dz, jnp.zeros_like(dz))


def _grads_by_vocab_blocks(
    ops: Operands, per_row: _RowInputs, classes: _Classes, cfg: Config, with_dx: bool
) -> tuple[jax.Array | None, jax.Array, jax.Array | None]:
    """One pass over the vocabulary blocks, each covering all rows: each block's ``dw`` (and
    ``db``) written once, in ``w``'s dtype; with ``with_dx`` the ``[N, D]`` input gradient
    summed over the blocks too (else None)."""
    x, w = ops.x, ops.w
    dtype = _dtypes.compute_dtype(x.dtype)
    size = _blocked_size(x, w, cfg)
    dx_sum = _input_grad_accumulator(x, cfg)

    def add_block(i: Any, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        dx, dw, db = carry
        block = _vocab_block(i, size, ops, cfg)
        dz = _block_logits_grad(x, per_row, block, classes, cfg)
        dz_op = dz.astype(x.dtype)
        # float32 accumulation over all N tokens inside the GEMM; rounded once to dw's dtype.
        dw_block = _weight_grad_product(x, dz_op, cfg, dtype)
        if sum_each_block:
            dw_block = _sharding.sum_to_primal(dw_block, w)
        dw = _write_block(dw, dw_block.astype(dw.dtype), block, vocab_axis(cfg.w_layout))
        if dx is not None:
            dx = dx_sum.add(dx, _input_grad_product(dz_op, block.w, cfg, dtype))
        if db is not None:
            db = _write_block(db, jnp.sum(dz, axis=0), block, 0)
        return dx, dw, db

    # When the rows are sharded over devices that share w, w's gradient is a sum over
    # devices. In half precision each block is summed over them before it is rounded and
    # written (one all-reduce of a block per step): a float32 partial sum of the whole
    # gradient, waiting for one psum after the loop, would be twice the size of w's shard.
    # In float32 that partial sum is the gradient's own buffer, and a block's all-reduce
    # would need a block-sized buffer more.
    rows_sharded = bool(_sharding.varying_axes(x) - _sharding.varying_axes(w))
    sum_each_block = rows_sharded and w.dtype != dtype
    dx_init = dx_sum.zeros() if with_dx else None
    db_init = None if ops.bias is None else jnp.zeros(ops.bias.shape, dtype)
    dx_init, db_init = _varying_like((dx_init, db_init), x, w)
    dw_varies_like = (w,) if sum_each_block else (x, w)
    dw_init = _varying_like(jnp.zeros(w.shape, w.dtype), *dw_varies_like)
    init = (dx_init, dw_init, db_init)
    num_blocks = _num_blocks(_group_length(w, cfg), size)
    dx, dw, db = lax.fori_loop(0, num_blocks, add_block, init)
    if dx is not None:
        dx = _loss_reduction.psum_over(dx_sum.value(dx), cfg.axis_name).astype(x.dtype)
    return dx, dw, db


# ----------------------------------------------------------------------------- row tiles (meshes)
#
# On a mesh the [N, D] float32 input-gradient accumulator of the pass above is a device's rows
# times all of D: on 8 x H100 at N=8192, D=4096 (rows over 2 devices) 64 MiB, a quarter of
# optax's per-device logits. There the backward pass is split, as in Cut Cross-Entropy: the
# pass over vocabulary blocks forms dw (and db) alone, and a second pass forms dx tile by tile
# of rows (row tiles outer, vocabulary blocks inner), each tile's float32 sum written once, in
# x's dtype, into dx. The price is the logits re-formed once more: five matmuls instead of
# four. Under GSPMD the rows are viewed as [G_rows, N / G_rows] for the reason the vocabulary
# is (_vocabulary_groups): a dynamic slice of a sharded axis would make it gather x.


class _Rows(NamedTuple):
    """One row tile: rows ``[start, start + size)`` of every one of ``groups`` row groups of
    ``group_length`` rows; those before ``nominal`` (the last tile's overlap) are not its own
    to write (the fields :func:`_block_columns` and :func:`_write_block` read)."""

    start: jax.Array
    fresh: jax.Array  # [1, groups · size] bool
    size: int
    groups: int
    group_length: int


def _splits_backward(x: jax.Array, w: jax.Array, cfg: Config) -> bool:
    """Whether the backward pass is split into a ``dw`` pass and a ``dx`` pass over row
    tiles: on meshes, where the shapes are static."""
    static = isinstance(x.shape[0], int) and isinstance(x.shape[1], int)
    return static and _on_mesh(x, w, cfg)


def _row_groups(num_rows: int, cfg: Config) -> int:
    """``gcd(N, devices)`` under GSPMD (every row shard holds whole groups), else 1."""
    return math.gcd(num_rows, cfg.auto_devices)


def _row_tile_size(num_rows: int, num_features: int, cfg: Config) -> int:
    """Rows per group and tile: the most multiples of 8 whose float32 ``[rows, D]``
    accumulator, over all row groups, fits ``_MESH_ROWS_BYTES`` (whatever share of the row
    groups a device holds); at least 8, at most a group. ``cfg.vocab_block`` (tests) replaces
    the budget's choice here too."""
    groups = _row_groups(num_rows, cfg)
    length = num_rows // groups
    if cfg.vocab_block:
        return min(cfg.vocab_block, length)
    rows = _MESH_ROWS_BYTES // (4 * max(num_features, 1)) // groups // 8 * 8
    return min(max(8, rows), length)


def _row_tile(r: Any, size: int, groups: int, length: int) -> _Rows:
    """Row tile ``r``; the last starts at ``length - size`` (as :func:`_vocab_block`)."""
    nominal = r * size
    start = jnp.minimum(nominal, length - size)
    row = lax.broadcasted_iota(jnp.int32, (1, groups * size), 1)
    fresh = start + (row if groups == 1 else row % size) >= nominal
    return _Rows(start, fresh, size, groups, length)


def _input_grad_by_row_tiles(
    ops: Operands, per_row: _RowInputs, classes: _Classes, cfg: Config
) -> jax.Array:
    """``dx``, tile by tile of rows: each tile's logits re-formed block by block of the
    vocabulary, its float32 sum summed over the vocabulary's devices and written once."""
    x, w = ops.x, ops.w
    num_rows, num_features = x.shape
    dtype = _dtypes.compute_dtype(x.dtype)
    groups = _row_groups(num_rows, cfg)
    length = num_rows // groups
    tile = _row_tile_size(num_rows, num_features, cfg)
    size = _blocked_size(x, w, cfg, num_rows=groups * tile)
    num_blocks = _num_blocks(_group_length(w, cfg), size)

    num_tiles = _num_blocks(length, tile)

    def tile_inputs(r: Any) -> tuple[_Rows, jax.Array, _RowInputs]:
        rows = _row_tile(r, tile, groups, length)
        x_tile, inputs = jax.tree.map(lambda a: _block_columns(a, rows, 0), (x, per_row))
        return rows, x_tile, inputs

    def add_block(i: Any, x_tile: jax.Array, inputs: _RowInputs, acc: jax.Array) -> jax.Array:
        block = _vocab_block(i, size, ops, cfg)
        dz = _block_logits_grad(x_tile, inputs, block, classes, cfg)
        return acc + _input_grad_product(dz.astype(x.dtype), block.w, cfg, dtype)

    def write_tile(dx: jax.Array, acc: jax.Array, rows: _Rows) -> jax.Array:
        acc = _loss_reduction.psum_over(acc, cfg.axis_name).astype(x.dtype)
        return _write_block(dx, acc, rows, 0)

    dx = _varying_like(jnp.zeros(x.shape, x.dtype), x)
    acc = _varying_like(jnp.zeros((groups * tile, num_features), dtype), x, w)
    if _tpu_copies_w_in_nested_loops(w, cfg):
        return _input_grad_in_one_loop(
            num_tiles, num_blocks, tile_inputs, add_block, write_tile, (dx, acc)
        )

    def add_tile(r: Any, dx: jax.Array) -> jax.Array:
        rows, x_tile, inputs = tile_inputs(r)
        total = lax.fori_loop(0, num_blocks, lambda i, a: add_block(i, x_tile, inputs, a), acc)
        return write_tile(dx, total, rows)

    return lax.fori_loop(0, num_tiles, add_tile, dx)


def _tpu_copies_w_in_nested_loops(w: jax.Array, cfg: Config) -> bool:
    """Whether XLA:TPU would copy ``w`` for the row tiles' nested loops (see
    :func:`_input_grad_in_one_loop`): a ``[D, V]`` ``w`` whose vocabulary groups (or, per
    shard, classes) are not a whole number of 128-lane tiles."""
    return (
        cfg.accelerator == "tpu"
        and cfg.w_layout == "dv"
        and _group_length(w, cfg) % _TPU_LANES != 0
    )


def _input_grad_in_one_loop(
    num_tiles: int,
    num_blocks: int,
    tile_inputs: Any,
    add_block: Any,
    write_tile: Any,
    init: tuple[jax.Array, jax.Array],
) -> jax.Array:
    """The row tiles' loop over vocabulary blocks as one loop over (tile, block) pairs, each
    tile written (under ``lax.cond``) after its last block.

    Why (TPU, :func:`_tpu_copies_w_in_nested_loops`): XLA:TPU lays out a ``[D, V]`` array
    whose ``V`` is not a multiple of 128 lanes with ``D`` minor, and for the nested loops
    it copied such a ``w`` into the other layout (on a v5e 2x2 mesh with the vocabulary
    over all four devices: a device's 252 MiB of bfloat16 ``w`` at D=4096, V=128256, Auto
    or Explicit axes); the flat loop reads ``w`` where it lies (0.6 to 0.9 MiB of
    temporaries; docs/bench/mesh_layouts.md). Elsewhere it is not used: in float32 it held a
    block of ``w`` more (+16 MiB), and on GPU a conditional costs a predicate read by the
    host per step."""

    def step(k: Any, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        dx, acc = carry
        r, i = k // num_blocks, k % num_blocks
        rows, x_tile, inputs = tile_inputs(r)
        acc = add_block(i, x_tile, inputs, acc)
        last = i == num_blocks - 1
        dx = lax.cond(last, lambda: write_tile(dx, acc, rows), lambda: dx)
        return dx, jnp.where(last, jnp.zeros_like(acc), acc)

    return lax.fori_loop(0, num_tiles * num_blocks, step, init)[0]


class _WholeAccumulator(NamedTuple):
    """The ``[N, D]`` input gradient summed over vocabulary blocks in one array of the
    compute dtype (float32, or float64 for float64 inputs)."""

    shape: tuple[int, ...]
    dtype: Any

    def zeros(self) -> jax.Array:
        return jnp.zeros(self.shape, self.dtype)

    def add(self, acc: jax.Array, term: jax.Array) -> jax.Array:
        return acc + term

    def value(self, acc: jax.Array) -> jax.Array:
        return acc


class _SplitFloat32Accumulator(NamedTuple):
    """The same float32 sum, bit for bit, stored as two 16-bit halves in bfloat16 arrays:
    the high half (the sum truncated to bfloat16) and the low half (its other 16 mantissa
    bits, reinterpreted). Each block joins them, adds its product in float32 and splits the
    result again; after the loop they are joined once and rounded to the bfloat16 gradient.

    Why (TPU, bfloat16 ``x``): a float32 ``[N, D]`` array is ``4·N·D`` bytes, more than a
    sixteenth of the ``[N, V]`` bfloat16 logits whenever ``D > V/32``. XLA:TPU computes the
    join, add and split in the dx GEMM's fused epilogue, writes both halves from it, and
    rounds them to ``dx`` in the high half's buffer, which it assigns to the output: the
    temporaries hold only the low half (``2·N·D``). Compiled for TPU v5e at N=8192,
    D=4096, V=128256: fused-loss temp 128.7 -> 64.8 MiB, bytes accessed and cost-model time
    unchanged (docs/accelerators.md). On GPU the GEMM would write its float32 product to
    memory before the split instead of accumulating in place (H100: temp 176 -> 256 MiB),
    so it keeps :class:`_WholeAccumulator`.
    """

    shape: tuple[int, ...]

    def zeros(self) -> tuple[jax.Array, jax.Array]:
        return jnp.zeros(self.shape, jnp.bfloat16), jnp.zeros(self.shape, jnp.bfloat16)

    def add(self, acc: tuple[jax.Array, jax.Array], term: jax.Array) -> tuple[jax.Array, ...]:
        return _float32_halves(self.value(acc) + term)

    def value(self, acc: tuple[jax.Array, jax.Array]) -> jax.Array:
        return _joined_halves(*acc)


# The halves are bit manipulations, through which JAX would differentiate to zero: their JVPs
# (used when the backward rule is differentiated again, e.g. jax.hessian) carry the tangent
# of the float32 sum as a compensated pair of bfloat16 values instead (hi + lo, ~16 bits).
@jax.custom_jvp
def _float32_halves(total: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A float32 array's high and low 16 bits, each reinterpreted as bfloat16."""
    bits = lax.bitcast_convert_type(total, jnp.uint32)
    return _bfloat16_bits(bits >> 16), _bfloat16_bits(bits)


@_float32_halves.defjvp
def _float32_halves_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> Any:
    (total,), (tangent,) = primals, tangents
    high = tangent.astype(jnp.bfloat16)
    return _float32_halves(total), (high, (tangent - high.astype(tangent.dtype)).astype(high.dtype))


@jax.custom_jvp
def _joined_halves(high: jax.Array, low: jax.Array) -> jax.Array:
    """The float32 array whose high and low 16 bits ``high`` and ``low`` hold."""
    high_bits, low_bits = (
        lax.bitcast_convert_type(a, jnp.uint16).astype(jnp.uint32) for a in (high, low)
    )
    return lax.bitcast_convert_type((high_bits << 16) | low_bits, jnp.float32)


@_joined_halves.defjvp
def _joined_halves_jvp(primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]) -> Any:
    (high, low), (d_high, d_low) = primals, tangents
    return _joined_halves(high, low), d_high.astype(jnp.float32) + d_low.astype(jnp.float32)


def _bfloat16_bits(bits: jax.Array) -> jax.Array:
    """The low 16 bits of ``bits`` (uint32) reinterpreted as bfloat16."""
    return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)


def _input_grad_accumulator(x: jax.Array, cfg: Config) -> Any:
    """Split halves on TPU for a bfloat16 ``x`` whose gradient needs no sum over the
    vocabulary's devices (a ``psum``, or GSPMD's partial sums over vocabulary groups, need
    the float32 array whole); whole elsewhere."""
    summed_over_devices = cfg.axis_name is not None or cfg.vocab_groups > 1
    if cfg.accelerator == "tpu" and x.dtype == jnp.bfloat16 and not summed_over_devices:
        return _SplitFloat32Accumulator(x.shape)  # bfloat16's compute dtype is float32
    return _WholeAccumulator(x.shape, _dtypes.compute_dtype(x.dtype))


_blocked_impl.defvjp(_blocked_fwd, _blocked_bwd, symbolic_zeros=True)


def local_loss(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    class_weights: jax.Array | None,
    token_weights: jax.Array | None,
    options: Config,
) -> Any:
    """The loss over the rows of ``x`` (this device's, under explicit sharding): the chunked
    kernel on CPU, the vocabulary-blocked one on GPU and TPU, over vocabulary groups on
    meshes of ``Auto`` axes (:func:`_vocabulary_groups`); ``options.kernel`` forces one.
    With ``options.return_aux``, ``(loss, CrossEntropyAux)``."""
    batch_shape = x.shape[:-1]
    num_rows = math.prod(batch_shape)
    # A signed label dtype, so that a negative ignore_index compares correctly.
    flat_labels = _labels.widen(labels.reshape(-1), options.ignore_index)
    flat_tokens = None if token_weights is None else token_weights.reshape(-1)
    ops = Operands(
        x.reshape(num_rows, x.shape[-1]), w, bias, flat_labels, class_weights, flat_tokens
    )

    devices = _auto_mesh_devices(x, w)
    groups = _vocabulary_groups(num_local_classes(w, options), devices)

    def chunked() -> Any:
        return _chunked_loss(ops, options, num_rows)

    def blocked_on(accelerator: str) -> Any:
        # (A symbolic V on an Auto mesh reaches here only when a test forces the kernel.)
        groups_or_one = max(groups, 1)
        cfg = options._replace(
            num_rows=num_rows,
            accelerator=accelerator,
            vocab_groups=groups_or_one,
            auto_devices=devices,
        )
        return _blocked_impl(ops, cfg)

    def blocked() -> Any:
        return _reductions.platform_dependent(
            on=(x, w), tpu=lambda: blocked_on("tpu"), default=lambda: blocked_on("gpu")
        )

    if options.kernel == "chunked" or (options.kernel == "auto" and groups == 0):
        out = chunked()
    elif options.kernel == "blocked":
        out = blocked()
    else:
        out = _reductions.on_cpu(chunked, blocked, on=(x, w))
    loss, stats = out if options.return_aux else (out, None)
    if options.reduction == "none":
        loss = loss.reshape(batch_shape)
    if stats is None:
        return loss
    aux = _aux_outputs_of(stats, ops, options._replace(num_rows=num_rows))
    return loss, jax.tree.map(lambda a: a if a.ndim == 0 else a.reshape(batch_shape), aux)


def _aux_outputs_of(stats: RowStats, ops: Operands, cfg: Config) -> _aux_outputs.CrossEntropyAux:
    """The public aux outputs from the kernel's row statistics. Plain JAX: the z-loss term's
    gradient reaches the logits through ``lse``'s, the token weights' by autodiff."""
    rows = resolve_rows(ops.labels, ops, cfg)
    z_terms = jnp.where(rows.active, cfg.z_loss * stats.lse**2, jnp.zeros_like(stats.lse))
    z_terms, weight = _loss_reduction.with_token_weights(z_terms, rows.weight, ops.token_weights)
    return _aux_outputs.CrossEntropyAux(
        lse=stats.lse,
        z_loss=_loss_reduction.reduce_loss(z_terms, weight, cfg.reduction, cfg.batch_axes),
        entropy=stats.entropy,
        argmax=stats.argmax,
        correct=_aux_outputs.correct_predictions(stats.argmax, ops.labels, rows),
        counted=rows.active,
    )


def _auto_mesh_devices(*arrays: jax.Array) -> int:
    """The devices of the mesh of ``Auto`` axes the arrays (or the context) live on, which
    GSPMD partitions by propagation; 1 without one."""
    meshes = [jax.typeof(a).sharding.mesh for a in arrays]
    meshes.append(jax.sharding.get_abstract_mesh())
    return max(
        (
            getattr(mesh, "size", 1)
            for mesh in meshes
            if AxisType.Auto in getattr(mesh, "axis_types", ())
        ),
        default=1,
    )


def _vocabulary_groups(num_classes: Any, devices: int) -> int:
    """``G``, the groups the blocked kernel views the vocabulary as (``[G, V / G]``): 1
    unless the arrays live on a mesh of ``Auto`` axes over several ``devices``
    (:func:`_auto_mesh_devices`); there ``gcd(V, devices)``, or 0 for a symbolic ``V`` (the
    chunked kernel runs then).

    GSPMD cannot keep a dynamic slice of a sharded axis local: slicing ``w``'s vocabulary
    block by block would make it gather ``w``. Each of the ``k`` shards of a vocabulary
    sharded evenly over mesh axes holds ``G / k`` whole groups (``k`` divides ``V`` and the
    device count, hence ``G``), so splitting the vocabulary into ``[G, V / G]`` shards the
    ``G`` axis like the vocabulary, and the blocks, sliced along ``V / G``, are local to
    every device. (Explicit meshes and ``shard_map`` give each device its own slice of ``w``
    and need no groups.) The row tiles of the backward pass on meshes group the rows the
    same way (:func:`_row_groups`)."""
    if devices == 1:
        return 1
    return math.gcd(num_classes, devices) if isinstance(num_classes, int) else 0


def _chunked_loss(ops: Operands, options: Config, num_rows: Any) -> Any:
    """The chunked kernel over ``[N, D]`` rows, padded to a multiple of the chunk size."""
    chunk = options.chunk_size or default_chunk_size(num_rows, num_local_classes(ops.w, options))
    padded = -(-num_rows // chunk) * chunk
    if padded != num_rows:
        pad = padded - num_rows
        ops = ops._replace(
            x=jnp.pad(ops.x, ((0, pad), (0, 0))),
            labels=jnp.pad(ops.labels, (0, pad)),
            token_weights=None
            if ops.token_weights is None
            else jnp.pad(ops.token_weights, (0, pad)),
        )
    cfg = options._replace(chunk_size=chunk, num_rows=num_rows)
    out = _impl(ops, cfg)
    if options.reduction == "none":
        out = (out[0][:num_rows], out[1]) if cfg.return_aux else out[:num_rows]
    if cfg.return_aux:
        out = (out[0], jax.tree.map(lambda a: a[:num_rows], out[1]))
    return out
