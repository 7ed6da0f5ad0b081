"""The public cross-entropy losses: validation, layout and sharding around the kernels.

The conventions they share, and the kernels, are in :mod:`jxent._cross_entropy_kernels`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jxent import (
    _aux_outputs,
    _dtypes,
    _labels,
    _layout,
    _loss_reduction,
    _sharding,
    _validation,
)
from jxent._cross_entropy_kernels import Config, label_loss
from jxent._jit import jitted, same_parameters


class _Prepared(NamedTuple):
    layout: _layout.ClassLayout
    logits: jax.Array
    where: jax.Array | None
    weights: jax.Array | None


def _prepare(
    logits: ArrayLike,
    axis: _validation.Axis,
    where: ArrayLike | None,
    class_weights: ArrayLike | None,
    reduction: str,
    axis_name: Hashable | None,
    name: str = "logits",
) -> _Prepared:
    _validation.check_reduction(reduction)
    _validation.check_axis_name(axis_name)
    x = _dtypes.as_floating(logits, name)
    layout = _layout.ClassLayout(x.shape, _validation.canonical_axes(axis, x.ndim))
    weights = _layout.class_weights_vector(
        class_weights, layout.num_classes, _dtypes.compute_dtype(x.dtype)
    )
    return _Prepared(
        layout, layout.to_last(x), _layout.broadcast_where(where, layout, per_example=True), weights
    )


def _run_sharded(
    cfg: Config, prepared: _Prepared, labels: jax.Array, labels_kind: str
) -> tuple[Any, ...]:
    """:func:`~jxent._cross_entropy_kernels.label_loss`: per example losses and weights (and
    the aux statistics with ``cfg.return_aux``).

    Logits sharded over explicit mesh axes are handled shard by shard (see
    :mod:`jxent._sharding`), their class axis with the ``axis_name`` collectives.
    """
    args = (
        (prepared.logits, _sharding.LOGITS),
        (labels, labels_kind),
        (prepared.where, _sharding.LOGITS),
        (prepared.weights, _sharding.CLASSES),
    )
    out_kinds: tuple[Any, ...] = (_sharding.BATCH, _sharding.BATCH)
    if cfg.return_aux:  # (lse, entropy, argmax, correct, counted)
        out_kinds = (*out_kinds, (_sharding.BATCH,) * 5)

    def kernel(*arrays: Any) -> tuple[Any, ...]:
        *inputs, axis_name = arrays
        return label_loss(*inputs, cfg._replace(axis_name=axis_name))

    return _sharding.per_shard(kernel, args, out_kinds, cfg.axis_name)


def _token_weights(
    weights: ArrayLike | None, layout: _layout.ClassLayout, dtype: Any
) -> jax.Array | None:
    """``weights`` as compute-dtype floats of the labels' shape (the batch shape)."""
    if weights is None:
        return None
    w = _dtypes.as_inexact(_as_array(weights, "weights"))
    try:
        return jnp.broadcast_to(w, layout.batch_shape).astype(dtype)
    except ValueError:
        raise ValueError(
            f"weights (one per example) of shape {w.shape} are not broadcastable to the "
            f"labels' shape {layout.batch_shape} (logits {layout.shape}, class axes "
            f"{layout.axes})."
        ) from None


def _normalizer(normalizer: ArrayLike | None, reduction: str) -> jax.Array | None:
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(
            f"normalizer replaces the denominator of reduction='mean'; got it with "
            f"reduction={reduction!r}."
        )
    value = _as_array(normalizer, "normalizer")
    if value.shape != ():
        raise ValueError(f"normalizer must be a scalar, got an array of shape {value.shape}.")
    return value


def _finish(
    outputs: tuple[Any, ...],
    weights: jax.Array | None,
    normalizer: jax.Array | None,
    reduction: str,
    z_loss: float,
) -> Any:
    """The reduced loss from a kernel's ``outputs``, times the token ``weights`` (plain
    JAX, so they get their exact gradient), and its :class:`CrossEntropyAux` when the
    kernel returned the aux statistics."""
    loss = outputs[0]
    if weights is not None:  # per-example outputs come back sharded like the batch
        weights = _sharding.reshard_like(weights, loss)
    loss, weight = _loss_reduction.with_token_weights(loss, outputs[1], weights)
    reduced = _loss_reduction.reduce_loss(loss, weight, reduction, normalizer=normalizer)
    if len(outputs) == 2:
        return reduced
    aux = _aux_outputs.assemble(
        outputs[2],
        z_loss=z_loss,
        token_weights=weights,
        weight=weight,
        reduction=reduction,
        normalizer=normalizer,
    )
    return reduced, aux


