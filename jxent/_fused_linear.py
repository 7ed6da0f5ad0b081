"""The public fused linear + cross-entropy: validation, dtypes and sharding around the kernels
of :mod:`jxent._fused_linear_kernels` (where the algorithm is described).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Hashable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jxent import (
    _dtypes,
    _layout,
    _loss_reduction,
    _sharding,
    _validation,
)
from jxent._aux_outputs import CrossEntropyAux
from jxent._fused_linear_kernels import KERNELS, W_LAYOUTS, Config, local_loss, vocab_axis
from jxent._jit import jitted

_STATIC = (
    "chunk_size",
    "ignore_index",
    "label_smoothing",
    "z_loss",
    "logit_softcap",
    "reduction",
    "axis_name",
    "temperature",
    "return_aux",
    "w_layout",
)

# Test-only: the (kernel, vocab_block) that tracing uses, "auto" (per platform) by default;
# see with_kernel.
_FORCED_KERNEL: contextvars.ContextVar[tuple[str, int]] = contextvars.ContextVar(
    "jxent_fused_linear_kernel", default=("auto", 0)
)


def _check_shapes(
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    bias: jax.Array | None,
    w_layout: str,
) -> None:
    shape_name = "[D, V]" if w_layout == "dv" else "[V, D]"
    v_axis = vocab_axis(w_layout)
    if x.ndim < 1:
        raise ValueError(f"x must have shape [..., D], got a scalar of shape {x.shape}.")
    if w.ndim != 2:
        raise ValueError(
            f"w must have shape {shape_name} (w_layout={w_layout!r}), got shape {w.shape}."
        )
    if w.shape[v_axis] == 0:
        raise ValueError(
            f"w must have at least one class (shape {shape_name} with V >= 1, "
            f"w_layout={w_layout!r}), got {w.shape}."
        )
    if x.shape[-1] != w.shape[1 - v_axis]:
        raise ValueError(
            f"x's last dimension must equal w's D dimension (axis {1 - v_axis} for "
            f"w_layout={w_layout!r}): got x of shape {x.shape} and w of shape {w.shape}."
        )
    if labels.shape != x.shape[:-1]:
        raise ValueError(
            f"labels must have x's shape without its last dimension, {x.shape[:-1]}; "
            f"got labels of shape {labels.shape} (x has shape {x.shape})."
        )
    if bias is not None and bias.shape != (w.shape[v_axis],):
        raise ValueError(
            f"bias must have shape ({w.shape[v_axis]},) (w's vocabulary dimension), "
            f"got shape {bias.shape}."
        )


def _check_w_layout(w_layout: str) -> None:
    if w_layout not in W_LAYOUTS:
        raise ValueError(f"w_layout must be one of {W_LAYOUTS}, got {w_layout!r}.")


def _normalizer(normalizer: ArrayLike | None, reduction: str) -> jax.Array | None:
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(
            f"normalizer is the denominator of reduction='mean'; got reduction={reduction!r} "
            f"with a normalizer. Pass reduction='mean', or drop the normalizer."
        )
    value = jnp.asarray(normalizer)
    if value.shape != ():
        raise ValueError(f"normalizer must be a scalar, got shape {value.shape}.")
    return value


def _check_softcap(logit_softcap: float | None) -> float | None:
    if logit_softcap is None:
        return None
    if isinstance(logit_softcap, jax.core.Tracer):
        raise TypeError(f"logit_softcap must be a static Python float, got {logit_softcap}.")
    value = float(logit_softcap)
    if not value > 0.0:
        raise ValueError(f"logit_softcap must be > 0 (or None), got {logit_softcap}.")
    return value


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")


@jitted(*_STATIC)
def fused_linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    chunk_size: int | None = None,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: Literal["none", "sum", "mean"] = "mean",
    axis_name: Hashable | None = None,
    weights: ArrayLike | None = None,
    normalizer: ArrayLike | None = None,
    temperature: float = 1.0,
    return_aux: bool = False,
    w_layout: Literal["dv", "vd"] = "dv",
) -> Any:
    r"""Cross-entropy of ``x @ w + bias`` against integer labels, without forming the logits.

    With logits :math:`z = (x w + b) / T` (soft-capped to :math:`s \tanh(\cdot / s)` when
    ``logit_softcap=s`` before the division by the temperature :math:`T`),
    :math:`lp = \operatorname{log\_softmax}(z)`, class weights :math:`w_c` (all 1 by
    default), token weights :math:`t_n` (``weights``, all 1 by default), smoothing
    :math:`\varepsilon` over the ``V`` classes and z-loss coefficient :math:`\zeta`:

    .. math::
        \ell_n = (1-\varepsilon)\,w_{y_n}\,(-lp_{n,y_n})
                 + \frac{\varepsilon}{V} \sum_c w_c\,(-lp_{n,c})
                 + \zeta \operatorname{lse}(z_n)^2,
        \qquad
        \text{mean} = \frac{\sum_n t_n \ell_n}{\sum_{n \text{ not ignored}} t_n w_{y_n}}
        \ \text{(or over } \texttt{normalizer}\text{)},

    ``"sum"`` is :math:`\sum_n t_n \ell_n` and ``"none"`` gives :math:`t_n \ell_n`. The
    gradient for the logits is :math:`t_n (p A_n - (1-\varepsilon) w_{y_n} e_{y_n} -
    \tfrac{\varepsilon}{V} w) / T` with :math:`A_n = (1-\varepsilon) w_{y_n} +
    \tfrac{\varepsilon}{V} \sum_c w_c + 2\zeta \operatorname{lse}(z_n)` (times the mean's
    :math:`1 / \sum t w_y`, and the soft cap's :math:`1 - \tanh^2`); the token weights get
    their exact gradient, :math:`\ell_n` for ``"sum"`` and
    :math:`(\ell_n - \text{mean}\cdot w_{y_n}) / \sum_m t_m w_{y_m}` for ``"mean"``.

    This equals ``softmax_cross_entropy_with_integer_labels(x @ w + bias, labels, ...)``
    (PyTorch's ``cross_entropy`` semantics for ``weight``, ``ignore_index``,
    ``label_smoothing`` and ``reduction``, plus PaLM's z-loss) in value and in the gradients
    for ``x``, ``w``, ``bias`` and ``weights``, but never holds the ``[N, V]`` logits or their
    gradient:
    on the CPU the ``N`` tokens are processed in chunks of ``chunk_size`` rows in a
    ``lax.scan``. For ``reduction="mean"``/``"sum"`` the gradients are formed chunk by chunk
    during the forward pass (three matmuls in all, like the unfused computation);
    ``reduction="none"`` re-forms each chunk's logits in the backward pass (four matmuls).
    On GPU and TPU the loops run over blocks of the vocabulary instead, each covering all
    tokens (``[N, block]`` float32 logits within 64 MiB on GPU, 32 MiB on TPU, at least 128
    classes): the forward
    pass merges the blocks' log-normalisers, the backward pass re-forms each block's logits
    and writes its slice of ``w``'s gradient once, in ``w``'s dtype (four matmuls), so that
    no float32 copy of ``w`` is held. On meshes the blocks are sized per device and ``x``'s
    gradient is formed in a pass of its own over tiles of rows (five matmuls), so that no
    float32 ``[N, D]`` sum is held either. Calling it without differentiating does no gradient
    work.

    ``return_aux=True`` returns ``(loss, aux)``, a :class:`jxent.CrossEntropyAux` of per-token
    ``lse``, ``entropy``, ``argmax``, ``correct`` and ``counted`` and the z-loss term reduced
    like the loss (``loss - aux.z_loss`` is the cross-entropy alone; ``aux.accuracy`` the
    token accuracy), computed in the same passes over the vocabulary: a running first maximum
    and an entropy merged block by block like the log-normaliser, no ``[N, V]`` array.
    ``lse`` and ``entropy`` are differentiable (``g·p/T`` and ``-g·p(log p + H)/T`` for the
    logits). ``argmax`` is taken of ``x @ w + bias`` before the soft cap and the temperature,
    which keep the order (so that ties the cap's rounding would make do not count); a row
    with a NaN logit gives an id outside ``[0, V)`` (never correct). Aux outputs that are
    only logged cost nothing in the backward pass (and XLA drops unused ones, such as the
    entropy); when their gradients are used, the CPU kernel with ``"mean"``/``"sum"``
    re-forms each chunk's logits in the backward pass (three more matmuls; the other paths
    re-form anyway).

    Ignored examples give loss 0 and no weight in the mean; a mean over zero total weight is
    0 with zero gradient (PyTorch: NaN) when no label is invalid. A label outside ``[0, V)``
    that is not ``ignore_index`` gives NaN for its example (never wrapped to another class,
    unsigned labels included), and so do the sum and the mean that include it.

    ``chunk_size=None`` splits the ``N`` rows into ``K = ceil(N·V·4 bytes / 256 MiB)``
    equal chunks, i.e. ``T = ceil(N / K)`` rows rounded up to a multiple of 8, so that one
    float32 ``[T, V]`` logits block stays within 256 MiB. ``N`` is padded to a multiple of
    ``T`` with rows that count for nothing.

    Args:
      x: floating ``[..., D]`` inputs (hidden states).
      w: floating ``[D, V]`` output projection (for vocabulary parallelism: this device's
        ``[D, V / devices]`` slice).
      labels: integer class ids of shape ``x.shape[:-1]``; global ids under ``axis_name``.
      bias: optional ``[V]`` bias (sharded like ``w`` under ``axis_name``).
      chunk_size: tokens per chunk of the CPU kernel; ``None`` chooses one from the shapes
        (see above). The GPU / TPU kernel does not chunk the tokens and ignores it.
      class_weights: optional ``[V]`` per-class weights (PyTorch's ``weight``; sharded like
        ``w`` under ``axis_name``). Treated as constants: they get no gradient.
      ignore_index: a label value whose examples give loss 0 and no weight in the mean.
      label_smoothing: ``ε`` in ``[0, 1]``.
      z_loss: ``ζ >= 0``; adds ``ζ·lse²`` per non-ignored example, inside the same mean.
      logit_softcap: ``s > 0`` applies ``z -> s·tanh(z / s)`` to the logits (Gemma 2).
      reduction: ``"mean"`` (weighted, as above), ``"sum"`` or ``"none"`` (per-example
        losses of the labels' shape).
      axis_name: vocabulary parallelism inside :func:`jax.shard_map`: the mesh axis over
        which ``w``'s vocabulary axis is sharded (device ``i`` holds classes
        ``[i·V_local, (i+1)·V_local)``). The per-row max, sum of exponentials and target
        logit are combined with ``pmax`` / ``psum``; the vocabulary is never gathered.
        ``x``'s gradient is summed over the axis.
      weights: optional per-token float weights of the labels' shape: each example's loss
        and its weight in the mean are multiplied by them. Differentiable.
      normalizer: optional scalar denominator of ``reduction="mean"`` in place of the total
        weight (e.g. a global token count; 0 gives 0); an error with another reduction.
      temperature: ``T > 0``; the softmax is taken of the logits over ``T`` (after the
        soft cap), and every aux output refers to that distribution.
      return_aux: also return a :class:`jxent.CrossEntropyAux` (see above).
      w_layout: ``"dv"``: ``w`` is ``[D, V]``; ``"vd"``: ``w`` is ``[V, D]`` (PyTorch's
        ``Linear``, a tied embedding table), used as it is by every product (no transposed
        copy) and its gradient returned as ``[V, D]``. Under explicit sharding the
        vocabulary axis of ``w`` is then axis 0.

    Returns:
      The float32 loss (float64 for float64 inputs): a scalar, or per-example losses of the
      labels' shape for ``reduction="none"``; with ``return_aux``, ``(loss, aux)``.
      Gradients come in the inputs' dtypes; bf16 inputs are multiplied with float32
      accumulation.

    Example:
      >>> import jax, jax.numpy as jnp, jxent
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> w = jnp.array([[1.0, -1.0, 0.0], [0.5, 0.0, 1.0]])
      >>> jxent.fused_linear_cross_entropy(x, w, jnp.array([0, 2]))
      Array(0.4076, dtype=float32)
      >>> loss_grad = jax.grad(jxent.fused_linear_cross_entropy, argnums=(0, 1))
      >>> dx, dw = loss_grad(x, w, jnp.array([0, 2]))
      >>> dw.shape
      (2, 3)
      >>> loss, aux = jxent.fused_linear_cross_entropy(
      ...     x, w.T, jnp.array([0, 2]), w_layout="vd", return_aux=True)
      >>> aux.argmax, aux.accuracy
      (Array([0, 2], dtype=int32), Array(1., dtype=float32))

    Note:
      Reverse mode only (a ``jax.custom_vjp``): use ``jax.jacrev`` and ``jax.hessian``, not
      ``jax.jvp`` / ``jax.jacfwd``; see :doc:`gradients`.

    References:
      Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
      <https://arxiv.org/abs/2411.09009>`_, 2024;
      Hsu et al., `Liger Kernel: Efficient Triton Kernels for LLM Training
      <https://arxiv.org/abs/2410.10989>`_, 2024 (chunked fused linear cross-entropy);
      Gemma Team, `Gemma 2 <https://arxiv.org/abs/2408.00118>`_, 2024 (logit soft-capping);
      Chowdhery et al., `PaLM <https://arxiv.org/abs/2204.02311>`_, 2022 (z-loss).
    """
    _validation.check_reduction(reduction)
    _validation.check_axis_name(axis_name)
    _validation.check_ignore_index(ignore_index)
    _check_chunk_size(chunk_size)
    _check_w_layout(w_layout)
    smoothing = _validation.check_unit_interval(label_smoothing, "label_smoothing")
    z_coef = _validation.check_nonnegative(z_loss, "z_loss")
    softcap = _check_softcap(logit_softcap)
    temp = _validation.check_positive(temperature, "temperature")
    denominator = _normalizer(normalizer, reduction)
    x = _dtypes.as_floating(x, "x")
    w = _dtypes.as_floating(w, "w")
    labels = _dtypes.as_integer_labels(labels)
    bias_arr = None if bias is None else _dtypes.as_floating(bias, "bias")
    _check_shapes(x, w, labels, bias_arr, w_layout)
    # One operand dtype for the matmuls; astype's transpose returns each gradient in its
    # input's dtype.
    operand_dtype = jnp.result_type(x.dtype, w.dtype)
    x, w = x.astype(operand_dtype), w.astype(operand_dtype)
    compute_dtype = _dtypes.compute_dtype(operand_dtype)
    v_axis = vocab_axis(w_layout)
    class_weights_arr = _layout.class_weights_vector(class_weights, w.shape[v_axis], compute_dtype)
    if class_weights_arr is not None:
        class_weights_arr = lax.stop_gradient(class_weights_arr)
    token_weights = _layout.weights_array(
        weights, labels.shape, compute_dtype, "weights", "the labels' shape: one weight per token"
    )

    kernel, vocab_block = _FORCED_KERNEL.get()
    # chunk_size 0 and num_rows 0 are filled in per device by local_loss. With a normalizer
    # the kernels sum, and the sum is divided below (one rule: reduce_loss's).
    options = Config(
        chunk_size or 0,
        0,
        ignore_index,
        smoothing,
        z_coef,
        softcap,
        "sum" if denominator is not None else reduction,
        axis_name,
        kernel=kernel,
        vocab_block=vocab_block,
        temperature=temp,
        return_aux=bool(return_aux),
        w_layout=w_layout,
    )
    arrays = (x, w, bias_arr, labels, class_weights_arr, token_weights)
    out = _sharded_loss(arrays, options, v_axis)
    if denominator is None:
        return out
    if not return_aux:
        return _loss_reduction.reduce_loss(out, None, "mean", normalizer=denominator)
    loss, aux = out
    return (
        _loss_reduction.reduce_loss(loss, None, "mean", normalizer=denominator),
        aux._replace(
            z_loss=_loss_reduction.reduce_loss(aux.z_loss, None, "mean", normalizer=denominator)
        ),
    )


def _sharded_loss(arrays: tuple[Any, ...], options: Config, v_axis: int) -> Any:
    """``local_loss`` on the whole arrays, or, when they are sharded over explicit mesh
    axes, once per shard: each device runs the kernel over its rows and its slice of the
    vocabulary; only per-row statistics and the reduced loss cross devices."""
    x, w, bias, labels, class_weights, token_weights = arrays
    plan = _sharding.matmul_plan(x, w, v_axis)
    if plan is None:
        return local_loss(x, w, bias, labels, class_weights, token_weights, options)
    options = options._replace(axis_name=plan.axis_name, batch_axes=plan.batch_axes())
    w_spec = P(None, plan.classes) if v_axis == 1 else P(plan.classes, None)
    args = (
        (x, P(*plan.batch, None)),
        (w, w_spec),
        (bias, _sharding.CLASSES),
        (labels, _sharding.BATCH),
        (class_weights, _sharding.CLASSES),
        (token_weights, _sharding.BATCH),
    )
    loss_kind = _sharding.BATCH if options.reduction == "none" else _sharding.REPLICATED
    out_kind: Any = loss_kind
    if options.return_aux:
        batch = _sharding.BATCH
        kinds: Any = (batch, loss_kind, batch, batch, batch, batch)
        out_kind = (loss_kind, CrossEntropyAux(*kinds))
    local = functools.partial(local_loss, options=options)
    return _sharding.map_shards(local, plan, args, out_kind)


@functools.cache
def with_kernel(kernel: str, vocab_block: int = 0) -> Callable[..., Any]:
    """Test-only: :func:`fused_linear_cross_entropy` with its kernel forced, e.g. the
    vocabulary-blocked kernel of GPU and TPU (``"blocked"``, ``vocab_block`` classes per
    block, 0: the default size) on the CPU. A jitted function of its own, so that its
    compiled programs never mix with the public function's; it traces the same definition
    with ``(kernel, vocab_block)`` set for the duration of the trace."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    definition = fused_linear_cross_entropy.__wrapped__  # type: ignore[attr-defined]

    @functools.wraps(definition)
    def forced(*args: Any, **kwargs: Any) -> Any:
        token = _FORCED_KERNEL.set((kernel, vocab_block))
        try:
            return definition(*args, **kwargs)
        finally:
            _FORCED_KERNEL.reset(token)

    return jitted(*_STATIC)(forced)
