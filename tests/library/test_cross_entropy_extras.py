"""The cross-entropy losses' extra options (issue 18): per-example ``weights``, an explicit
``normalizer``, ``temperature`` and ``return_aux`` (:class:`jxent.CrossEntropyAux`).

Values and gradients are compared with the float64 NumPy formulas of ``reference.py``
(:func:`reference.cross_entropy_extras`, :func:`reference.row_statistics`), and with the
documented semantics of Liger-Kernel (token accuracy over non-ignored tokens, the z-loss
returned separately) and T5X (``cross_entropy_with_logits`` returns ``(loss, z_loss)``,
``z_loss = ζ·lse²``; ``loss_normalizing_factor``), written here as formulas.
"""

from __future__ import annotations

import functools
import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from platforms import simulated

import jxent
from jxent import _reductions

pytestmark = pytest.mark.numerics

IGNORE = -100
INT_CE = jxent.softmax_cross_entropy_with_integer_labels
TOL = {"rtol": 2e-5, "atol": 2e-6}

# Option sets: name -> (shape, axis, keyword flags)
OPTIONS = {
    "plain": ((5, 7), -1, {}),
    "class_weights": ((5, 7), -1, {"class_weights": True}),
    "ignore": ((6, 7), -1, {"ignore": True}),
    "smoothing": ((5, 7), -1, {"smoothing": 0.1}),
    "z_loss": ((5, 7), -1, {"z_loss": 1e-2}),
    "where": ((5, 7), -1, {"where": True}),
    "tuple_axes": ((3, 4, 5), (1, 2), {"class_weights": True, "ignore": True}),
    "everything": (
        (6, 7),
        -1,
        {"class_weights": True, "ignore": True, "smoothing": 0.2, "z_loss": 1e-3, "where": True},
    ),
}


class Case:
    """Random logits (float32, with their exact float64 values), labels, masks, class
    weights and token weights for one option set."""

    def __init__(self, name, dense=False, seed=0):
        shape, axis, flags = OPTIONS[name]
        rng = np.random.default_rng(seed)
        rows = ref.Rows(shape, axis)
        n, c = int(np.prod(rows.batch_shape)), rows.num_classes
        self.rows, self.axis, self.dense = rows, axis, dense
        self.logits = jnp.asarray(2.0 * rng.normal(size=shape), jnp.float32)
        self.logits64 = np.asarray(self.logits, np.float64)
        labels = rng.integers(0, c, size=n)
        mask = None
        if flags.get("where"):
            mask = rng.random((n, c)) < 0.6
            mask[np.arange(n), labels] = True
            mask[-1] = False  # one row masked out entirely
        if flags.get("ignore"):
            labels[::3] = IGNORE
        self.where = None if mask is None else rows.from_rows(mask)
        self.labels = labels.reshape(rows.batch_shape)
        self.class_weights = (
            rng.uniform(0.2, 2.0, size=c).astype(np.float32) if flags.get("class_weights") else None
        )
        self.ignore_index = IGNORE if flags.get("ignore") else None
        self.smoothing = flags.get("smoothing", 0.0)
        self.z_loss = flags.get("z_loss", 0.0)
        self.token_weights = rng.uniform(0.0, 2.0, size=rows.batch_shape).astype(np.float32)
        self.cotangent = rng.uniform(0.5, 1.5, size=rows.batch_shape)
        if dense:
            self.targets = rows.from_rows(ref.softmax(rng.normal(size=(n, c)) * 2))
            self.targets = np.asarray(jnp.asarray(self.targets, jnp.float32), np.float64)

    def options(self):
        out = {"label_smoothing": self.smoothing, "z_loss": self.z_loss}
        if not self.dense:
            out["ignore_index"] = self.ignore_index
        return out

    def call(self, logits, class_weights, token_weights, normalizer=None, **kw):
        fn = jxent.softmax_cross_entropy if self.dense else INT_CE
        labels = jnp.asarray(self.targets, jnp.float32) if self.dense else self.labels
        return fn(
            logits,
            labels,
            self.axis,
            self.where,
            class_weights=class_weights,
            weights=token_weights,
            normalizer=normalizer,
            **self.options(),
            **kw,
        )

    def reference(self, **kw):
        labels = self.targets if self.dense else self.labels
        return ref.cross_entropy_extras(
            self.logits64,
            labels,
            dense=self.dense,
            axis=self.axis,
            where=self.where,
            weights=None if self.class_weights is None else self.class_weights.astype(np.float64),
            **self.options(),
            **kw,
        )

    def stats(self, temperature=1.0):
        return ref.row_statistics(
            self.logits64, axis=self.axis, where=self.where, temperature=temperature
        )

    def counted(self):
        """Examples that count: not ignored, row not masked out, (dense: row not masked)."""
        flat = np.ones(self.rows.batch_shape, bool)
        if self.where is not None:
            flat &= self.rows.batch(self.rows.to_rows(self.where).any(axis=1))
        if not self.dense and self.ignore_index is not None:
            flat &= self.labels != self.ignore_index
        return flat

    def target_ids(self):
        if not self.dense:
            return self.labels
        t, m = self.rows.to_rows(self.targets), self.rows.to_rows(self.mask_full())
        return self.rows.batch(np.array([ref.first_argmax(t[n], m[n]) for n in range(len(t))]))

    def mask_full(self):
        shape = self.rows.shape
        return np.ones(shape, bool) if self.where is None else np.broadcast_to(self.where, shape)