def _as_array(value: ArrayLike, name: str) -> jax.Array:
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name} must be an array (or nested sequence of numbers): {error}"
        ) from None


def _labels_need_traced_check(
    inputs: ArrayLike, labels: ArrayLike, axis: _validation.Axis, ignore_index: int | None
) -> bool:
    """``check_labels=True`` outside ``jax.jit``: concrete labels are checked now (a
    ``ValueError`` naming the first bad one); returns whether a traced (checkify) check is
    still needed, i.e. whether the labels are traced."""
    if isinstance(labels, jax.core.Tracer):
        return True
    shape = np.shape(inputs)
    num_classes = _layout.ClassLayout(
        shape, _validation.canonical_axes(axis, len(shape))
    ).num_classes
    _labels.check_in_range(jnp.asarray(labels), num_classes, ignore_index)
    return False


def _integer_labels(
    labels: ArrayLike, layout: _layout.ClassLayout, ignore_index: int | None
) -> jax.Array:
    labels = _dtypes.as_integer_labels(labels)
    if labels.shape != layout.batch_shape:
        raise ValueError(
            f"integer labels must have the logits' shape without the class axes, "
            f"{layout.batch_shape} (logits {layout.shape}, class axes {layout.axes}); "
            f"got labels of shape {labels.shape}."
        )
    return _labels.widen(labels, ignore_index)


def _check_concrete_labels(inputs: str) -> Callable[[dict[str, Any]], None]:
    """The eager step of ``check_labels=True``: see :func:`_labels_need_traced_check`."""

    def step(arguments: dict[str, Any]) -> None:
        if arguments["check_labels"]:
            arguments["check_labels"] = _labels_need_traced_check(
                arguments[inputs], arguments["labels"], arguments["axis"], arguments["ignore_index"]
            )

    return step


