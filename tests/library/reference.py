"""Independent float64 NumPy references for the jxent losses, values and analytic gradients.

Written straight from PyTorch's documented semantics (``cross_entropy``, ``nll_loss``,
``binary_cross_entropy_with_logits``) plus jxent's documented additions (z-loss, ``where``
masks, a mean over nothing being 0, NaN for invalid labels). Nothing here imports jax or
jxent: the tests compare the library against these loops, never against itself.

Every reference returns a :class:`Result` with the reduced value and the gradients of a
scalar objective: the reduced loss itself for ``"sum"``/``"mean"``, and ``Σ_n v_n·loss_n``
for ``"none"`` with cotangent ``v`` (all ones unless given).

Conventions: ``where`` is given to the references already broadcast to the logits' full
shape (the tests build it, so that jxent's own broadcasting rules are under test too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Array = np.ndarray


@dataclass
class Result:
    value: Array
    grads: dict[str, Array] = field(default_factory=dict)
    # Each example's share of the mean's denominator (w_y for counted integer labels, 1 for
    # counted dense rows, else 0), flattened; set by the cross-entropy references.
    weight: Array | None = None


# ----------------------------------------------------------------------------- layout


def canonical_axes(axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


class Rows:
    """Views an array as ``[N, C]`` rows: batch axes flattened first, class axes last.

    A label is a flat (row-major) index into the class axes, as in optax.
    """

    def __init__(self, shape, axis):
        self.shape = tuple(shape)
        self.axes = canonical_axes(axis, len(self.shape))
        self.batch_axes = tuple(i for i in range(len(self.shape)) if i not in self.axes)
        self.batch_shape = tuple(self.shape[i] for i in self.batch_axes)
        self.num_classes = math.prod(self.shape[i] for i in self.axes)
        self.perm = self.batch_axes + self.axes

    def to_rows(self, x) -> Array:
        x = np.broadcast_to(np.asarray(x), self.shape)
        return np.transpose(x, self.perm).reshape(-1, self.num_classes)

    def from_rows(self, r: Array) -> Array:
        moved = [self.shape[i] for i in self.perm]
        return np.transpose(r.reshape(moved), np.argsort(self.perm))

    def batch(self, v: Array) -> Array:
        return v.reshape(self.batch_shape)


def _lse(x: Array, m: Array) -> float:
    """log Σ exp over the unmasked entries of one row (float64, max-shifted)."""
    xs = x[m]
    top = np.max(xs)
    return float(top + np.log(np.sum(np.exp(xs - top))))


def softplus(x) -> Array:
    """log(1 + e^x), exact for every finite float64 x."""
    return np.logaddexp(0.0, np.asarray(x, np.float64))


def sigmoid(x) -> Array:
    x = np.asarray(x, np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def log_softmax(x, axis=-1) -> Array:
    x = np.asarray(x, np.float64)
    top = np.max(x, axis=axis, keepdims=True)
    return x - top - np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True))


def softmax(x, axis=-1) -> Array:
    return np.exp(log_softmax(x, axis))


def _reduce(loss, active_weight, reduction, cotangent):
    """Returns (value, d value / d loss_n, mean's value for the weight term or None)."""
    n = loss.shape[0]
    if reduction == "none":
        g = np.ones(n) if cotangent is None else np.asarray(cotangent, np.float64).reshape(-1)
        return loss, g, None
    if reduction == "sum":
        return np.sum(loss), np.ones(n), None
    total_weight = np.sum(active_weight)
    if total_weight == 0:
        return np.float64(0.0), np.zeros(n), None
    value = np.sum(loss) / total_weight
    return value, np.full(n, 1.0 / total_weight), value / total_weight


# ----------------------------------------------------------------------------- integer labels


def _integer_family(
    logits, labels, *, axis, where, weights, ignore_index, eps, z, reduction, cotangent, nll
):
    rows = Rows(np.shape(logits), axis)
    x = rows.to_rows(np.asarray(logits, np.float64))
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    n_rows, c = x.shape
    m = np.ones_like(x, bool) if where is None else rows.to_rows(np.asarray(where, bool))
    w = np.ones(c) if weights is None else np.asarray(weights, np.float64)

    loss = np.zeros(n_rows)
    weight = np.zeros(n_rows)
    active = np.zeros(n_rows, bool)
    dx = np.zeros((n_rows, c))  # d loss_n / d x_{n,c}
    dw = np.zeros((n_rows, c))  # d loss_n / d w_c
    for n in range(n_rows):
        label = y[n]
        if ignore_index is not None and label == ignore_index:
            continue
        if not m[n].any():
            continue
        if not (0 <= label < c) or not m[n, label]:
            loss[n] = np.nan
            dx[n] = np.nan
            continue
        weight[n] = w[label]
        active[n] = True
        if nll:  # x holds log-probabilities
            loss[n] = -w[label] * x[n, label]
            dx[n, label] = -w[label]
            dw[n, label] = -x[n, label]
            continue
        lse = _lse(x[n], m[n])
        lp = np.where(m[n], x[n] - lse, 0.0)
        p = np.where(m[n], np.exp(np.where(m[n], x[n], -np.inf) - lse), 0.0)
        wm = np.where(m[n], w, 0.0)
        cn = m[n].sum()
        loss[n] = (1 - eps) * (-w[label] * lp[label]) + eps / cn * np.sum(wm * -lp) + z * lse**2
        mass = (1 - eps) * w[label] + eps / cn * wm.sum() + 2 * z * lse
        dx[n] = p * mass - eps / cn * wm
        dx[n, label] -= (1 - eps) * w[label]
        dw[n] = eps / cn * np.where(m[n], -lp, 0.0)
        dw[n, label] += (1 - eps) * -lp[label]

    value, g, mean_over_weight = _reduce(loss, weight, reduction, cotangent)
    grad_x = g[:, None] * dx
    grad_w = np.sum(g[:, None] * dw, axis=0)
    if mean_over_weight is not None:
        # The mean's denominator Σ_n w_{y_n} depends on the weights too.
        np.subtract.at(grad_w, y[active], mean_over_weight)
    if reduction == "none":
        value = rows.batch(value)
    grads = {"logits": rows.from_rows(grad_x)}
    if weights is not None:
        grads["class_weights"] = grad_w
    return Result(np.asarray(value), grads, weight)


def integer_cross_entropy(
    logits,
    labels,
    *,
    axis=-1,
    where=None,
    weights=None,
    ignore_index=None,
    label_smoothing=0.0,
    z_loss=0.0,
    reduction="none",
    cotangent=None,
) -> Result:
    """``torch.nn.functional.cross_entropy`` with class indices, plus z-loss and ``where``.

    Per example (not ignored, row not fully masked, label valid):
    ``loss = (1-ε)·(-w_y·lp_y) + (ε/C)·Σ_c(-w_c·lp_c) + ζ·lse²`` over the unmasked classes,
    weight ``w_y``; ignored and fully masked rows give 0 and weight 0; an out-of-range label
    or one on a masked class gives NaN. ``mean`` = Σ loss / Σ weight, 0 when that is 0.
    """
    return _integer_family(
        logits,
        labels,
        axis=axis,
        where=where,
        weights=weights,
        ignore_index=ignore_index,
        eps=label_smoothing,
        z=z_loss,
        reduction=reduction,
        cotangent=cotangent,
        nll=False,
    )


def nll_loss(
    log_probs,
    labels,
    *,
    axis=-1,
    where=None,
    weights=None,
    ignore_index=None,
    reduction="none",
    cotangent=None,
) -> Result:
    """``torch.nn.functional.nll_loss``: ``loss_n = -w_{y_n}·lp_{n,y_n}``; mean over Σ w_y."""
    result = _integer_family(
        log_probs,
        labels,
        axis=axis,
        where=where,
        weights=weights,
        ignore_index=ignore_index,
        eps=0.0,
        z=0.0,
        reduction=reduction,
        cotangent=cotangent,
        nll=True,
    )
    result.grads["log_probs"] = result.grads.pop("logits")
    return result


# ----------------------------------------------------------------------------- dense labels


def dense_cross_entropy(
    logits,
    targets,
    *,
    axis=-1,
    where=None,
    weights=None,
    label_smoothing=0.0,
    z_loss=0.0,
    reduction="none",
    cotangent=None,
) -> Result:
    """``cross_entropy`` with probability targets, plus z-loss and ``where``.

    ``t' = (1-ε)·t + ε/C`` (C: the row's unmasked classes), ``loss = -Σ_c w_c·t'_c·lp_c
    + ζ·lse²``, a term with ``w_c·t'_c = 0`` contributing 0 even at ``lp = -inf``. ``mean``
    divides by the number of rows that are not fully masked (weights do not enter it).
    """
    eps, z = label_smoothing, z_loss
    rows = Rows(np.shape(logits), axis)
    x = rows.to_rows(np.asarray(logits, np.float64))
    t = rows.to_rows(np.asarray(targets, np.float64))
    n_rows, c = x.shape
    m = np.ones_like(x, bool) if where is None else rows.to_rows(np.asarray(where, bool))
    w = np.ones(c) if weights is None else np.asarray(weights, np.float64)

    loss = np.zeros(n_rows)
    valid = np.zeros(n_rows)
    dx = np.zeros((n_rows, c))
    dt = np.zeros((n_rows, c))
    dw = np.zeros((n_rows, c))
    for n in range(n_rows):
        if not m[n].any():
            continue
        valid[n] = 1.0
        cn = m[n].sum()
        lse = _lse(x[n], m[n])
        with np.errstate(invalid="ignore"):
            neg_lp = np.where(m[n], lse - x[n], 0.0)  # may be +inf at x = -inf
        p = np.where(m[n], np.exp(np.where(m[n], x[n], -np.inf) - lse), 0.0)
        ts = np.where(m[n], (1 - eps) * t[n] + eps / cn, 0.0)
        wt = w * ts
        with np.errstate(invalid="ignore"):
            terms = np.where(wt == 0, 0.0, wt * neg_lp)
            loss[n] = np.sum(terms) + z * lse**2
            dx[n] = p * (np.sum(wt) + 2 * z * lse) - wt
            dt[n] = np.where(m[n], (1 - eps) * w * neg_lp, 0.0)
            dw[n] = np.where(ts == 0, 0.0, ts * neg_lp)

    value, g, _ = _reduce(loss, valid, reduction, cotangent)
    if reduction == "none":
        value = rows.batch(value)
    grads = {
        "logits": rows.from_rows(g[:, None] * dx),
        "labels": rows.from_rows(g[:, None] * dt),
    }
    if weights is not None:
        grads["class_weights"] = np.sum(g[:, None] * dw, axis=0)
    return Result(np.asarray(value), grads, valid)


# ----------------------------------------------------------------------------- binary


def sigmoid_binary_cross_entropy(
    logits, labels, *, pos_weight=None, label_smoothing=0.0, reduction="none", cotangent=None
) -> Result:
    """``binary_cross_entropy_with_logits(x, t', pos_weight=pw)`` with ``t' = (1-ε)t + ε/2``:
    ``loss = pw·t'·softplus(-x) + (1-t')·softplus(x)``; ``mean`` over every element."""
    x = np.asarray(logits, np.float64)
    t = np.asarray(labels, np.float64)
    eps = label_smoothing
    pw = np.ones(()) if pos_weight is None else np.asarray(pos_weight, np.float64)
    pw_full = np.broadcast_to(pw, x.shape)
    ts = (1 - eps) * t + eps / 2
    sp_neg, sp_pos = softplus(-x), softplus(x)
    pos_mass, neg_mass = pw_full * ts, 1 - ts
    loss = np.where(pos_mass == 0, 0.0, pos_mass * sp_neg) + np.where(
        neg_mass == 0, 0.0, neg_mass * sp_pos
    )
    sig = sigmoid(x)
    dx = pos_mass * (sig - 1) + neg_mass * sig
    dt = (1 - eps) * (pw_full * sp_neg - sp_pos)
    dpw = np.where(ts == 0, 0.0, ts * sp_neg)

    flat = loss.reshape(-1)
    value, g, _ = _reduce(flat, np.ones_like(flat), reduction, cotangent)
    if reduction == "none":
        value = loss
    g = g.reshape(x.shape)
    grads = {"logits": g * dx, "labels": g * dt}
    if pos_weight is not None:
        # Sum the broadcast gradient back to pos_weight's own shape.
        full = g * dpw
        extra = full.ndim - pw.ndim
        full = full.sum(axis=tuple(range(extra)))
        keep = tuple(i for i, d in enumerate(pw.shape) if d == 1)
        grads["pos_weight"] = full.sum(axis=keep, keepdims=True) if keep else full
    return Result(np.asarray(value), grads)


# ----------------------------------------------------------------------------- KL


def kl_divergence(log_predictions, targets, *, axis=-1, where=None, cotangent=None) -> Result:
    """``Σ_c t_c·(log t_c - lp_c)`` with ``0·log 0 = 0``; masked entries take no part.

    Gradients: ``d/d lp = -t``; ``d/d t = log t + 1 - lp`` for ``t > 0`` and ``-lp`` at
    ``t = 0`` (the ``0·log 0`` branch held constant, as optax's ``where``).
    """
    rows = Rows(np.shape(log_predictions), axis)
    lp = rows.to_rows(np.asarray(log_predictions, np.float64))
    t = rows.to_rows(np.asarray(targets, np.float64))
    m = np.ones_like(lp, bool) if where is None else rows.to_rows(np.asarray(where, bool))
    with np.errstate(divide="ignore", invalid="ignore"):
        log_t = np.where(t == 0, 0.0, np.log(np.where(t == 0, 1.0, t)))
        terms = np.where(m & (t != 0), t * (log_t - lp), 0.0)
        dt = np.where(m, np.where(t == 0, 0.0, log_t + 1.0) - lp, 0.0)
    loss = terms.sum(axis=1)
    g = np.ones(loss.shape) if cotangent is None else np.asarray(cotangent, np.float64).ravel()
    grads = {
        "log_predictions": rows.from_rows(g[:, None] * np.where(m, -t, 0.0)),
        "targets": rows.from_rows(g[:, None] * dt),
    }
    return Result(rows.batch(loss), grads)


def kl_divergence_with_log_targets(
    log_predictions, log_targets, *, axis=-1, where=None, cotangent=None
) -> Result:
    """``Σ_c exp(lt_c)·(lt_c - lp_c)``; an entry at ``lt = -inf`` contributes 0 to value and
    gradient. ``d/d lp = -e^{lt}``, ``d/d lt = e^{lt}·(lt - lp + 1)``."""
    rows = Rows(np.shape(log_predictions), axis)
    lp = rows.to_rows(np.asarray(log_predictions, np.float64))
    lt = rows.to_rows(np.asarray(log_targets, np.float64))
    m = np.ones_like(lp, bool) if where is None else rows.to_rows(np.asarray(where, bool))
    live = m & ~np.isneginf(lt)
    t = np.exp(lt)
    with np.errstate(invalid="ignore"):
        loss = np.where(live, t * (lt - lp), 0.0).sum(axis=1)
        dlt = np.where(live, t * (lt - lp + 1.0), 0.0)
    g = np.ones(loss.shape) if cotangent is None else np.asarray(cotangent, np.float64).ravel()
    grads = {
        "log_predictions": rows.from_rows(g[:, None] * np.where(m, -t, 0.0)),
        "log_targets": rows.from_rows(g[:, None] * dlt),
    }
    return Result(rows.batch(loss), grads)


# ----------------------------------------------------------------------------- extras


def token_weighted_reduction(
    loss, mean_weight, *, token_weights=None, normalizer=None, reduction="none", cotangent=None
):
    """``Σ_n t_n·ℓ_n`` (``sum``), divided by ``Σ_n t_n·m_n`` or by ``normalizer`` (``mean``;
    0 over a zero denominator), or ``t_n·ℓ_n`` (``none``) with per-example token weights
    ``t`` (1 by default) and mean weights ``m`` (flat arrays).

    Returns ``(value, dv/dℓ, dv/dm, dv/dt, dv/dnormalizer)``; for ``none`` the derivatives
    are those of ``Σ_n v_n·t_n·ℓ_n`` with cotangent ``v`` (all ones unless given).
    """
    loss = np.asarray(loss, np.float64).reshape(-1)
    m = np.asarray(mean_weight, np.float64).reshape(-1)
    n = loss.shape[0]
    t = np.ones(n) if token_weights is None else np.asarray(token_weights, np.float64).reshape(-1)
    zero = np.zeros(n)
    if reduction == "none":
        v = np.ones(n) if cotangent is None else np.asarray(cotangent, np.float64).reshape(-1)
        return t * loss, v * t, zero, v * loss, 0.0
    total = np.sum(t * loss)
    if reduction == "sum":
        return total, t, zero, loss, 0.0
    if normalizer is not None:
        d = float(normalizer)
        if d == 0:
            return np.float64(0.0), zero, zero, zero, 0.0
        return total / d, t / d, zero, loss / d, -total / d**2
    d = np.sum(t * m)
    if d == 0:
        return np.float64(0.0), zero, zero, zero, 0.0
    value = total / d
    return value, t / d, -value / d * t, loss / d - value / d * m, 0.0


def cross_entropy_extras(
    logits,
    labels,
    *,
    dense=False,
    token_weights=None,
    normalizer=None,
    temperature=1.0,
    reduction="none",
    cotangent=None,
    **options,
) -> Result:
    """The integer (or ``dense``) cross-entropy of ``logits / T`` with per-example token
    weights and an explicit mean denominator (see :func:`token_weighted_reduction`).

    Gradients: ``logits`` (carrying ``1/T``), ``class_weights`` (including the mean's
    denominator ``Σ t_n·w_{y_n}``), ``token_weights``, ``normalizer``, ``labels`` (dense).
    """
    base = dense_cross_entropy if dense else integer_cross_entropy
    x = np.asarray(logits, np.float64) / temperature
    per_example = base(x, labels, **options)
    value, d_loss, d_mean_weight, d_tokens, d_norm = token_weighted_reduction(
        per_example.value,
        per_example.weight,
        token_weights=token_weights,
        normalizer=normalizer,
        reduction=reduction,
        cotangent=cotangent,
    )
    chained = base(x, labels, cotangent=d_loss, **options).grads
    grads = {"logits": chained["logits"] / temperature}
    if "labels" in chained:
        grads["labels"] = chained["labels"]
    if "class_weights" in chained:
        grads["class_weights"] = chained["class_weights"]
        if not dense:  # the mean weight of a counted example is w_y
            counted = per_example.weight != 0
            y = np.asarray(labels).astype(np.int64).reshape(-1)
            np.add.at(grads["class_weights"], y[counted], d_mean_weight[counted])
    if token_weights is not None:
        grads["token_weights"] = d_tokens.reshape(np.shape(token_weights))
    if normalizer is not None:
        grads["normalizer"] = np.float64(d_norm)
    shape = np.shape(per_example.value)
    value = np.asarray(value).reshape(shape if reduction == "none" else ())
    return Result(value, grads, per_example.weight)


def first_argmax(values, mask) -> int:
    """The first index of the largest unmasked value (0 for a row with none)."""
    if not mask.any():
        return 0
    return int(np.argmax(np.where(mask, values, -np.inf)))


def row_statistics(logits, *, axis=-1, where=None, temperature=1.0) -> dict[str, Array]:
    """Per row of ``z = logits / T`` over its unmasked classes: ``lse`` (``-inf`` for an
    empty row), the entropy ``H = -Σ_c p_c log p_c`` (0 for an empty row), ``argmax``
    (first maximum), and the gradients of their row sums with respect to the logits:
    ``d lse / dx = p / T`` and ``d H / dx = -p·(log p + H) / T``."""
    rows = Rows(np.shape(logits), axis)
    z = rows.to_rows(np.asarray(logits, np.float64)) / temperature
    m = np.ones_like(z, bool) if where is None else rows.to_rows(np.asarray(where, bool))
    n_rows = z.shape[0]
    lse, entropy = np.full(n_rows, -np.inf), np.zeros(n_rows)
    argmax = np.zeros(n_rows, np.int64)
    grad_lse, grad_entropy = np.zeros_like(z), np.zeros_like(z)
    for n in range(n_rows):
        argmax[n] = first_argmax(z[n], m[n])
        if not m[n].any():
            continue
        lse[n] = _lse(z[n], m[n])
        log_p = np.where(m[n], z[n] - lse[n], 0.0)
        p = np.where(m[n], np.exp(log_p), 0.0)
        entropy[n] = -np.sum(p * log_p)
        grad_lse[n] = p / temperature
        grad_entropy[n] = -p * (log_p + entropy[n]) / temperature
    return {
        "lse": rows.batch(lse),
        "entropy": rows.batch(entropy),
        "argmax": rows.batch(argmax),
        "grad_lse": rows.from_rows(grad_lse),
        "grad_entropy": rows.from_rows(grad_entropy),
    }