def close(actual, expected, **tol):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, **{**TOL, **tol})


def assert_trees_close(got, want):
    """Floating leaves within float32 rounding, integer and boolean ones equal."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if jnp.issubdtype(b.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- weights etc.


@pytest.mark.parametrize("dense", [False, True], ids=["integer", "dense"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("name", OPTIONS)
def test_weights_and_temperature_match_reference(name, reduction, dense):
    """Values and gradients (logits, class weights, token weights) of the loss of
    ``logits / T`` times per-example weights; the mean divides by ``Σ t_n·w_{y_n}``."""
    case = Case(name, dense)
    temperature = 1.7

    def objective(logits, class_weights, token_weights):
        loss = case.call(
            logits, class_weights, token_weights, reduction=reduction, temperature=temperature
        )
        return jnp.sum(loss * case.cotangent) if reduction == "none" else loss

    argnums = (0, 2) if case.class_weights is None else (0, 1, 2)
    value, grads = jax.jit(jax.value_and_grad(objective, argnums))(
        case.logits, case.class_weights, case.token_weights
    )
    want = case.reference(
        token_weights=case.token_weights.astype(np.float64),
        temperature=temperature,
        reduction=reduction,
        cotangent=case.cotangent,
    )
    expected = np.sum(want.value * case.cotangent) if reduction == "none" else want.value
    close(value, expected)
    close(grads[0], want.grads["logits"])
    close(grads[-1], want.grads["token_weights"])
    if case.class_weights is not None:
        close(grads[1], want.grads["class_weights"])


@pytest.mark.parametrize("dense", [False, True], ids=["integer", "dense"])
def test_normalizer_replaces_the_mean_denominator(dense):
    """``reduction="mean", normalizer=N`` is ``Σ t_n·ℓ_n / N`` (T5X's
    ``loss_normalizing_factor``); N gets its gradient ``-Σ t·ℓ / N²``; N = 0 gives 0."""
    case = Case("everything", dense)

    def loss(logits, class_weights, token_weights, normalizer):
        return case.call(logits, class_weights, token_weights, normalizer, reduction="mean")

    args = (case.logits, case.class_weights, case.token_weights, jnp.float32(7.5))
    value, grads = jax.value_and_grad(loss, (0, 1, 2, 3))(*args)
    want = case.reference(
        token_weights=case.token_weights.astype(np.float64), normalizer=7.5, reduction="mean"
    )
    close(value, want.value)
    for got, key in zip(
        grads, ("logits", "class_weights", "token_weights", "normalizer"), strict=True
    ):
        close(got, want.grads[key])
    # T5X: loss = Σ(weights · per-token loss) / loss_normalizing_factor
    per_token = case.call(case.logits, case.class_weights, None, reduction="none")
    close(value, np.sum(case.token_weights * np.asarray(per_token, np.float64)) / 7.5)
    assert float(loss(*args[:3], jnp.float32(0.0))) == 0.0
    assert loss(*args[:3], 12).dtype == jnp.float32  # an integer token count works


def test_weights_compose_with_ignore_index_where_and_class_weights():
    """The mean's denominator is ``Σ_n t_n·w_{y_n}`` over counted examples only: an
    ignored example or masked row adds nothing whatever its token weight."""
    case = Case("everything")
    got = case.call(case.logits, case.class_weights, case.token_weights, reduction="mean")
    per = np.asarray(case.call(case.logits, case.class_weights, None, reduction="none"))
    labels = np.where(case.counted(), case.labels, 0)
    denominator = np.sum(case.token_weights * case.class_weights[labels] * case.counted())
    close(got, np.sum(case.token_weights * per) / denominator)


def test_scalar_and_broadcast_weights():
    """``weights`` broadcast to the labels' shape: a scalar scales every example (the mean
    is unchanged), a ``[T]`` vector weights the positions of ``[B, T]`` labels."""
    x = jax.random.normal(jax.random.key(1), (3, 4, 6))
    y = jax.random.randint(jax.random.key(2), (3, 4), 0, 6)
    plain = jxent.cross_entropy(x, y)
    close(jxent.cross_entropy(x, y, weights=2.0), plain)
    close(jxent.cross_entropy(x, y, weights=2.0, reduction="sum"), 2 * plain * 12)
    per_position = jnp.array([1.0, 0.0, 2.0, 1.0])
    per = np.asarray(jxent.cross_entropy(x, y, reduction="none"), np.float64)
    want = np.sum(per * np.asarray(per_position)) / (3 * 4.0)
    close(jxent.cross_entropy(x, y, weights=per_position), want)
    bools = jxent.cross_entropy(x, y, weights=per_position > 0)
    close(bools, np.sum(per * (np.asarray(per_position) > 0)) / 9.0)


def test_temperature_one_is_the_plain_loss_and_scales_like_dividing_the_logits():
    case = Case("everything")
    plain = case.call(case.logits, case.class_weights, None, reduction="mean")
    close(case.call(case.logits, case.class_weights, None, reduction="mean", temperature=1), plain)
    scaled = case.call(case.logits * 0.25, case.class_weights, None, reduction="mean")
    got = case.call(case.logits, case.class_weights, None, reduction="mean", temperature=4.0)
    close(got, scaled, rtol=1e-6)


def test_bfloat16_logits_with_temperature():
    """bf16 logits: float32 loss of ``x / T`` and a bf16 gradient carrying ``1 / T``."""
    x = (jax.random.normal(jax.random.key(3), (6, 50)) * 3).astype(jnp.bfloat16)
    y = jnp.arange(6) * 7
    value, grad = jax.value_and_grad(lambda x: jxent.cross_entropy(x, y, temperature=2.5))(x)
    want = ref.cross_entropy_extras(
        np.asarray(x.astype(jnp.float32), np.float64), y, temperature=2.5, reduction="mean"
    )
    assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    close(value, want.value, rtol=1e-6)
    close(grad.astype(jnp.float32), want.grads["logits"], rtol=2e-2, atol=1e-3)


# ----------------------------------------------------------------------------- aux outputs


@pytest.mark.parametrize("dense", [False, True], ids=["integer", "dense"])
@pytest.mark.parametrize("name", ["plain", "ignore", "where", "tuple_axes", "everything"])
def test_aux_values_match_reference(name, dense):
    case = Case(name, dense)
    temperature = 0.8
    loss, aux = case.call(
        case.logits,
        case.class_weights,
        case.token_weights,
        reduction="mean",
        temperature=temperature,
        return_aux=True,
    )
    assert isinstance(aux, jxent.CrossEntropyAux)
    stats = case.stats(temperature)
    counted = case.counted()
    close(aux.lse, stats["lse"])
    close(aux.entropy, stats["entropy"])
    assert aux.argmax.dtype == jnp.int32 and aux.counted.dtype == jnp.bool_
    np.testing.assert_array_equal(aux.argmax, stats["argmax"])
    np.testing.assert_array_equal(aux.counted, counted)
    np.testing.assert_array_equal(aux.correct, (stats["argmax"] == case.target_ids()) & counted)
    close(aux.accuracy, np.sum(aux.correct) / max(np.sum(counted), 1))
    # z_loss: ζ·lse² on counted examples, times the token weights, reduced like the loss
    want = case.reference(
        token_weights=case.token_weights.astype(np.float64),
        temperature=temperature,
        reduction="mean",
    )
    close(loss, want.value)
    lse = np.where(counted, stats["lse"], 0.0)
    per_example = case.z_loss * lse**2
    mean_weight = case.reference(temperature=temperature).weight
    z, *_ = ref.token_weighted_reduction(
        per_example, mean_weight, token_weights=case.token_weights, reduction="mean"
    )
    close(aux.z_loss, z, atol=1e-7)


@pytest.mark.parametrize("dense", [False, True], ids=["integer", "dense"])
@pytest.mark.parametrize("name", ["ignore", "where", "tuple_axes", "everything"])
def test_aux_gradients_match_reference(name, dense):
    """jax.grad of ``aux.lse.sum()`` is ``p / T``, of ``aux.entropy.sum()`` is
    ``-p·(log p + H) / T``, of ``aux.z_loss`` that term's share of the loss's gradient; the
    loss's own gradient is unchanged by ``return_aux``."""
    case = Case(name, dense)
    temperature = 1.3

    def outputs(logits):
        return case.call(
            logits,
            case.class_weights,
            case.token_weights,
            reduction="mean",
            temperature=temperature,
            return_aux=True,
        )

    stats = case.stats(temperature)
    counted = case.counted()
    finite = np.isfinite(stats["lse"])
    close(
        jax.grad(lambda x: jnp.sum(jnp.where(finite, outputs(x)[1].lse, 0)))(case.logits),
        stats["grad_lse"],
    )
    close(jax.grad(lambda x: outputs(x)[1].entropy.sum())(case.logits), stats["grad_entropy"])
    mean_weight = case.reference(temperature=temperature).weight
    _, d_z, *_ = ref.token_weighted_reduction(
        np.zeros(counted.size), mean_weight, token_weights=case.token_weights, reduction="mean"
    )
    lse = np.where(counted, stats["lse"], 0.0).reshape(-1)
    rows = case.rows
    want_z = rows.from_rows(
        (2 * case.z_loss * lse * d_z)[:, None] * rows.to_rows(stats["grad_lse"])
    )
    close(jax.grad(lambda x: outputs(x)[1].z_loss)(case.logits), want_z, atol=1e-7)
    plain = jax.grad(
        lambda x: case.call(
            x, case.class_weights, case.token_weights, reduction="mean", temperature=temperature
        )
    )(case.logits)
    np.testing.assert_array_equal(jax.grad(lambda x: outputs(x)[0])(case.logits), plain)


