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

GPU and TPU, the vocabulary-blocked kernel (see "vocabulary blocks" below): the loops run over
blocks of classes covering all tokens, the forward pass saves one log-normaliser per row,
and the backward pass writes each block's ``dw`` once, in ``w``'s dtype, while the ``[N, D]``
input gradient accumulates in float32: no buffer the size of ``w`` beyond its gradient.
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
    _dtypes,
    _elementwise,
    _labels,
    _loss_reduction,
    _normaliser,
    _reductions,
    _sharding,
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
# many bytes. The backward pass holds about three such blocks (logits, their gradient and its
# copy in the operands' dtype) beside the float32 [N, D] input-gradient accumulator.
_VOCAB_BLOCK_BYTES = 32 * 2**20
_MIN_VOCAB_BLOCK = 128
_SYMBOLIC_VOCAB_BLOCK = 1024
KERNELS = ("auto", "chunked", "blocked")


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


# ----------------------------------------------------------------------------- chunk kernels


def _chunk_logits(
    x: jax.Array, w: jax.Array, bias: jax.Array | None, cfg: Config
) -> tuple[jax.Array, jax.Array | None]:
    """float32 logits of one chunk, soft-capped, and ``tanh(z/s)`` for the cap's derivative."""
    dtype = _dtypes.compute_dtype(x.dtype)
    if bias is None:
        z = jnp.matmul(x, w, preferred_element_type=dtype)
    else:
        b = bias

        def bias_added() -> jax.Array:
            return jnp.matmul(x, w, preferred_element_type=dtype) + b.astype(dtype)

        if x.dtype == w.dtype == b.dtype:  # else the bias would be rounded to w's dtype
            z = _reductions.on_cpu(lambda: _matmul_with_bias_row(x, w, b, dtype), bias_added)
        else:
            z = bias_added()
    if cfg.logit_softcap is None:
        return z, None
    capped = jnp.tanh(z / cfg.logit_softcap)
    return cfg.logit_softcap * capped, capped


def _matmul_with_bias_row(x: jax.Array, w: jax.Array, bias: jax.Array, dtype: Any) -> jax.Array:
    """``[x, 1] @ [w; bias]``: the bias added by the GEMM itself (CPU).

    XLA:CPU's reductions do not fuse a producer, so ``x @ w + bias`` is written to a second
    ``[T, V]`` buffer for the log-normaliser while the gradient re-reads the product beside it:
    two chunk-sized arrays live at once. With the bias as one more row of ``w`` (and a column
    of ones in ``x``) the GEMM's output is the logits, and their gradient overwrites them.
    """
    ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
    x_1 = jnp.concatenate([x, ones], axis=-1)
    w_b = jnp.concatenate([w, bias[None, :]], axis=0)
    return jnp.matmul(x_1, w_b, preferred_element_type=dtype)


def _target_logits(
    x: jax.Array, w: jax.Array, bias: jax.Array | None, rows: _labels.Targets, cfg: Config
) -> jax.Array:
    """``z[n, y_n]`` of one chunk from ``x_n · w[:, y_n]``, on whichever device holds ``y_n``.

    Computed from the inputs rather than gathered from the chunk's logits, so that nothing
    reads the logits after their gradient is formed and XLA can write it in their buffer.
    """
    dtype = _dtypes.compute_dtype(x.dtype)
    index = jnp.clip(rows.local, 0, w.shape[1] - 1)
    columns = jnp.take(w, index, axis=1).astype(dtype)  # [D, T]
    z = jnp.sum(x.astype(dtype) * columns.T, axis=1)
    if bias is not None:
        z = z + bias.astype(dtype)[index]
    if cfg.logit_softcap is not None:
        z = cfg.logit_softcap * jnp.tanh(z / cfg.logit_softcap)
    z = jnp.where(rows.in_shard, z, jnp.zeros_like(z))
    return _loss_reduction.psum_over(z, cfg.axis_name)