@jitted(
    "axis",
    "ignore_index",
    "label_smoothing",
    "z_loss",
    "reduction",
    "check_labels",
    "axis_name",
    "temperature",
    "return_aux",
    eager=_check_concrete_labels("logits"),
)
def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: Literal["none", "sum", "mean"] = "none",
    check_labels: bool = False,
    axis_name: Hashable | None = None,
    weights: ArrayLike | None = None,
    normalizer: ArrayLike | None = None,
    temperature: float = 1.0,
    return_aux: bool = False,
) -> Any:
    r"""Softmax cross-entropy with integer labels, with a hand-written gradient.

    With ``lp = log_softmax(logits)``, class weights ``w`` (all 1 by default), smoothing
    ``ε`` over the row's ``C`` classes and z-loss coefficient ``ζ``:

    .. math::
        \ell_n = (1-\varepsilon)\,w_{y_n}\,(-lp_{n,y_n})
                 + \frac{\varepsilon}{C} \sum_c w_c\,(-lp_{n,c})
                 + \zeta\,\operatorname{lse}(x_n)^2,
        \qquad
        \frac{\partial \ell_n}{\partial x_{n,c}} = p_{n,c}\,A_n
                 - (1-\varepsilon)\,w_{y_n}[c = y_n] - \frac{\varepsilon}{C} w_c,

    with :math:`A_n = (1-\varepsilon) w_{y_n} + \frac{\varepsilon}{C}\sum_c w_c
    + 2\zeta\,\operatorname{lse}(x_n)`. This is PyTorch's
    ``torch.nn.functional.cross_entropy(logits, labels, weight=w, ignore_index=...,
    label_smoothing=ε, reduction=...)`` in value and gradient, plus the z-loss: with
    ``reduction="mean"`` the sum is divided by :math:`\sum_n w_{y_n}` over non-ignored
    examples. One deliberate difference: a mean over zero total weight is 0 (PyTorch: NaN)
    when no counted label is invalid; an invalid label makes the mean and sum NaN.

    The extra options, all off by default (see :doc:`semantics`): with ``temperature=T``
    every formula above (and every aux output) is that of :math:`z = x / T`, and the
    gradient carries the :math:`1/T`: :math:`\partial\ell_n/\partial x = (1/T)\,
    \partial\ell_n/\partial z`. Per-example ``weights`` :math:`t_n` multiply the losses,

    .. math::
        \text{sum} = \sum_n t_n \ell_n, \qquad
        \text{mean} = \frac{\sum_n t_n \ell_n}{\sum_n t_n w_{y_n}}
        \quad\text{or}\quad \frac{\sum_n t_n \ell_n}{N},

    the second with ``normalizer=N`` (the sums over counted examples: not ignored, not
    masked out, valid label). ``return_aux=True`` also returns a
    :class:`CrossEntropyAux`: per example :math:`\operatorname{lse}(z_n)`, the entropy
    :math:`H_n = -\sum_c p_{n,c}\log p_{n,c}`, the predicted class and whether it is the
    label, and the z-loss term :math:`\zeta\operatorname{lse}(z_n)^2` reduced like the
    loss. Their gradients: :math:`p_n/T` (lse), :math:`-p_n(\log p_n + H_n)/T` (entropy).

    Positional parameters match :func:`optax.softmax_cross_entropy_with_integer_labels`.

    Args:
      logits: floating ``[..., C]`` unnormalised log-probabilities.
      labels: integer class ids of the logits' shape without the class axes. Any integer
        dtype. An id outside ``[0, C)`` that is not ``ignore_index``, or one pointing at a
        class masked out by ``where``, gives a NaN loss for its example (never wrapped).
      axis: class axis, or tuple of axes (a label is then a flat index into them, as optax).
      where: boolean mask broadcastable to ``logits`` (or of the labels' shape, one flag per
        example); masked classes take no part, and a row masked out entirely gives loss 0,
        gradient 0 and no weight in the mean.
      class_weights: ``[C]`` per-class weights (PyTorch's ``weight``); differentiable.
      ignore_index: a label value whose examples give loss 0 and no weight in the mean.
      label_smoothing: ``ε`` in ``[0, 1]``.
      z_loss: ``ζ >= 0``.
      reduction: ``"none"`` (per-example losses), ``"sum"`` or ``"mean"`` (weighted).
      check_labels: also verify every label. Eagerly, a bad label raises ``ValueError``
        naming it; under ``jax.jit`` this adds a ``jax.experimental.checkify`` check, so wrap
        the jitted function in ``checkify.checkify`` and call ``err.throw()``.
      axis_name: vocabulary parallelism inside :func:`jax.shard_map`: the mesh axis over
        which the class axis (and ``class_weights``) is sharded; labels are global ids.
      weights: per-example weights :math:`t_n` (e.g. a padding mask), broadcastable to the
        labels' shape: each loss is multiplied by its weight and ``reduction="mean"``
        divides by :math:`\sum_n t_n w_{y_n}` over counted examples. Differentiable.
      normalizer: with ``reduction="mean"`` only, a scalar denominator used instead of
        that sum (T5X's ``loss_normalizing_factor``, e.g. a global token count); 0 gives
        0. Differentiable.
      temperature: ``T > 0``, static: the loss (and gradient, and aux outputs) of
        ``logits / T``, divided where the logits are converted to float32 (no extra
        logits-sized array).
      return_aux: static: return ``(loss, aux)``, ``aux`` a :class:`CrossEntropyAux`
        computed with the loss: on GPU and TPU in its one pass over the logits, on the
        CPU with one more class sum (entropy) and class max (argmax). Without it none of
        that is computed.

    Returns:
      float32 losses (float64 for float64 logits) of the labels' shape, or a scalar; with
      ``return_aux=True`` the pair ``(loss, CrossEntropyAux)``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jxent
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([0, 1])
      >>> loss = jxent.softmax_cross_entropy_with_integer_labels(logits, labels)
      >>> print(np.asarray(loss).round(4))
      [0.2761 2.9518]
      >>> jax.grad(jxent.softmax_cross_entropy_with_integer_labels)(
      ...     jnp.array([0.0, 0.0]), jnp.array(1))  # softmax - one_hot
      Array([ 0.5, -0.5], dtype=float32)

      Per-example weights (the mean is (0.2761·1 + 2.9518·0.5) / 1.5) and the aux
      outputs:

      >>> loss, aux = jxent.softmax_cross_entropy_with_integer_labels(
      ...     logits, labels, weights=jnp.array([1.0, 0.5]), reduction="mean",
      ...     return_aux=True)
      >>> print(f"{loss:.4f}", aux.argmax, aux.correct, f"{aux.accuracy:.2f}")
      1.1680 [0 2] [ True False] 0.50
      >>> print(np.asarray(aux.lse).round(4), np.asarray(aux.entropy).round(4))
      [1.4761 1.7518] [0.7171 0.8573]

    Note:
      Reverse mode only (a ``jax.custom_vjp``): use ``jax.jacrev`` and ``jax.hessian``, not
      ``jax.jvp`` / ``jax.jacfwd``; see :doc:`gradients`.

    References:
      Chowdhery et al., `PaLM <https://arxiv.org/abs/2204.02311>`_, 2022 (z-loss);
      Szegedy et al., `Rethinking the Inception Architecture
      <https://arxiv.org/abs/1512.00567>`_, 2016 (label smoothing).
    """
    _validation.check_ignore_index(ignore_index)
    cfg = Config(
        "integer",
        axis_name,
        ignore_index,
        _validation.check_unit_interval(label_smoothing, "label_smoothing"),
        _validation.check_nonnegative(z_loss, "z_loss"),
        _validation.check_positive(temperature, "temperature"),
        bool(return_aux),
    )
    prepared = _prepare(logits, axis, where, class_weights, reduction, axis_name)
    if check_labels and axis_name is None:
        _labels.check_in_range(labels, prepared.layout.num_classes, ignore_index)
    int_labels = _integer_labels(labels, prepared.layout, ignore_index)
    token_weights = _token_weights(
        weights, prepared.layout, _dtypes.compute_dtype(prepared.logits.dtype)
    )
    denominator = _normalizer(normalizer, reduction)
    outputs = _run_sharded(cfg, prepared, int_labels, _sharding.BATCH)
    return _finish(outputs, token_weights, denominator, reduction, cfg.z_loss)


