"""What the cross-entropy losses return beside the loss on request (``return_aux=True``).

One definition for :func:`jxent.softmax_cross_entropy_with_integer_labels`,
:func:`jxent.cross_entropy` and :func:`jxent.fused_linear_cross_entropy`: every kernel
computes the same per-row statistics in the passes it already makes over the classes and
hands them to :func:`assemble`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jxent import _elementwise, _labels, _loss_reduction, _reductions


class CrossEntropyAux(NamedTuple):
    r"""Auxiliary outputs of a cross-entropy loss, returned as ``(loss, aux)`` when
    ``return_aux=True``.

    Every field but ``z_loss`` has the labels' shape (one value per example, whatever the
    ``reduction``); ``z_loss`` is reduced exactly as the loss is, so that ``loss - z_loss``
    is the cross-entropy alone. With ``temperature=T`` the distribution is
    :math:`p = \operatorname{softmax}(x / T)` and every field refers to it.

    Attributes:
      lse: :math:`\operatorname{lse}(x_n / T)`, the log-normaliser (float32, or float64
        for float64 inputs). Gradient: :math:`p_n / T` times its cotangent.
      z_loss: the z-loss term :math:`\zeta\,\operatorname{lse}^2` (times the example's
        ``weights``), reduced like the loss; 0 for examples that do not count. Its
        gradient is that term's share of the loss's.
      entropy: :math:`H_n = -\sum_c p_{n,c} \log p_{n,c}`; exact gradient
        :math:`-p_{n,c}(\log p_{n,c} + H_n) / T`.
      argmax: the predicted class id (int32; the first of equal maxima; a global id under
        vocabulary parallelism). No gradient.
      correct: ``argmax == label`` for examples that count (not ``ignore_index``, not
        masked out by ``where``, valid label), else ``False``. No gradient.
      counted: whether the example counts (as above). No gradient.
    """

    lse: jax.Array
    z_loss: jax.Array
    entropy: jax.Array
    argmax: jax.Array
    correct: jax.Array
    counted: jax.Array

    @property
    def accuracy(self) -> jax.Array:
        """Token accuracy: the fraction of counted examples predicted correctly (0 when none
        counts); unweighted, over the examples this device holds."""
        total = jnp.sum(self.counted)
        return jnp.sum(self.correct) / jnp.maximum(total, 1).astype(jnp.float32)


# So that a function returning it can be serialised by jax.export (a NamedTuple is a pytree,
# but export's serialisation needs a registered name for it).
jax.export.register_namedtuple_serialization(
    CrossEntropyAux, serialized_name="jxent.CrossEntropyAux"
)


def global_argmax(
    local_max: jax.Array, local_argmax: jax.Array, axis_name: Hashable | None, num_local: int
) -> jax.Array:
    """The global class id of each row's maximum under vocabulary parallelism: the lowest id
    among the shards that hold the global maximum (as ``jnp.argmax`` on the whole row).

    ``local_argmax`` is this shard's first maximum as a local index."""
    if axis_name is None:
        return local_argmax.astype(jnp.int32)
    offset = lax.axis_index(axis_name) * num_local
    top = lax.pmax(local_max, axis_name)
    mine = jnp.where(local_max == top, local_argmax + offset, jnp.iinfo(jnp.int32).max)
    return lax.pmin(mine.astype(jnp.int32), axis_name)


def after(stats: tuple[jax.Array, jax.Array], value: jax.Array) -> jax.Array:
    """CPU: ``value`` (per row, keepdims) plus a zero computed from the ``(entropy,
    argmax)`` statistics, ``min(argmax, isnan(H), 0)`` of two non-negative integers (an
    argmax may be int32's largest value, so not a sum): never NaN, and XLA cannot prove it
    0. (GPU and TPU: ``value``.)

    For a kernel's residual: the backward pass then reads it only once the statistics are
    done. Without that order XLA:CPU may run the backward pass first (the statistics being
    only logged, it needs none of them) and, the exponentials it would overwrite being
    still needed by the statistics' class sums, write the gradient into a fresh
    logits-sized buffer."""

    def ordered() -> jax.Array:
        entropy, argmax = stats
        zero = jnp.minimum(jnp.minimum(argmax, jnp.isnan(entropy).astype(argmax.dtype)), 0)
        return value + zero.astype(value.dtype)[..., None]

    return _reductions.on_cpu(ordered, lambda: value)