def _chunk_loss(
    z: jax.Array,
    target: jax.Array,
    rows: _labels.Targets,
    class_weights: jax.Array | None,
    weight_total: jax.Array,
    num_classes: Any,
    cfg: Config,
) -> tuple[jax.Array, jax.Array]:
    """Per-row losses (0 when inactive, NaN when bad) and log-normalisers of one chunk."""
    lse = _normaliser.stable_logsumexp(z, cfg.axis_name)[:, 0]
    weighted = None
    if cfg.label_smoothing:
        # Σ_c w_c (lse - z_c) = W·lse - Σ_c w_c z_c: one matrix-vector product for the chunk.
        weighted = (
            _reductions.class_sum(z, cfg.axis_name)[:, 0]
            if class_weights is None
            else _loss_reduction.psum_over(
                jnp.matmul(z, class_weights.astype(z.dtype)), cfg.axis_name
            )
        )
    return _row_losses(lse, target, weighted, rows, weight_total, num_classes, cfg), lse


def _row_losses(
    lse: jax.Array,
    target: jax.Array,
    weighted: jax.Array | None,
    rows: _labels.Targets,
    weight_total: jax.Array,
    num_classes: Any,
    cfg: Config,
) -> jax.Array:
    """Per-row losses from the log-normalisers, target logits and (with label smoothing)
    the class-weighted logit sums ``Σ_c w_c z_c``: 0 when inactive, NaN when bad."""
    eps = cfg.label_smoothing
    loss = (1.0 - eps) * rows.weight * (lse - target)
    if eps and weighted is not None:
        loss = loss + eps / num_classes * (weight_total * lse - weighted)
    if cfg.z_loss:
        loss = loss + cfg.z_loss * lse**2
    loss = jnp.where(rows.active, loss, jnp.zeros_like(loss))
    return _labels.nan_where_bad(rows, loss)


def _chunk_logits_grad(
    z: jax.Array,
    capped: jax.Array | None,
    lse: jax.Array,
    rows: _labels.Targets,
    scale: jax.Array,
    class_weights: jax.Array | None,
    weight_total: jax.Array,
    num_classes: Any,
    cfg: Config,
) -> jax.Array:
    """``scale_n · d loss_n / d z_raw`` for one chunk: one elementwise expression XLA fuses.

    d loss_n / d z_c = p_c·A_n - (1-ε)·w_y·[c = y] - (ε/C)·w_c with the target mass
    A_n = (1-ε)·w_y + (ε/C)·W + 2ζ·lse_n; the soft cap multiplies by 1 - tanh²(z_raw/s).
    """
    eps = cfg.label_smoothing
    p = jnp.exp(z - _elementwise.finite_or_zero(lse)[:, None])
    mass = (1.0 - eps) * rows.weight + eps / num_classes * weight_total + 2.0 * cfg.z_loss * lse
    classes = lax.broadcasted_iota(rows.local.dtype, z.shape, 1)
    is_target = classes == rows.local[:, None]
    grad = p * mass[:, None] - jnp.where(is_target, ((1.0 - eps) * rows.weight)[:, None], 0.0)
    if eps:
        spread = 1.0 if class_weights is None else class_weights.astype(z.dtype)[None, :]
        grad = grad - (eps / num_classes) * spread
    grad = scale[:, None] * grad
    if capped is not None:
        grad = grad * (1.0 - capped * capped)
    return grad


def _add_input_grad_product(dw: jax.Array, x: jax.Array, dz: jax.Array) -> jax.Array:
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
        return dw + jnp.matmul(x.T, dz, preferred_element_type=dw.dtype)

    if not isinstance(num_classes, int) or num_classes <= _DW_BLOCK or num_features <= num_rows:
        # The [D, V] product is no bigger than the chunk's [T, V] logits: one dot is fastest
        # (the blocked loop costs ~15% of the whole step at N=4096, D=512, V=32000). A
        # symbolic V (jax.export) takes the one dot too: it is correct for any size.
        return one_dot()
    # GPU and TPU: one dot; XLA folds the addition into the GEMM's accumulator (beta = 1).
    return _reductions.on_cpu(lambda: _add_product_by_blocks(dw, x, dz), one_dot)


