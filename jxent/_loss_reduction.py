"""Reducing per-example losses (``none`` / ``sum`` / weighted ``mean``), with the collectives
across devices and vocabulary shards.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


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


def with_token_weights(
    loss: jax.Array, weight: jax.Array, token_weights: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Per-example losses and mean weights times the per-token ``weights`` (unchanged
    without them): ``mean`` then divides by the sum of the counted weights. Plain JAX, so
    the token weights get their exact gradient by autodiff."""
    if token_weights is None:
        return loss, weight
    token_weights = token_weights.astype(loss.dtype)
    return loss * token_weights, weight * token_weights


def reduce_loss(
    loss: jax.Array,
    weight: jax.Array | None,
    reduction: str,
    batch_axes: tuple[Hashable, ...] = (),
    normalizer: jax.Array | None = None,
) -> jax.Array:
    """Applies ``reduction``; ``mean`` divides by the total weight, or by ``normalizer``
    when one is given (the caller's denominator, e.g. a global token count; 0 gives 0).

    A mean over zero total weight is 0 with zero gradient (PyTorch gives NaN) when every
    example was ignored, masked or weighted 0, but NaN when any loss is NaN: an invalid
    label is never hidden by a mean (its loss is NaN and its weight 0).
    """
    if reduction == "none":
        return loss
    total = batch_total(loss, batch_axes)
    if reduction == "sum":
        return total
    if normalizer is not None:
        denominator = normalizer.astype(total.dtype)
    elif weight is None:
        denominator = jnp.asarray(loss.size, loss.dtype)
    else:
        denominator = batch_total(weight, batch_axes)
    safe = jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)
    # Zero weight: 0, or NaN if the total is NaN. Selected rather than total · 0, which
    # would make a NaN from an infinite total (a valid -inf logit in the BCE) that
    # jax.debug_nans reports even though this branch is discarded.
    empty = jnp.where(jnp.isnan(total), total, jnp.zeros_like(total))
    return jnp.where(denominator == 0, empty, total / safe)