def _first_true(hit: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(any, first index)`` of the true entries along the last axis (index 0 for none),
    as one float max of ``hit·(n - i)`` (exact for ``n ≤ 2**24``): XLA:CPU vectorises a
    float max, not ``jnp.argmax``'s variadic reduction. For short rows."""
    n = hit.shape[-1]
    ids = lax.broadcasted_iota(jnp.float32, hit.shape, hit.ndim - 1)
    found_at = jnp.max(jnp.where(hit, n - ids, 0.0), axis=-1)
    found = found_at > 0
    return found, jnp.where(found, n - found_at, 0.0).astype(jnp.int32)


def first_argmax_in_chunks(
    x: jax.Array, where: jax.Array | None, maxima: jax.Array, top: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(found, first)``: whether ``x`` (masked by ``where``) reaches ``top`` (keepdims)
    and the first class where it does (0 if none), from ``x``'s
    :func:`~jxent._reductions.chunk_maxima`: the first run whose max is ``top``, then the
    first entry of that run (gathered) equal to it. A search through ``C / run`` maxima and
    one run instead of a pass over the row."""
    num_chunks = maxima.shape[-1]
    chunk = x.shape[-1] // num_chunks
    found_chunk, j = _first_true(maxima == top)

    def chunk_of(a: jax.Array) -> jax.Array:
        # Row j of the [rows · runs, run] view: a gather of whole rows.
        runs = a.reshape(-1, chunk)
        rows = jnp.arange(runs.shape[0] // num_chunks, dtype=j.dtype) * num_chunks
        return jnp.take(runs, rows + j.reshape(-1), axis=0).reshape((*j.shape, chunk))

    values = chunk_of(_elementwise.mask(x, where, -jnp.inf))
    found, i = _first_true(values == top)
    found = found & found_chunk
    return found, jnp.where(found, j * chunk + i, 0)


def correct_predictions(
    argmax: jax.Array, labels: jax.Array, targets: _labels.Targets
) -> jax.Array:
    """``argmax == label`` where the example counts (``targets.active``)."""
    return (argmax == labels) & targets.active


def assemble(
    stats: tuple[jax.Array, ...],
    *,
    z_loss: float,
    token_weights: jax.Array | None,
    weight: jax.Array,
    reduction: str,
    normalizer: jax.Array | None,
) -> CrossEntropyAux:
    """The :class:`CrossEntropyAux` of a kernel's per-example ``stats = (lse, entropy,
    argmax, correct, counted)``.

    ``z_loss`` (the coefficient ζ) gives the field ``ζ·lse²`` on counted examples, times
    ``token_weights`` and reduced as the loss is: ``weight`` is the loss's per-example
    share of the mean (token weights included) and ``normalizer`` its explicit
    denominator. Plain JAX: its gradient flows through ``lse``'s.
    """
    lse, entropy, argmax, correct, counted = stats
    term = jnp.zeros_like(lse)
    if z_loss:
        # Selected before squaring: an empty row's lse is -inf, and the gradient of
        # (-inf)² times a zero cotangent would be NaN.
        term = z_loss * jnp.where(counted, lse, jnp.zeros_like(lse)) ** 2
    term, _ = _loss_reduction.with_token_weights(term, weight, token_weights)
    reduced = _loss_reduction.reduce_loss(term, weight, reduction, normalizer=normalizer)
    return CrossEntropyAux(lse, reduced, entropy, argmax, correct, counted)