def _add_product_by_blocks(dw: jax.Array, x: jax.Array, dz: jax.Array) -> jax.Array:
    """``dw + xᵀ @ dz`` one block of ``_DW_BLOCK`` classes at a time (CPU)."""
    num_classes = dz.shape[1]
    num_blocks = -(-num_classes // _DW_BLOCK)
    columns = lax.broadcasted_iota(jnp.int32, (1, _DW_BLOCK), 1)

    def add_block(i: Any, dw: jax.Array) -> jax.Array:
        nominal = i * _DW_BLOCK
        start = jnp.minimum(nominal, num_classes - _DW_BLOCK)
        dz_block = lax.dynamic_slice_in_dim(dz, start, _DW_BLOCK, axis=1)
        dz_block = jnp.where(start + columns >= nominal, dz_block, jnp.zeros_like(dz_block))
        product = jnp.matmul(x.T, dz_block, preferred_element_type=dw.dtype)
        block = lax.dynamic_slice_in_dim(dw, start, _DW_BLOCK, axis=1) + product
        return lax.dynamic_update_slice_in_dim(dw, block, start, axis=1)

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
    dx = _loss_reduction.psum_over(
        jnp.matmul(dz_op, w.T, preferred_element_type=dz.dtype), cfg.axis_name
    )
    dw = _add_input_grad_product(dw, x, dz_op)
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


def _row_scale(rows: _labels.Targets, cotangent: Any) -> jax.Array:
    """Per-row factor of the logits' gradient: the cotangent for rows that count, 0 for rows
    that do not (ignored, padding), NaN for rows with an invalid label (their loss is NaN)."""
    g = jnp.broadcast_to(jnp.asarray(cotangent, rows.weight.dtype), rows.weight.shape)
    return _labels.nan_where_bad(rows, jnp.where(rows.active, g, jnp.zeros_like(g)))


def _mean_scale(rows: _labels.Targets, cfg: Config) -> jax.Array:
    """d mean / d loss_n = 1 / Σ w_y over every row (0 when nothing counts)."""
    return _elementwise.safe_reciprocal(_loss_reduction.batch_total(rows.weight, cfg.batch_axes))


def _class_totals(
    class_weights: jax.Array | None, num_local: int, cfg: Config, dtype: Any
) -> tuple[jax.Array, Any]:
    """(W = Σ_c w_c over all classes, C) for the smoothing term."""
    num_classes = _loss_reduction.global_num_classes(num_local, cfg.axis_name)
    if class_weights is None:
        return jnp.asarray(num_classes, dtype), num_classes
    return _loss_reduction.psum_over(
        jnp.sum(class_weights.astype(dtype)), cfg.axis_name
    ), num_classes


def _setup(
    x: jax.Array, w: jax.Array, labels: jax.Array, class_weights: jax.Array | None, cfg: Config
) -> tuple[_labels.Targets, jax.Array, Any]:
    dtype = _dtypes.compute_dtype(x.dtype)
    rows = _labels.resolve(
        labels,
        num_local=w.shape[1],
        axis_name=cfg.axis_name,
        ignore_index=cfg.ignore_index,
        class_weights=class_weights,
        dtype=dtype,
        counted=jnp.arange(labels.shape[0]) < cfg.num_rows,  # padding rows count for nothing
    )
    return rows, *_class_totals(class_weights, w.shape[1], cfg, dtype)


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _impl(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    class_weights: jax.Array | None,
    cfg: Config,
) -> jax.Array:
    """Loss only (no gradient work): the path taken by evaluation."""
    rows, weight_total, num_classes = _setup(x, w, labels, class_weights, cfg)

    def step(carry: None, chunk: tuple[Any, ...]) -> tuple[None, jax.Array]:
        x_c, rows_c = chunk
        *_, loss, _ = _chunk_forward(
            x_c, rows_c, w, bias, class_weights, weight_total, num_classes, cfg
        )
        return carry, loss

    _, losses = lax.scan(step, None, _to_chunks((x, rows), cfg.chunk_size))
    return _loss_reduction.reduce_loss(
        losses.reshape(-1), rows.weight, cfg.reduction, cfg.batch_axes
    )


def _fwd(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    class_weights: jax.Array | None,
    cfg: Config,
) -> tuple[jax.Array, tuple[Any, ...]]:
    if cfg.reduction == "none":
        return _fwd_per_example(x, w, bias, labels, class_weights, cfg)
    rows, weight_total, num_classes = _setup(x, w, labels, class_weights, cfg)
    # Gradients for a unit cotangent; the backward pass scales them by the real one.
    scale = _row_scale(rows, _mean_scale(rows, cfg) if cfg.reduction == "mean" else 1.0)

    def step(carry: tuple[Any, ...], chunk: tuple[Any, ...]) -> tuple[Any, Any]:
        dw, db = carry
        x_c, rows_c, scale_c = chunk
        z, capped, loss, lse = _chunk_forward(
            x_c, rows_c, w, bias, class_weights, weight_total, num_classes, cfg
        )
        dz = _chunk_logits_grad(
            z, capped, lse, rows_c, scale_c, class_weights, weight_total, num_classes, cfg
        )
        (dw, db), dx_c = _accumulate_chunk_grads(dz, x_c, w, dw, db, cfg)
        return (dw, db), (loss, dx_c)

    init = _gradient_accumulators(x, w, bias)
    (dw, db), (losses, dx) = lax.scan(step, init, _to_chunks((x, rows, scale), cfg.chunk_size))
    loss = _loss_reduction.reduce_loss(
        losses.reshape(-1), rows.weight, cfg.reduction, cfg.batch_axes
    )
    grads = (dx.reshape(x.shape), *_parameter_grads(dw, db, w, bias))
    return loss, grads


def _chunk_forward(
    x: jax.Array,
    rows: _labels.Targets,
    w: jax.Array,
    bias: jax.Array | None,
    class_weights: jax.Array | None,
    weight_total: jax.Array,
    num_classes: Any,
    cfg: Config,
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array]:
    """One chunk's logits, ``tanh(z/s)`` (or None), per-row losses and log-normalisers."""
    z, capped = _chunk_logits(x, w, bias, cfg)
    target = _target_logits(x, w, bias, rows, cfg)
    loss, lse = _chunk_loss(z, target, rows, class_weights, weight_total, num_classes, cfg)
    return z, capped, loss, lse


def _fwd_per_example(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    class_weights: jax.Array | None,
    cfg: Config,
) -> tuple[jax.Array, tuple[Any, ...]]:
    rows, weight_total, num_classes = _setup(x, w, labels, class_weights, cfg)

    def step(carry: None, chunk: tuple[Any, ...]) -> tuple[None, Any]:
        x_c, rows_c = chunk
        *_, loss, lse = _chunk_forward(
            x_c, rows_c, w, bias, class_weights, weight_total, num_classes, cfg
        )
        return carry, (loss, lse)

    _, (losses, lse) = lax.scan(step, None, _to_chunks((x, rows), cfg.chunk_size))
    residuals = (x, w, bias, rows, class_weights, lse.reshape(-1))
    return losses.reshape(-1), residuals


def _bwd(cfg: Config, residuals: tuple[Any, ...], g: jax.Array) -> tuple[Any, ...]:
    if cfg.reduction == "none":
        return _bwd_per_example(cfg, residuals, g)
    dx, dw, db = residuals
    scale = g.astype(_dtypes.compute_dtype(g.dtype))
    dx = (scale * dx).astype(dx.dtype)
    dw = (scale * dw).astype(dw.dtype)
    db = None if db is None else (scale * db).astype(db.dtype)
    return dx, dw, db, None, None


def _bwd_per_example(cfg: Config, saved: tuple[Any, ...], g: jax.Array) -> tuple[Any, ...]:
    x, w, bias, rows, class_weights, lse = saved
    weight_total, num_classes = _class_totals(
        class_weights, w.shape[1], cfg, _dtypes.compute_dtype(x.dtype)
    )

    def step(carry: tuple[Any, ...], chunk: tuple[Any, ...]) -> tuple[Any, Any]:
        dw, db = carry
        x_c, rows_c, lse_c, g_c = chunk
        z, capped = _chunk_logits(x_c, w, bias, cfg)
        dz = _chunk_logits_grad(
            z, capped, lse_c, rows_c, g_c, class_weights, weight_total, num_classes, cfg
        )
        return _accumulate_chunk_grads(dz, x_c, w, dw, db, cfg)

    g = _row_scale(rows, g)
    init = _gradient_accumulators(x, w, bias)
    chunks = _to_chunks((x, rows, lse, g), cfg.chunk_size)
    (dw, db), dx = lax.scan(step, init, chunks)
    return (dx.reshape(x.shape), *_parameter_grads(dw, db, w, bias), None, None)


_impl.defvjp(_fwd, _bwd)


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
# than the chunked kernel) and temporaries bounded by the block: no N·V, no D·V buffer.


class _Block(NamedTuple):
    """One vocabulary block: columns ``[start, start + size)`` of this device's classes, of
    which those before ``nominal`` (the last block's overlap with its predecessor) are not
    this block's to count."""

    start: jax.Array
    fresh: jax.Array  # [1, size] bool: the column belongs to this block
    w: jax.Array
    bias: jax.Array | None
    class_weights: jax.Array | None


def vocab_block_size(num_rows: Any, num_local_classes: Any, requested: int = 0) -> Any:
    """Classes per block of the vocabulary-blocked kernel (GPU, TPU).

    The most multiples of 128 classes (TPU's lane width) whose float32 ``[N, block]`` logits
    fit ``_VOCAB_BLOCK_BYTES``, at least 128, at most ``V``. With ``N`` symbolic
    (``jax.export``), ``_SYMBOLIC_VOCAB_BLOCK`` classes; with ``V`` symbolic, ``min(V, ·)``.
    ``requested`` (> 0) replaces the budget's choice (tests use small blocks).
    """
    if requested:
        block = requested
    elif isinstance(num_rows, int):
        block = _VOCAB_BLOCK_BYTES // (4 * max(num_rows, 1)) // 128 * 128
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


def _vocab_block(
    i: Any,
    size: Any,
    w: jax.Array,
    bias: jax.Array | None,
    class_weights: jax.Array | None,
) -> _Block:
    """Block ``i``. All blocks have the same size (static shapes); the last starts at
    ``V - size`` and leaves its overlap with the previous block to that block."""
    nominal = i * size
    start = jnp.minimum(nominal, w.shape[1] - size)
    fresh = start + lax.broadcasted_iota(jnp.int32, (1, size), 1) >= nominal

    def cut(a: jax.Array | None) -> jax.Array | None:
        return None if a is None else lax.dynamic_slice_in_dim(a, start, size, axis=a.ndim - 1)

    w_block = cut(w)
    assert w_block is not None
    return _Block(start, fresh, w_block, cut(bias), cut(class_weights))


def _keep_fresh(block: _Block, new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` in the block's own columns, ``old`` (the previous block's) in its overlap."""
    return jnp.where(block.fresh[0], new, old)


def _varying_like(arrays: Any, *references: jax.Array) -> Any:
    """Loop carries marked as varying over the mesh axes ``references`` vary over (inside
    ``shard_map`` a loop's carry must keep its type through updates that depend on them)."""
    axes = tuple(sorted(frozenset().union(*map(_sharding.varying_axes, references)), key=str))
    if not axes:
        return arrays
    return jax.tree.map(lambda a: lax.pcast(a, axes, to="varying"), arrays)


def _blocked_statistics(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None,
    class_weights: jax.Array | None,
    cfg: Config,
) -> tuple[jax.Array, jax.Array | None]:
    """Per-row log-normalisers over all classes (and ``Σ_c w_c z_c`` for label smoothing),
    merged block by block: an online logsumexp, then one across the vocabulary's devices."""
    size = vocab_block_size(x.shape[0], w.shape[1], cfg.vocab_block)
    dtype = _dtypes.compute_dtype(x.dtype)
    smoothing = bool(cfg.label_smoothing)

    def add_block(i: Any, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lse, weighted = carry
        block = _vocab_block(i, size, w, bias, class_weights)
        z, _ = _chunk_logits(x, block.w, block.bias, cfg)
        masked = jnp.where(block.fresh, z, jnp.asarray(-jnp.inf, z.dtype))
        lse = jnp.logaddexp(lse, _normaliser.stable_logsumexp(masked)[:, 0])
        if smoothing:
            weights = 1.0 if block.class_weights is None else block.class_weights.astype(dtype)
            spread = jnp.where(block.fresh, weights, 0.0)
            weighted = weighted + jnp.sum(z * spread, axis=1)
        return lse, weighted

    rows = x.shape[0]
    init = (jnp.full((rows,), -jnp.inf, dtype), jnp.zeros((rows,), dtype))
    init = _varying_like(init, x, w)
    num_blocks = _num_blocks(w.shape[1], size)
    lse, weighted = lax.fori_loop(0, num_blocks, add_block, init)
    return _merge_devices_lse(lse, cfg.axis_name), (
        _loss_reduction.psum_over(weighted, cfg.axis_name) if smoothing else None
    )


def _merge_devices_lse(lse: jax.Array, axis_name: Hashable | None) -> jax.Array:
    """``log Σ_devices exp(lse_d)``: each device's log-normaliser over its classes, combined
    with one ``pmax`` and one ``psum`` of a value per row."""
    if axis_name is None:
        return lse
    shift = _elementwise.finite_or_zero(lax.pmax(lse, axis_name))
    return shift + jnp.log(lax.psum(jnp.exp(lse - shift), axis_name))


def _blocked_losses(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None,
    rows: _labels.Targets,
    class_weights: jax.Array | None,
    weight_total: jax.Array,
    num_classes: Any,
    cfg: Config,
) -> tuple[jax.Array, jax.Array]:
    """Per-row losses and log-normalisers over all ``N`` rows."""
    lse, weighted = _blocked_statistics(x, w, bias, class_weights, cfg)
    target = _target_logits(x, w, bias, rows, cfg)
    losses = _row_losses(lse, target, weighted, rows, weight_total, num_classes, cfg)
    return losses, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked_impl(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    class_weights: jax.Array | None,
    cfg: Config,
) -> jax.Array:
    loss, _ = _blocked_fwd(x, w, bias, labels, class_weights, cfg)
    return loss


def _blocked_fwd(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    class_weights: jax.Array | None,
    cfg: Config,
) -> tuple[jax.Array, tuple[Any, ...]]:
    rows, weight_total, num_classes = _setup(x, w, labels, class_weights, cfg)
    losses, lse = _blocked_losses(x, w, bias, rows, class_weights, weight_total, num_classes, cfg)
    loss = _loss_reduction.reduce_loss(losses, rows.weight, cfg.reduction, cfg.batch_axes)
    return loss, (x, w, bias, rows, class_weights, lse)


def _blocked_bwd(cfg: Config, saved: tuple[Any, ...], g: jax.Array) -> tuple[Any, ...]:
    x, w, bias, rows, class_weights, lse = saved
    dtype = _dtypes.compute_dtype(x.dtype)
    weight_total, num_classes = _class_totals(class_weights, w.shape[1], cfg, dtype)
    g = g.astype(dtype)
    if cfg.reduction == "mean":
        g = g * _mean_scale(rows, cfg)
    scale = _row_scale(rows, g)
    size = vocab_block_size(x.shape[0], w.shape[1], cfg.vocab_block)

    def add_block(i: Any, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        dx, dw, db = carry
        block = _vocab_block(i, size, w, bias, class_weights)
        z, capped = _chunk_logits(x, block.w, block.bias, cfg)
        block_rows = rows._replace(local=rows.local - block.start)
        dz = _chunk_logits_grad(
            z, capped, lse, block_rows, scale, block.class_weights, weight_total, num_classes, cfg
        )
        dz = jnp.where(block.fresh, dz, jnp.zeros_like(dz))
        dz_op = dz.astype(x.dtype)
        # float32 accumulation over all N tokens inside the GEMM; rounded once to dw's dtype.
        dw_block = jnp.matmul(x.T, dz_op, preferred_element_type=dtype).astype(dw.dtype)
        old = lax.dynamic_slice_in_dim(dw, block.start, size, axis=1)
        dw = lax.dynamic_update_slice_in_dim(
            dw, _keep_fresh(block, dw_block, old), block.start, axis=1
        )
        dx = dx + jnp.matmul(dz_op, block.w.T, preferred_element_type=dtype)
        if db is not None:
            old_b = lax.dynamic_slice_in_dim(db, block.start, size)
            db = lax.dynamic_update_slice_in_dim(
                db, _keep_fresh(block, jnp.sum(dz, axis=0), old_b), block.start, axis=0
            )
        return dx, dw, db

    # w's gradient is written in w's dtype, block by block, unless the rows are sharded over
    # devices that share w: then it is a partial sum over this device's rows, kept in float32
    # until the devices' shares are added.
    rows_sharded = bool(_sharding.varying_axes(x) - _sharding.varying_axes(w))
    dw_dtype = dtype if rows_sharded else w.dtype
    init = _varying_like(
        (
            jnp.zeros(x.shape, dtype),
            jnp.zeros(w.shape, dw_dtype),
            None if bias is None else jnp.zeros(bias.shape, dtype),
        ),
        x,
        w,
    )
    num_blocks = _num_blocks(w.shape[1], size)
    dx, dw, db = lax.fori_loop(0, num_blocks, add_block, init)
    dx = _loss_reduction.psum_over(dx, cfg.axis_name).astype(x.dtype)
    return (dx, *_parameter_grads(dw, db, w, bias), None, None)


_blocked_impl.defvjp(_blocked_fwd, _blocked_bwd)


def local_loss(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    weights: jax.Array | None,
    options: Config,
) -> jax.Array:
    """The loss over the rows of ``x`` (this device's, under explicit sharding): the chunked
    kernel on CPU, the vocabulary-blocked one on GPU and TPU (``options.kernel`` forces one)."""
    batch_shape = x.shape[:-1]
    num_rows = math.prod(batch_shape)
    # A signed label dtype, so that a negative ignore_index compares correctly.
    flat_labels = _labels.widen(labels.reshape(-1), options.ignore_index)
    flat_x = x.reshape(num_rows, x.shape[-1])

    def chunked() -> jax.Array:
        return _chunked_loss(flat_x, w, bias, flat_labels, weights, options, num_rows)

    def blocked() -> jax.Array:
        cfg = options._replace(num_rows=num_rows)
        return _blocked_impl(flat_x, w, bias, flat_labels, weights, cfg)

    if options.kernel == "chunked" or (options.kernel == "auto" and _gspmd_sharded(x, w)):
        loss = chunked()
    elif options.kernel == "blocked":
        loss = blocked()
    else:
        loss = _reductions.on_cpu(chunked, blocked)
    if options.reduction == "none":
        return loss.reshape(batch_shape)
    return loss


def _gspmd_sharded(*arrays: jax.Array) -> bool:
    """Whether the arrays (or the context) live on a mesh of ``Auto`` axes over several
    devices, which GSPMD partitions by propagation. There the chunked kernel runs on every
    platform: its ``[T, V]`` dots split along the vocabulary like ``w``, whereas the blocked
    kernel's dynamic slices of the vocabulary would make GSPMD gather ``w``. (Explicit meshes
    and ``shard_map`` give each device its own slice of ``w`` and run the blocked kernel.)"""
    meshes = [jax.typeof(a).sharding.mesh for a in arrays]
    meshes.append(jax.sharding.get_abstract_mesh())
    return any(
        AxisType.Auto in getattr(mesh, "axis_types", ()) and getattr(mesh, "size", 1) > 1
        for mesh in meshes
    )


def _chunked_loss(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    weights: jax.Array | None,
    options: Config,
    num_rows: Any,
) -> jax.Array:
    """The chunked kernel over ``[N, D]`` rows, padded to a multiple of the chunk size."""
    chunk = options.chunk_size or default_chunk_size(num_rows, w.shape[1])
    padded = -(-num_rows // chunk) * chunk
    if padded != num_rows:
        x = jnp.pad(x, ((0, padded - num_rows), (0, 0)))
        labels = jnp.pad(labels, (0, padded - num_rows))
    cfg = options._replace(chunk_size=chunk, num_rows=num_rows)
    loss = _impl(x, w, bias, labels, weights, cfg)
    return loss[:num_rows] if options.reduction == "none" else loss