def test_loss_minus_z_loss_is_the_cross_entropy_alone():
    case = Case("everything")
    for reduction in ("none", "sum", "mean"):
        loss, aux = case.call(
            case.logits,
            case.class_weights,
            case.token_weights,
            reduction=reduction,
            return_aux=True,
        )
        case.z_loss, saved = 0.0, case.z_loss
        alone = case.call(case.logits, case.class_weights, case.token_weights, reduction=reduction)
        case.z_loss = saved
        close(np.asarray(loss) - np.asarray(aux.z_loss), alone, atol=1e-6)


def test_liger_token_accuracy_and_separate_z_loss():
    """Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss(return_z_loss=True,
    return_token_accuracy=True)``: the loss includes ``ζ·lse²`` (mean over non-ignored
    tokens), the z-loss comes back separately, and the token accuracy is
    ``Σ [argmax = y, y ≠ ignore] / Σ [y ≠ ignore]``."""
    case = Case("ignore")
    x, y = case.logits64, case.labels
    loss, aux = INT_CE(
        case.logits, y, ignore_index=IGNORE, z_loss=1e-2, reduction="mean", return_aux=True
    )
    keep = y != IGNORE
    lse = np.log(np.sum(np.exp(x), -1))
    nll = lse - np.take_along_axis(x, np.where(keep, y, 0)[:, None], -1)[:, 0]
    close(loss, np.sum(np.where(keep, nll + 1e-2 * lse**2, 0)) / keep.sum())
    close(aux.z_loss, np.sum(np.where(keep, 1e-2 * lse**2, 0)) / keep.sum())
    close(aux.accuracy, np.sum((np.argmax(x, -1) == y) & keep) / keep.sum())


