"""Binary cross-entropy on logits, with a hand-written gradient."""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _dtypes, _elementwise, _loss_reduction, _sharding, _validation
from jxent._jit import jitted


def _softplus(x: jax.Array) -> jax.Array:
    """``log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))``, exact for every finite x."""
    return jnp.logaddexp(x, jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bce_impl(x: jax.Array, y: jax.Array, pos_weight: jax.Array, eps: float) -> jax.Array:
    return _bce_fwd(x, y, pos_weight, eps)[0]


def _smooth(y: jax.Array, eps: float) -> jax.Array:
    return (1.0 - eps) * y + eps / 2.0 if eps else y


def _bce_fwd(
    x: jax.Array, y: jax.Array, pos_weight: jax.Array, eps: float
) -> tuple[jax.Array, tuple[Any, ...]]:
    dtype = _dtypes.compute_dtype(x.dtype)
    xf, t, pw = x.astype(dtype), _smooth(y.astype(dtype), eps), pos_weight.astype(dtype)
    # -log sigmoid(x) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x).
    loss = _elementwise.weighted(pw * t, _softplus(-xf)) + _elementwise.weighted(
        1.0 - t, _softplus(xf)
    )
    return loss, (x, y, pos_weight)


def _bce_bwd(eps: float, residuals: tuple[Any, ...], g: jax.Array) -> tuple[Any, ...]:
    x, y, pos_weight = residuals
    dtype = g.dtype
    xf, t, pw = x.astype(dtype), _smooth(y.astype(dtype), eps), pos_weight.astype(dtype)
    sig = jax.nn.sigmoid(xf)
    dx = g * (pw * t * (sig - 1.0) + (1.0 - t) * sig)
    dy = g * (1.0 - eps) * (pw * _softplus(-xf) - _softplus(xf))
    dpw = _sum_to_shape(g * _elementwise.weighted(t, _softplus(-xf)), pos_weight.shape)
    dpw = _sharding.like_primal(dpw, pos_weight)
    return dx.astype(x.dtype), dy.astype(y.dtype), dpw.astype(pos_weight.dtype)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums a cotangent over the axes along which a ``shape``-shaped input was broadcast."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1
    )
    return jnp.sum(x, axis=axes).reshape(shape)


_bce_impl.defvjp(_bce_fwd, _bce_bwd)


@jitted("label_smoothing", "reduction")
def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    pos_weight: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> jax.Array:
    r"""Binary cross-entropy of sigmoid probabilities, from logits, with a hand-written gradient.

    With :math:`t' = (1-\varepsilon)\,t + \varepsilon/2` and positive-class weight ``w``:

    .. math::
        \ell = -w\,t'\log\sigma(x) - (1-t')\log(1-\sigma(x))
             = w\,t'\operatorname{softplus}(-x) + (1-t')\operatorname{softplus}(x),
        \qquad \frac{\partial \ell}{\partial x} = w\,t'(\sigma(x) - 1) + (1-t')\,\sigma(x).

    PyTorch's ``binary_cross_entropy_with_logits(logits, labels, pos_weight=w,
    reduction=...)`` in value and gradient (``mean`` averages over every element); label
    smoothing is the two-class form of PyTorch's rule. The labels and ``pos_weight`` get
    gradients too. A term with zero weight contributes 0 even at an infinite logit.

    Args:
      logits: floating logits of any shape.
      labels: targets in ``[0, 1]`` of the logits' shape (integers are converted).
      pos_weight: weight of the positive term, broadcastable to ``logits`` (e.g. ``[C]``).
      label_smoothing: ``ε`` in ``[0, 1]``.
      reduction: ``"none"`` (elementwise), ``"sum"`` or ``"mean"``.

    Returns:
      float32 losses (float64 for float64 logits) of the logits' shape, or a scalar.

    Example:
      >>> import jax.numpy as jnp, jxent
      >>> jxent.sigmoid_binary_cross_entropy(jnp.array([0.0, 100.0]), jnp.array([1.0, 0.0]))
      Array([  0.6931, 100.    ], dtype=float32)
    """
    _validation.check_reduction(reduction)
    eps = _validation.check_unit_interval(label_smoothing, "label_smoothing")
    x = _dtypes.as_floating(logits, "logits")
    y = jnp.asarray(labels)
    if y.shape != x.shape:
        raise ValueError(
            f"labels must have the logits' shape {x.shape}, got labels of shape {y.shape}."
        )
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(x.dtype)
    y = _sharding.reshard_like(y, x)
    pw = (
        jnp.ones((), _dtypes.compute_dtype(x.dtype))
        if pos_weight is None
        else jnp.asarray(pos_weight)
    )
    # pos_weight stays small (e.g. [C]); the rules broadcast it and sum its cotangent back.
    try:
        fits = jnp.broadcast_shapes(pw.shape, x.shape) == x.shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"pos_weight of shape {pw.shape} is not broadcastable to the logits' shape {x.shape}."
        )
    loss = _bce_impl(x, y, pw, eps)
    return _loss_reduction.reduce_loss(loss, jnp.ones_like(loss), reduction)
