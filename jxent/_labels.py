"""Integer labels: one resolution path for the integer CE, ``nll_loss`` and the fused loss.

What a label means (which device holds its class, whether it counts, whether it is invalid,
its class weight) is decided here once, so a semantic rule lands in every loss at once:

* a label equal to ``ignore_index`` counts for nothing (loss 0, weight 0);
* rows the caller marks as not counted (all classes masked out by ``where``, padding rows of
  the fused loss) count for nothing;
* any other label outside ``[0, C)``, or pointing at a class masked out by ``where``, is
  invalid: its loss is NaN, and so is any sum or mean that includes it;
* unsigned labels are widened without wrapping: ``2**32 - 1`` stays out of range.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify
from jax.typing import ArrayLike

from jxent import _elementwise, _loss_reduction


class Targets(NamedTuple):
    """Where each example's integer label points, and whether it counts."""

    local: jax.Array  # label index within this device's slice of classes
    in_shard: jax.Array  # the label's class lives on this device
    active: jax.Array  # counts, and the label is valid
    bad: jax.Array  # counts, but the label is invalid: NaN loss
    weight: jax.Array  # w_y for active examples, else 0: the example's share of the mean


def widen(labels: jax.Array, ignore_index: int | None) -> jax.Array:
    """Labels as a signed integer dtype (int32, or int64 for 64-bit labels under x64), so
    that a negative ``ignore_index`` compares correctly.

    Unsigned values above the signed range do not wrap to negative numbers (``uint32``
    ``2**32 - 1`` would become ``-1``, matching ``ignore_index=-1``): they become the most
    negative value, or the most positive one when that is ``ignore_index``, which is
    outside ``[0, C)`` either way.
    """
    target = jax.dtypes.canonicalize_dtype(jnp.int64 if labels.dtype.itemsize > 4 else jnp.int32)
    info = jnp.iinfo(target)
    if jnp.issubdtype(labels.dtype, jnp.unsignedinteger) and labels.dtype.itemsize >= 4:
        sentinel = info.max if ignore_index == info.min else info.min
        too_big = labels > np.asarray(info.max).astype(labels.dtype)
        return jnp.where(too_big, sentinel, labels.astype(target)).astype(target)
    return labels.astype(target)


def resolve(
    labels: jax.Array,
    *,
    num_local: Any,
    axis_name: Hashable | None,
    ignore_index: int | None,
    class_weights: jax.Array | None,
    dtype: Any,
    counted: jax.Array | None = None,
    allowed: jax.Array | None = None,
) -> Targets:
    """Resolves widened ``labels`` against this device's ``num_local`` classes.

    ``counted``: per-example flags of rows that take part (None: all). ``allowed``:
    ``[..., C]`` flags of the classes a label may point at (None: all), e.g. ``where``.
    """
    local = labels - _loss_reduction.class_offset(num_local, axis_name)
    in_shard = (local >= 0) & (local < num_local)
    valid = (labels >= 0) & (labels < _loss_reduction.global_num_classes(num_local, axis_name))
    if allowed is not None:
        valid = valid & (take(allowed.astype(jnp.int32), local, in_shard, axis_name) > 0)
    counts = jnp.ones(labels.shape, bool) if counted is None else counted
    if ignore_index is not None:
        counts = counts & (labels != ignore_index)
    active = counts & valid
    if class_weights is None:
        weight = active.astype(dtype)
    else:
        w_y = take(class_weights.astype(dtype), local, in_shard, axis_name)
        weight = jnp.where(active, w_y, jnp.zeros_like(w_y))
    return Targets(local, in_shard, active, counts & ~valid, weight)


def take(
    values: jax.Array, local: jax.Array, in_shard: jax.Array, axis_name: Hashable | None
) -> jax.Array:
    """``values[..., y]`` for each example (``values`` is ``[..., C]`` or a ``[C]`` vector),
    fetched from whichever device holds class ``y``; 0 where no device does."""
    index = jnp.clip(local, 0, values.shape[-1] - 1)
    if values.ndim == 1:
        picked = jnp.take(values, index)
    else:
        picked = jnp.take_along_axis(values, index[..., None], axis=-1)[..., 0]
    picked = jnp.where(in_shard, picked, jnp.zeros_like(picked))
    return picked if axis_name is None else lax.psum(picked, axis_name)


def nan_where_bad(targets: Targets, values: jax.Array) -> jax.Array:
    """``values`` (per example, or ``[..., C]`` per class) with NaN for examples whose
    label is invalid (made without creating a NaN on valid input: see
    :func:`jxent._elementwise.nan_where`)."""
    bad = targets.bad.reshape(targets.bad.shape + (1,) * (values.ndim - targets.bad.ndim))
    return _elementwise.nan_where(bad, values)


def check_in_range(labels: ArrayLike, num_classes: int, ignore_index: int | None) -> None:
    """Raises (eagerly) or adds a ``checkify`` check (traced) naming the first bad label.

    Runs on the labels as given (before widening), so the message shows the user's value.
    """
    labels = jnp.asarray(labels)
    ok = (labels >= 0) & (labels < num_classes)
    unsigned = jnp.issubdtype(labels.dtype, jnp.unsignedinteger)
    if ignore_index is not None and not (unsigned and ignore_index < 0):
        # (A negative ignore_index would wrap to a large unsigned label: none can equal it.)
        ok = ok | (labels == ignore_index)
    if isinstance(labels, jax.core.Tracer):
        flat_index = jnp.argmin(ok.reshape(-1))
        checkify.check(
            jnp.all(ok),
            "jxent: label {label} at flat index {index} is outside [0, {n}) "
            "and is not ignore_index",
            label=labels.reshape(-1)[flat_index],
            index=flat_index,
            n=jnp.asarray(num_classes),
        )
    elif not bool(jnp.all(ok)):
        concrete = np.asarray(labels).reshape(-1)
        first_bad = int(np.argmin(np.asarray(ok).reshape(-1)))
        raise ValueError(
            f"jxent: label {concrete[first_bad]} at flat index {first_bad} is outside "
            f"[0, {num_classes}) and is not ignore_index={ignore_index}."
        )