def test_t5x_cross_entropy_with_logits():
    """T5X's ``cross_entropy_with_logits(logits, targets, z_loss)`` returns ``(loss,
    z_loss)`` per token: ``loss = -Σ t·log_softmax(x) + ζ·lse²`` and ``z_loss = ζ·lse²``;
    the dense loss with ``reduction="none"`` gives both."""
    case = Case("plain", dense=True)
    x, t = case.logits64, case.targets
    lse = np.log(np.sum(np.exp(x), -1))
    loss, aux = jxent.softmax_cross_entropy(
        case.logits, jnp.asarray(t, jnp.float32), z_loss=1e-4, return_aux=True
    )
    close(loss, -np.sum(t * (x - lse[:, None]), -1) + 1e-4 * lse**2)
    close(aux.z_loss, 1e-4 * lse**2)


def test_empty_batch():
    x, y = jnp.zeros((0, 5)), jnp.zeros((0,), jnp.int32)
    for reduction in ("sum", "mean"):
        loss, aux = jxent.cross_entropy(
            x, y, reduction=reduction, weights=jnp.zeros(0), return_aux=True
        )
        assert float(loss) == 0.0 and float(aux.z_loss) == 0.0
        assert aux.lse.shape == aux.argmax.shape == aux.correct.shape == (0,)
        assert float(aux.accuracy) == 0.0
    grad = jax.grad(lambda x: jxent.cross_entropy(x, y, return_aux=True)[1].entropy.sum())(x)
    assert grad.shape == (0, 5)


def test_float64_under_x64():
    with jax.enable_x64(True):
        case = Case("everything")
        x = jnp.asarray(case.logits64)
        loss, aux = INT_CE(
            x,
            case.labels,
            where=case.where,
            ignore_index=IGNORE,
            z_loss=1e-3,
            weights=jnp.asarray(case.token_weights, jnp.float64),
            temperature=0.7,
            reduction="mean",
            return_aux=True,
        )
        assert loss.dtype == aux.lse.dtype == aux.entropy.dtype == jnp.float64
        assert aux.argmax.dtype == jnp.int32
        stats = ref.row_statistics(case.logits64, where=case.where, temperature=0.7)
        np.testing.assert_allclose(aux.entropy, stats["entropy"], rtol=1e-12, atol=1e-13)
        grad = jax.grad(
            lambda x: INT_CE(
                x,
                case.labels,
                where=case.where,
                ignore_index=IGNORE,
                temperature=0.7,
                return_aux=True,
            )[1].entropy.sum()
        )(x)
        np.testing.assert_allclose(grad, stats["grad_entropy"], rtol=1e-10, atol=1e-13)