@jitted("axis", "label_smoothing", "z_loss", "reduction", "axis_name", "temperature", "return_aux")
def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    class_weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: Literal["none", "sum", "mean"] = "none",
    axis_name: Hashable | None = None,
    weights: ArrayLike | None = None,
    normalizer: ArrayLike | None = None,
    temperature: float = 1.0,
    return_aux: bool = False,
) -> Any:
    r"""Softmax cross-entropy with probability (dense) targets, with a hand-written gradient.

    With ``lp = log_softmax(logits)``, smoothed targets :math:`t' = (1-\varepsilon)t +
    \varepsilon/C`, class weights ``w`` and z-loss coefficient ``ζ``:

    .. math::
        \ell_n = -\sum_c w_c\,t'_{n,c}\,lp_{n,c} + \zeta\,\operatorname{lse}(x_n)^2,
        \qquad
        \frac{\partial \ell_n}{\partial x_{n,c}} = p_{n,c}\Big(\sum_k w_k t'_{n,k}
            + 2\zeta\operatorname{lse}(x_n)\Big) - w_c t'_{n,c},
        \qquad
        \frac{\partial \ell_n}{\partial t_{n,c}} = -(1-\varepsilon)\,w_c\,lp_{n,c}.

    PyTorch's ``cross_entropy`` with class-probability targets in value and gradient
    (``reduction="mean"`` divides by the number of examples, the weights do not enter the
    denominator), plus the z-loss; with ``where``, rows masked out entirely count for
    nothing. Unlike PyTorch and optax, a class with zero target mass contributes 0 even
    where its logit is ``-inf`` (``0·log 0 = 0``). The targets get a gradient too, for
    distillation.

    ``weights``, ``normalizer``, ``temperature`` and ``return_aux`` are those of
    :func:`softmax_cross_entropy_with_integer_labels`, with :math:`t_n` times 1 in the
    mean's denominator (:math:`\sum_n t_n` over rows not masked out) and ``aux.correct``
    comparing the predicted class with the targets' argmax (the first of equal maxima).
    Distillation with a temperature: the loss of ``logits / T`` against targets the
    caller softened (e.g. ``jxent.softmax(teacher / T)``), times :math:`T^2` if wanted.

    Positional parameters match :func:`optax.softmax_cross_entropy`.

    Args:
      logits: floating ``[..., C]`` unnormalised log-probabilities.
      labels: target probabilities, broadcastable to ``logits``.
      axis: class axis or tuple of axes.
      where: boolean mask broadcastable to ``logits`` (or one flag per example).
      class_weights: ``[C]`` per-class weights.
      label_smoothing: ``ε`` in ``[0, 1]``.
      z_loss: ``ζ >= 0``.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      axis_name: vocabulary parallelism inside :func:`jax.shard_map` (see
        :func:`softmax_cross_entropy_with_integer_labels`).
      weights: per-example weights of the batch shape (or broadcastable to it).
      normalizer: the mean's denominator (``reduction="mean"`` only).
      temperature: ``T > 0``, static: the loss of ``logits / T``.
      return_aux: static: also return a :class:`CrossEntropyAux`.

    Returns:
      float32 losses (float64 for float64 logits) of the batch shape, or a scalar; with
      ``return_aux=True`` the pair ``(loss, CrossEntropyAux)``.

    Example:
      >>> import jax.numpy as jnp, numpy as np, jxent
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print(np.asarray(jxent.softmax_cross_entropy(logits, labels)).round(4))
      [0.2761 2.9518]
      >>> loss, aux = jxent.softmax_cross_entropy(logits, labels, return_aux=True)
      >>> print(aux.argmax, aux.correct)
      [0 2] [ True False]

    Note:
      Reverse mode only (a ``jax.custom_vjp``): use ``jax.jacrev`` and ``jax.hessian``, not
      ``jax.jvp`` / ``jax.jacfwd``; see :doc:`gradients`.
    """
    cfg = Config(
        "dense",
        axis_name,
        label_smoothing=_validation.check_unit_interval(label_smoothing, "label_smoothing"),
        z_loss=_validation.check_nonnegative(z_loss, "z_loss"),
        temperature=_validation.check_positive(temperature, "temperature"),
        return_aux=bool(return_aux),
    )
    prepared = _prepare(logits, axis, where, class_weights, reduction, axis_name)
    targets = _dtypes.as_floating(labels, "labels (dense targets)")
    try:
        targets = jnp.broadcast_to(targets, prepared.layout.shape)
    except ValueError:
        raise ValueError(
            f"dense labels of shape {targets.shape} are not broadcastable to the logits' "
            f"shape {prepared.layout.shape}."
        ) from None
    targets = prepared.layout.to_last(targets)
    token_weights = _token_weights(
        weights, prepared.layout, _dtypes.compute_dtype(prepared.logits.dtype)
    )
    denominator = _normalizer(normalizer, reduction)
    outputs = _run_sharded(cfg, prepared, targets, _sharding.LOGITS)
    return _finish(outputs, token_weights, denominator, reduction, cfg.z_loss)