def test_debug_nans_with_masked_rows_ignored_labels_and_aux():
    """No NaN is made on valid input: a row masked out entirely (lse = -inf), ignored
    labels, -inf logits, every aux output and its gradient."""
    case = Case("everything")
    x = case.logits.at[0, 2].set(-jnp.inf)
    if case.where is not None:
        assert not np.asarray(case.where)[-1].any()

    def total(x, w):
        loss, aux = case.call(
            x, case.class_weights, w, reduction="mean", temperature=0.5, return_aux=True
        )
        finite_lse = jnp.where(aux.counted, aux.lse, 0.0)
        return loss + aux.z_loss + aux.entropy.sum() + finite_lse.sum() + aux.accuracy

    with jax.debug_nans(True):
        value, grads = jax.value_and_grad(total, (0, 1))(x, case.token_weights)
        dense = jax.grad(
            lambda x: jxent.softmax_cross_entropy(
                x, jax.nn.softmax(x), where=case.where, return_aux=True
            )[1].entropy.sum()
        )(x)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in (*grads, dense))


@pytest.mark.parametrize("platform", [None, "cuda"], ids=str)
def test_second_derivatives_of_the_aux_outputs(platform):
    """The backward rules are differentiable: ``jax.hessian`` of the entropy and of the lse
    (through the online reduction's ``custom_jvp`` on the GPU path) equals autodiff of
    their ``jax.nn`` formulas."""
    x = jax.random.normal(jax.random.key(8), (2, 5))
    y = jnp.array([1, 4])

    def aux(x):
        return INT_CE(x, y, temperature=1.5, return_aux=True, reduction="mean")[1]

    def entropy_ref(x):
        log_p = jax.nn.log_softmax(x / 1.5)
        return -jnp.sum(jnp.exp(log_p) * log_p)

    with simulated(platform):
        got = jax.hessian(lambda x: aux(x).entropy.sum())(x)
        got_lse = jax.hessian(lambda x: aux(x).lse.sum())(x)
    close(got, jax.hessian(entropy_ref)(x), atol=1e-6)
    close(got_lse, jax.hessian(lambda x: jax.nn.logsumexp(x / 1.5, -1).sum())(x), atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    hnp.arrays(np.float32, (3, 6), elements=st.floats(-20, 20, width=32, allow_subnormal=False)),
    st.sampled_from([0.25, 1.0, 4.0]),
)
def test_entropy_and_argmax_properties(x, temperature):
    """``0 ≤ H ≤ log C``; ``argmax`` is ``jnp.argmax`` (the first of equal maxima) and,
    for these temperatures whose scaling is exact, unchanged by the temperature; ``lse ≥
    max x / T``. (Few temperatures: each is another compiled program.)"""
    y = jnp.zeros(3, jnp.int32)
    _, aux = INT_CE(x, y, temperature=temperature, return_aux=True)
    assert np.all(aux.entropy >= -1e-5) and np.all(aux.entropy <= np.log(6) + 1e-5)
    np.testing.assert_array_equal(aux.argmax, jnp.argmax(x, -1))
    assert np.all(aux.lse >= x.max(-1) / np.float32(temperature) - 1e-5)


# ----------------------------------------------------------------------------- API