@jitted(
    "axis",
    "ignore_index",
    "reduction",
    "check_labels",
    "axis_name",
    eager=_check_concrete_labels("log_probs"),
)
def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
    check_labels: bool = False,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Negative log-likelihood of integer labels under given log-probabilities.

    .. math::
        \ell_n = -w_{y_n}\,lp_{n,y_n},
        \qquad \frac{\partial \ell_n}{\partial lp_{n,c}} = -w_{y_n}[c = y_n].

    PyTorch's ``torch.nn.functional.nll_loss`` in value and gradient: ``reduction="mean"``
    divides by :math:`\sum_n w_{y_n}` over non-ignored examples (0 when there are none).
    ``cross_entropy(x, y)`` equals ``nll_loss(log_softmax(x), y)``.

    Args:
      log_probs: floating ``[..., C]`` log-probabilities (e.g. from :func:`log_softmax`).
      labels: integer class ids of the input's shape without the class axes; invalid ids
        give NaN (see :func:`softmax_cross_entropy_with_integer_labels`).
      axis: class axis or tuple of axes.
      where: boolean mask broadcastable to ``log_probs`` (or one flag per example).
      class_weights: ``[C]`` per-class weights.
      ignore_index: a label value whose examples give loss 0 and no weight in the mean.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      check_labels: verify every label (see
        :func:`softmax_cross_entropy_with_integer_labels`).
      axis_name: vocabulary parallelism inside :func:`jax.shard_map`.

    Returns:
      float32 losses (float64 for float64 inputs) of the labels' shape, or a scalar.

    Example:
      >>> import jax.numpy as jnp, jxent
      >>> jxent.nll_loss(jnp.log(jnp.array([[0.25, 0.75]])), jnp.array([1]))
      Array([0.2877], dtype=float32)
    """
    _validation.check_ignore_index(ignore_index)
    prepared = _prepare(log_probs, axis, where, class_weights, reduction, axis_name, "log_probs")
    if check_labels and axis_name is None:
        _labels.check_in_range(labels, prepared.layout.num_classes, ignore_index)
    int_labels = _integer_labels(labels, prepared.layout, ignore_index)
    cfg = Config("nll", axis_name, ignore_index)
    loss, weight = _run_sharded(cfg, prepared, int_labels, _sharding.BATCH)
    return _loss_reduction.reduce_loss(loss, weight, reduction)


@same_parameters(softmax_cross_entropy_with_integer_labels, reduction="mean")
def cross_entropy(logits: ArrayLike, labels: ArrayLike, *args: Any, **kwargs: Any) -> Any:
    r"""Softmax cross-entropy that picks its form from the labels' dtype; mean by default.

    .. math::
        \ell_n = -\sum_c w_c\,t_{n,c}\,\log\operatorname{softmax}(x_n)_c

    Integer ``labels`` go to :func:`softmax_cross_entropy_with_integer_labels` (``t`` is
    one-hot), floating ones to :func:`softmax_cross_entropy` (``t`` are probabilities);
    every keyword means what it means there. This is the function to put under
    ``jax.grad``, like PyTorch's ``torch.nn.functional.cross_entropy``.

    Args:
      logits: floating ``[..., C]`` unnormalised log-probabilities.
      labels: integer class ids, or target probabilities.
      axis: class axis or tuple of axes.
      where: boolean mask (see :func:`softmax_cross_entropy_with_integer_labels`).
      class_weights: ``[C]`` per-class weights.
      ignore_index: integer labels only.
      label_smoothing: ``ε`` in ``[0, 1]``.
      z_loss: ``ζ >= 0``.
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
      check_labels: integer labels only; see
        :func:`softmax_cross_entropy_with_integer_labels`.
      axis_name: vocabulary parallelism inside :func:`jax.shard_map`.
      weights: per-example weights (the mean divides by their sum over counted examples,
        times the label's class weight for integer labels).
      normalizer: the mean's explicit denominator.
      temperature: ``T > 0``: the loss of ``logits / T``.
      return_aux: also return a :class:`CrossEntropyAux`.

    Returns:
      The reduced loss (float32, or float64 for float64 logits), or per-example losses;
      with ``return_aux=True`` the pair ``(loss, CrossEntropyAux)``.

    Example:
      >>> import jax, jax.numpy as jnp, jxent
      >>> logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
      >>> jxent.cross_entropy(logits, jnp.array([0, 1]))
      Array(0.2395, dtype=float32)
      >>> jax.grad(jxent.cross_entropy)(logits, jnp.array([0, 1])).shape
      (2, 3)
    """
    # Passed on as given (no signature binding on this per-step path): the parameters after
    # ``where`` are keyword-only, so ``reduction`` can only come as a keyword.
    options = {"reduction": "mean", **kwargs}
    labels = _as_array(labels, "labels")
    label_dtype = labels.dtype
    if jnp.issubdtype(label_dtype, jnp.integer):
        return softmax_cross_entropy_with_integer_labels(logits, labels, *args, **options)
    if not jnp.issubdtype(label_dtype, jnp.floating):
        raise TypeError(
            f"labels must be integer class ids or floating probabilities, got dtype {label_dtype}."
        )
    ignore_index = options.pop("ignore_index", None)
    if ignore_index is not None:
        raise ValueError(
            f"ignore_index={ignore_index} applies to integer labels; got floating labels."
        )
    if options.pop("check_labels", False):
        raise ValueError("check_labels=True applies to integer labels; got floating labels.")
    if labels.shape != np.shape(logits):
        # PyTorch reads floating labels as probabilities only when they have the input's
        # shape; broadcasting class ids given as floats would silently compute another loss.
        raise ValueError(
            f"floating labels are read as class probabilities and must have the logits' "
            f"shape {np.shape(logits)}; got labels of shape {labels.shape} and dtype "
            f"{label_dtype}. For class ids, pass integers (e.g. labels.astype(jnp.int32)); "
            f"for broadcast probabilities, use jxent.softmax_cross_entropy."
        )
    return softmax_cross_entropy(logits, labels, *args, **options)