def test_cross_entropy_forwards_the_new_keywords():
    case = Case("plain")
    args = dict(weights=case.token_weights, temperature=2.0, normalizer=3.0, return_aux=True)
    for labels, fn in ((case.labels, INT_CE), (jax.nn.softmax(case.logits), None)):
        got_loss, got_aux = jxent.cross_entropy(case.logits, labels, **args)
        fn = fn or jxent.softmax_cross_entropy
        want_loss, want_aux = fn(case.logits, labels, reduction="mean", **args)
        np.testing.assert_array_equal(got_loss, want_loss)
        np.testing.assert_array_equal(got_aux.entropy, want_aux.entropy)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weights": jnp.ones(4)}, ValueError, r"weights .* shape \(4,\) .* labels' shape \(5,\)"),
        ({"normalizer": 3.0, "reduction": "sum"}, ValueError, r"normalizer .*reduction='sum'"),
        (
            {"normalizer": jnp.ones(2), "reduction": "mean"},
            ValueError,
            r"normalizer must be a scalar, .*\(2,\)",
        ),
        ({"temperature": 0.0}, ValueError, r"temperature must be a finite float > 0, got 0.0"),
        ({"temperature": -1.0}, ValueError, r"temperature must be a finite float > 0"),
        ({"temperature": jnp.float32(2.0)}, TypeError, r"temperature must be a static"),
        ({"return_aux": jnp.array(True)}, TypeError, r"return_aux must be a static"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    x, y = jnp.zeros((5, 3)), jnp.zeros(5, jnp.int32)
    with pytest.raises(error, match=match):
        INT_CE(x, y, **kwargs)
    if "normalizer" in kwargs or "weights" in kwargs:
        with pytest.raises(error, match=match):
            jxent.softmax_cross_entropy(x, jnp.ones((5, 3)) / 3, **kwargs)


def _reduce_count(fn, *args):
    jax.clear_caches()  # see simulated()
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.reduce")


# platform -> loss -> reductions in the lowered loss, in its gradient, and in the loss with
# return_aux=True. Without aux: those of the code before the options existed (the class max
# and sum of exponentials, or GPU/TPU's one online reduction; the mean's two sums; the dense
# loss's target mass). With aux: on the CPU the entropy's class sum and the argmax's class
# max, on GPU/TPU nothing (both come from the online reduction); the dense loss's max and
# first max of the targets; the z-loss field's mean (its sum and denominator).
REDUCTIONS = {
    None: {"integer": (5, 5, 5 + 2 + 2), "dense": (5, 6, 5 + 2 + 2 + 2)},
    "cuda": {"integer": (3, 3, 3 + 0 + 2), "dense": (4, 5, 4 + 0 + 2 + 2)},
    "tpu": {"integer": (3, 3, 3 + 0 + 2), "dense": (4, 5, 4 + 0 + 2 + 2)},
}


@pytest.mark.parametrize("platform", REDUCTIONS, ids=str)
def test_without_aux_nothing_extra_is_computed(platform):
    """The programs without the new options have the reductions they had before the
    options existed, and ``return_aux=True`` adds only those listed in REDUCTIONS; the
    defaults of the new options lower to the same program as not passing them."""
    x, y = jnp.ones((8, 16)), jnp.arange(8)
    t = jax.nn.softmax(x)

    def integer(x, **kw):
        return INT_CE(x, y, reduction="mean", **kw)

    def dense(x, **kw):
        return jxent.softmax_cross_entropy(x, t, reduction="mean", **kw)

    with simulated(platform):
        for fn in (integer, dense):
            counts = (
                _reduce_count(fn, x),
                _reduce_count(jax.grad(fn), x),
                _reduce_count(functools.partial(fn, return_aux=True), x),
            )
            assert counts == REDUCTIONS[platform][fn.__name__]
            defaults = {"weights": None, "normalizer": None, "temperature": 1.0}
            explicit = jax.jit(functools.partial(fn, return_aux=False, **defaults))
            explicit = explicit.lower(x).as_text()
            plain = jax.jit(fn).lower(x).as_text()
            assert re.sub(r"@\w+", "", explicit) == re.sub(r"@\w+", "", plain)


@pytest.mark.parametrize("dense", [False, True], ids=["integer", "dense"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_paths(platform, dense):
    """The GPU / TPU code paths (one online reduction gives the normaliser, the target logit,
    the entropy and the argmax) agree with the CPU's, run on the CPU."""
    case = Case("everything", dense)

    def run(x, w):
        def total(x, w):
            loss, aux = case.call(
                x, case.class_weights, w, reduction="mean", temperature=0.6, return_aux=True
            )
            return loss + aux.entropy.sum() + aux.z_loss, aux

        return jax.value_and_grad(total, (0, 1), has_aux=True)(x, w)

    with simulated(None):
        want = run(case.logits, case.token_weights)
    with simulated(platform):
        got = run(case.logits, case.token_weights)
    assert_trees_close(got, want)


@pytest.mark.parametrize("platform", [None, "cuda", "tpu"], ids=str)
def test_long_rows(platform):
    """Rows long enough to be reduced in blocks (C = 40000: on the CPU 5 x 8000, on GPU
    3 x 13334 padded inside the online reduction) give the same aux outputs."""
    x = jax.random.normal(jax.random.key(4), (2, 40000)) * 3
    x = x.at[1, 39000].set(20.0).at[0, 30000].set(15.0).at[0, 20000].set(15.0)
    y = jnp.array([5, 39000])
    with simulated(platform):
        _, aux = INT_CE(x, y, return_aux=True, temperature=2.0)
    stats = ref.row_statistics(np.asarray(x, np.float64), temperature=2.0)
    np.testing.assert_array_equal(aux.argmax, [20000, 39000])
    np.testing.assert_array_equal(aux.argmax, stats["argmax"])
    np.testing.assert_array_equal(aux.correct, [False, True])
    close(aux.entropy, stats["entropy"], rtol=1e-4)


def _edge_rows(num_classes, seed=0):
    """Random logits with rows that test the first argmax found through the chunk maxima:
    ties within and across chunks, all equal, +inf twice, the largest float beside +inf,
    NaN, all -inf, only -inf and the lowest float, half -inf."""
    x = np.random.default_rng(seed).normal(size=(16, num_classes)).astype(np.float32) * 3
    c, big = num_classes, np.finfo(np.float32).max
    x[0] = 0.0
    x[1, [c - 7, 3 * c // 4, c // 3, 5]] = 20.0
    x[2, [3, c // 2]] = np.inf
    x[3, [1, 2]], x[3, 4] = big, np.inf
    x[4, c // 2] = np.nan
    x[5] = -np.inf
    x[6], x[6, c - 1] = -np.inf, -big
    x[7, : c // 2] = -np.inf
    x[8] = np.round(x[8])  # many equal integers
    x[9, [0, c - 1]] = 30.0
    return jnp.asarray(x)


@pytest.mark.parametrize("masked", [False, True], ids=["all", "where"])
@pytest.mark.parametrize("dense", [False, True], ids=["integer", "dense"])
@pytest.mark.parametrize("num_classes", [200, 40000])
def test_argmax_from_chunk_maxima_equals_one_pass(num_classes, dense, masked, monkeypatch):
    """On the CPU the argmax comes from the maxima of runs of classes that the normaliser's
    max pass makes (200 classes: 8 runs of 25; 40000: 100 of 400): equal to the former
    separate pass over the row (``argmax_chunk`` None) on every edge row, NaN and infinite
    rows included (a NaN row's is whatever XLA:CPU's max makes of NaN, as before), and to
    the reference's first maximum on the rows without NaN; the entropy and lse alike."""
    x = _edge_rows(num_classes)
    where = None
    if masked:
        where = jax.random.bernoulli(jax.random.key(1), 0.7, x.shape).at[10].set(False)
    y = jnp.arange(16) * 7 % num_classes
    labels = jax.nn.one_hot(y, num_classes) if dense else y
    loss_fn = jxent.softmax_cross_entropy if dense else INT_CE

    def aux(temperature):
        return loss_fn(x, labels, where=where, temperature=temperature, return_aux=True)[1]

    assert _reductions.argmax_chunk(num_classes) in (25, 400)
    with simulated(None):
        chunked = [aux(t) for t in (1.0, 0.5)]
    monkeypatch.setattr(_reductions, "argmax_chunk", lambda num_classes: None)
    with simulated(None):
        one_pass = [aux(t) for t in (1.0, 0.5)]
    for got, want in zip(chunked, one_pass, strict=True):
        np.testing.assert_array_equal(got.argmax, want.argmax)
        np.testing.assert_array_equal(got.correct, want.correct)
        np.testing.assert_allclose(got.entropy, want.entropy, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got.lse, want.lse)
    m = np.ones(x.shape, bool) if where is None else np.asarray(where)
    finite_rows = [n for n in range(16) if not np.isnan(np.asarray(x)[n]).any()]
    want = [ref.first_argmax(np.asarray(x)[n], m[n]) for n in finite_rows]
    np.testing.assert_array_equal(np.asarray(chunked[0].argmax)[finite_rows], want)


@pytest.mark.parametrize("masked", [False, True], ids=["all", "where"])
@pytest.mark.parametrize("dense", [False, True], ids=["integer", "dense"])
@pytest.mark.parametrize("num_classes", [200, 40000])
def test_entropy_of_edge_rows_matches_reference(num_classes, dense, masked):
    """The entropy (on the CPU from the stored exponentials for short rows, from the logits
    for long, blocked ones) against the float64 reference on rows far from the usual
    logits: huge and tiny magnitudes, a huge common offset (no cancellation in either
    form), ties, half ``-inf``; 0 on rows with no unmasked finite logit; NaN on rows
    holding NaN or ``+inf`` (whose softmax has no entropy)."""
    x = np.array(_edge_rows(num_classes, seed=3))
    x[10] *= 1e4  # one class takes almost all the mass
    x[11] = x[11] * 1e-6 + 1e4  # nearly uniform, lse ~ 1e4
    x[12] *= 1e-3
    x[13] = -3e37
    x[13, 5] = 3e37
    where = np.ones(x.shape, bool)
    if masked:
        where = np.array(jax.random.bernoulli(jax.random.key(1), 0.7, x.shape))
        where[14] = False
    y = jnp.arange(16) * 7 % num_classes
    labels = jax.nn.one_hot(y, num_classes) if dense else y
    loss_fn = jxent.softmax_cross_entropy if dense else INT_CE
    for temperature in (1.0, 0.5):
        _, aux = loss_fn(
            jnp.asarray(x),
            labels,
            where=jnp.asarray(where) if masked else None,
            temperature=temperature,
            return_aux=True,
        )
        got = np.asarray(aux.entropy, np.float64)
        empty = ~np.any(where & (x > -np.inf), axis=-1)
        bad = np.any(where & (np.isnan(x) | (x == np.inf)), axis=-1)
        finite = ~empty & ~bad & np.all(np.isfinite(x) | ~where, axis=-1)
        # (Not the rows of the largest float: float64's lse of two such maxima rounds
        # away the log 2 of their entropy.)
        finite &= np.max(np.abs(np.where(where, x, 0.0)), axis=-1) < 1e38
        with np.errstate(invalid="ignore", over="ignore"):  # the NaN and inf rows
            want = ref.row_statistics(np.where(where, x, 0.0), where=where, temperature=temperature)
        close(got[finite], want["entropy"][finite], rtol=1e-5, atol=2e-6)
        np.testing.assert_array_equal(got[empty], 0.0)
        assert np.all(np.isnan(got[bad]))
        assert finite.sum() >= 8


@pytest.mark.compiled_memory
@pytest.mark.parametrize("shape", [(512, 4000), (64, 40000)], ids=["short", "long"])
def test_logged_aux_outputs_cost_no_logits_sized_array(shape):
    """Loss and gradient with every aux output logged (none differentiated): the compiled
    temp memory holds no logits-sized array (it held the argmax's scores, and the backward
    pass wrote the gradient into a fresh buffer), and the gradient is the loss alone's
    (the aux outputs' symbolic-zero cotangents add nothing)."""
    x = jax.random.normal(jax.random.key(2), shape) * 3
    y = jnp.arange(shape[0]) % shape[1]

    def logged(x):
        loss, aux = INT_CE(x, y, z_loss=1e-4, reduction="mean", return_aux=True)
        fields = (aux.lse, aux.z_loss, aux.entropy, aux.argmax, aux.correct)
        return loss + 0.0 * jax.lax.stop_gradient(sum(jnp.sum(f.astype(x.dtype)) for f in fields))

    step = jax.jit(jax.value_and_grad(logged))
    temp = step.lower(x).compile().memory_analysis().temp_size_in_bytes
    assert temp < x.nbytes // 8, temp
    alone = jax.value_and_grad(lambda x: INT_CE(x, y, z_loss=1e-4, reduction="mean"))(x)
    assert_trees_close(step(x), alone)


# ----------------------------------------------------------------------------- sharding, export


@pytest.mark.sharding
@pytest.mark.parametrize("platform", [None, "cuda"], ids=str)
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("num_classes", [16, 512])
def test_batch_and_class_sharded(num_classes, axis_type, platform):
    """Batch- and class-sharded logits (mesh 2 x 4): loss, aux and gradients equal one
    device's; under explicit sharding the class axis is reduced with the ``axis_name``
    collectives (the argmax a global id, the first of maxima on different shards; with
    512 classes found on the CPU through each shard's chunk maxima)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (host) devices: see tests/conftest.py")
    k = num_classes // 16
    x = jax.random.normal(jax.random.key(5), (8, num_classes)) * 2
    # Equal maxima on two class shards (4k classes each): the first one's id wins.
    x = x.at[1, 2 * k].set(12.0).at[1, 13 * k].set(12.0)
    x = x.at[2, 9 * k].set(12.0).at[2, 14 * k].set(12.0)
    y = jnp.where(jnp.arange(8) % 3 == 0, IGNORE, jnp.arange(8) * 2 % num_classes)
    w = jnp.linspace(0.0, 2.0, 8)

    def total(x, w):
        loss, aux = INT_CE(
            x,
            y,
            ignore_index=IGNORE,
            z_loss=1e-2,
            weights=w,
            temperature=1.5,
            reduction="mean",
            return_aux=True,
        )
        return loss + aux.entropy.sum() + jnp.sum(aux.lse * w), aux

    step = jax.value_and_grad(total, (0, 1), has_aux=True)
    want = step(x, w)
    mesh = jax.make_mesh((2, 4), ("b", "v"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh), simulated(platform):
        xs = jax.device_put(x, NamedSharding(mesh, P("b", "v")))
        ws = jax.device_put(w, NamedSharding(mesh, P("b")))
        got = jax.jit(step)(xs, ws)
    assert got[0][1].argmax.sharding.spec[0] == "b" or axis_type == AxisType.Auto
    assert_trees_close(got, want)
    np.testing.assert_array_equal(np.asarray(got[0][1].argmax)[1:3], [2 * k, 9 * k])


def test_export_round_trip_with_aux_and_weights():
    def step(x, y, w):
        def total(x, w):
            loss, aux = jxent.cross_entropy(
                x, y, weights=w, z_loss=1e-3, temperature=2.0, return_aux=True
            )
            return loss + aux.entropy.mean(), aux

        return jax.value_and_grad(total, (0, 1), has_aux=True)(x, w)

    b, v = export.symbolic_shape("b, v")
    exported = export.export(jax.jit(step))(
        jax.ShapeDtypeStruct((b, v), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.float32),
    )
    restored = export.deserialize(exported.serialize())
    x = jax.random.normal(jax.random.key(6), (4, 9))
    y, w = jnp.array([0, 3, 8, 2]), jnp.array([1.0, 0.5, 0.0, 2.0])
    assert_trees_close(restored.call(x, y, w), step(x, y, w))
