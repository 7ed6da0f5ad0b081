"""Specification tests for the softmax cross-entropy family and the NLL loss.

Every value and gradient is compared against the float64 NumPy loops in ``reference.py``
(PyTorch's ``cross_entropy``/``nll_loss`` semantics plus jxent's documented additions), and
where optax defines the same quantity, against optax as well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from jax.experimental import checkify
from jax.test_util import check_grads
from tolerances import as64, assert_close, compute_dtype, x64_if

import jxent

pytestmark = pytest.mark.numerics

IGNORE = -100
HALF = (jnp.bfloat16, jnp.float16)
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64]
DTYPE_IDS = ["f32", "bf16", "f16", "f64"]
REDUCTIONS = ["none", "sum", "mean"]

# (shape, class axis): the class axis last, in the middle (PyTorch's [N, C, d] layout),
# first, negative, and a tuple of axes (labels are then flat indices into them, as optax).
AXES = {
    "last": ((5, 7), -1),
    "middle": ((3, 6, 4), 1),
    "first": ((6, 4), 0),
    "negative": ((3, 6, 4), -2),
    "tuple": ((4, 3, 5), (1, 2)),
}

# Option sets for the integer-label losses: name -> keyword flags.
OPTIONS = {
    "plain": {},
    "weights": {"weights": True},
    "ignore": {"ignore": True},
    "smoothing": {"smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "where_class": {"where": "class"},
    "where_example": {"where": "example"},
    "everything": {
        "weights": True,
        "ignore": True,
        "smoothing": 0.2,
        "z_loss": 1e-3,
        "where": "class",
    },
}


# ----------------------------------------------------------------------------- helpers


def as_input(x, dtype):
    """Returns (jax array in ``dtype``, its exact values as float64 for the reference)."""
    arr = jnp.asarray(x, dtype)
    return arr, as64(arr)


class IntCase:
    """Random logits, labels, masks and weights for the integer-label losses."""

    def __init__(
        self,
        shape=(5, 7),
        axis=-1,
        dtype=jnp.float32,
        *,
        weights=False,
        ignore=False,
        smoothing=0.0,
        z_loss=0.0,
        where=None,
        seed=0,
    ):
        rng = np.random.default_rng(seed)
        rows = ref.Rows(shape, axis)
        n, c = math_prod(rows.batch_shape), rows.num_classes
        self.rows = rows
        self.logits, self.logits_ref = as_input(2.0 * rng.normal(size=shape), dtype)
        labels = rng.integers(0, c, size=n)
        self.where = self.where_ref = None
        if where == "class":
            mask = rng.random((n, c)) < 0.6
            mask[np.arange(n), labels] = True
            mask[-1] = False  # one row masked out entirely
            self.where = self.where_ref = rows.from_rows(mask)
        elif where == "example":
            flags = np.ones(n, bool)
            flags[1] = False
            self.where = flags.reshape(rows.batch_shape)
            self.where_ref = rows.from_rows(np.repeat(flags[:, None], c, axis=1))
        if ignore:
            labels[::3] = IGNORE
        self.labels = labels.reshape(rows.batch_shape)
        wdtype = compute_dtype(dtype)
        self.weights = jnp.asarray(rng.uniform(0.2, 2.0, size=c), wdtype) if weights else None
        self.weights_ref = None if self.weights is None else np.asarray(self.weights, np.float64)
        self.ignore_index = IGNORE if ignore else None
        self.smoothing = smoothing
        self.z_loss = z_loss
        self.cotangent = rng.uniform(0.5, 1.5, size=rows.batch_shape)


def math_prod(shape):
    return int(np.prod(shape, dtype=np.int64))


def objective(loss, reduction, cotangent):
    """The scalar whose gradient the reference gives: Σ v·loss for "none"."""
    return jnp.sum(loss * jnp.asarray(cotangent, loss.dtype)) if reduction == "none" else loss


def jx_integer(case, reduction, fn=jxent.softmax_cross_entropy_with_integer_labels, **extra):
    """Value and gradients (logits, class_weights) of jxent on ``case``."""
    kwargs = {"ignore_index": case.ignore_index, "reduction": reduction, **extra}
    if fn is not jxent.nll_loss:
        kwargs.update(label_smoothing=case.smoothing, z_loss=case.z_loss)

    def f(logits, weights):
        loss = fn(logits, case.labels, case.rows.axes, case.where, class_weights=weights, **kwargs)
        return objective(loss, reduction, case.cotangent), loss

    argnums = (0, 1) if case.weights is not None else (0,)
    (_, loss), grads = jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))(
        case.logits, case.weights
    )
    return loss, grads


def ref_integer(case, reduction, nll=False):
    kwargs = {
        "axis": case.rows.axes,
        "where": case.where_ref,
        "weights": case.weights_ref,
        "ignore_index": case.ignore_index,
        "reduction": reduction,
        "cotangent": case.cotangent,
    }
    if nll:
        return ref.nll_loss(case.logits_ref, case.labels, **kwargs)
    return ref.integer_cross_entropy(
        case.logits_ref,
        case.labels,
        label_smoothing=case.smoothing,
        z_loss=case.z_loss,
        **kwargs,
    )


def check_integer(case, reduction, dtype=jnp.float32, fn=None, nll=False):
    fn = fn or jxent.softmax_cross_entropy_with_integer_labels
    loss, grads = jx_integer(case, reduction, fn)
    expected = ref_integer(case, reduction, nll=nll)
    assert loss.dtype == compute_dtype(dtype)
    assert_close(loss, expected.value, dtype)
    key = "log_probs" if nll else "logits"
    assert grads[0].dtype == dtype
    assert_close(grads[0], expected.grads[key], dtype, "grad")
    if case.weights is not None:
        assert grads[1].dtype == case.weights.dtype
        assert_close(grads[1], expected.grads["class_weights"], dtype, "grad")


# ----------------------------------------------------------------------------- integer labels


class TestSoftmaxCrossEntropyWithIntegerLabels:
    """``softmax_cross_entropy_with_integer_labels``: PyTorch's ``cross_entropy`` with class
    indices (weights, ignore_index, smoothing, reductions) plus z-loss and ``where``."""

    @pytest.mark.parametrize("reduction", ["none", "mean"])
    @pytest.mark.parametrize("option", list(OPTIONS))
    def test_value_and_gradient_match_reference(self, option, reduction):
        """Loss and gradients (logits, class_weights) equal the float64 reference."""
        check_integer(IntCase(**OPTIONS[option]), reduction)

    def test_sum_reduction(self):
        check_integer(IntCase(**OPTIONS["everything"], seed=2), "sum")

    @pytest.mark.parametrize(
        ("layout", "where"),
        [(name, "class") for name in AXES] + [("middle", "example"), ("tuple", "example")],
    )
    def test_class_axis_layouts(self, layout, where):
        """Any class axis (or tuple of axes, labels as flat indices) gives the reference."""
        shape, axis = AXES[layout]
        case = IntCase(shape, axis, weights=True, ignore=True, smoothing=0.1, where=where)
        check_integer(case, "none")

    @pytest.mark.slow
    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_dtypes(self, dtype):
        """Losses are float32 for half inputs (float64 for float64), gradients come back in
        the input dtype, and both match the reference on the rounded inputs."""
        with x64_if(dtype):
            case = IntCase((4, 6), -1, dtype, **OPTIONS["everything"], seed=3)
            check_integer(case, "none", dtype)
            check_integer(case, "mean", dtype)

    @pytest.mark.parametrize("smoothing", [0.3, 1.0])
    def test_smoothing_endpoints(self, smoothing):
        """ε = 1 puts all mass on the uniform (weighted) target; ε = 0 is plain CE."""
        check_integer(IntCase(weights=True, smoothing=smoothing, seed=5), "mean")

    @pytest.mark.slow
    def test_matches_optax(self):
        """Per-example losses and logits gradients equal optax's, with a tuple axis and a
        per-class mask (no row fully masked: optax's rule there differs only in gradient)."""
        rng = np.random.default_rng(1)
        logits = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
        labels = jnp.asarray(rng.integers(0, 20, size=3))
        where = rng.random((3, 4, 5)) < 0.7
        where.reshape(3, 20)[np.arange(3), np.asarray(labels)] = True
        where = jnp.asarray(where)
        for kwargs in ({}, {"where": where}):

            def ours(x, kw=kwargs):
                return jxent.softmax_cross_entropy_with_integer_labels(x, labels, (1, 2), **kw)

            @jax.jit
            def theirs(x, kw=kwargs):
                return optax.softmax_cross_entropy_with_integer_labels(x, labels, (1, 2), **kw)

            np.testing.assert_allclose(ours(logits), theirs(logits), rtol=1e-5, atol=1e-6)
            g_ours = jax.jit(jax.grad(lambda x, f=ours: jnp.sum(f(x))))(logits)
            g_theirs = jax.jit(jax.grad(lambda x, f=theirs: jnp.sum(f(x))))(logits)
            np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-5, atol=1e-6)

    def test_smoothing_matches_optax_smoothed_one_hot(self):
        """ε-smoothing equals optax's dense CE on ``optax.smooth_labels(one_hot, ε)``."""
        rng = np.random.default_rng(2)
        logits = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
        labels = jnp.asarray(rng.integers(0, 5, size=6))
        dense = optax.smooth_labels(jax.nn.one_hot(labels, 5), 0.2)
        ours = jxent.softmax_cross_entropy_with_integer_labels(logits, labels, label_smoothing=0.2)
        np.testing.assert_allclose(
            ours, optax.softmax_cross_entropy(logits, dense), rtol=1e-5, atol=1e-6
        )

    @pytest.mark.parametrize("label_dtype", [jnp.int8, jnp.uint8, jnp.int16])
    def test_any_integer_label_dtype(self, label_dtype):
        """Labels of any integer dtype give the same loss as int32 labels."""
        case = IntCase(weights=True, seed=4)
        labels = jnp.asarray(case.labels, label_dtype)
        loss = jxent.softmax_cross_entropy_with_integer_labels(
            case.logits, labels, class_weights=case.weights
        )
        expected = ref.integer_cross_entropy(case.logits_ref, case.labels, weights=case.weights_ref)
        assert_close(loss, expected.value)

    @pytest.mark.parametrize(
        ("ignore_index", "label_dtype", "ignored_label"),
        [(0, jnp.int32, 0), (255, jnp.uint8, 255), (-100, jnp.int8, -100)],
    )
    def test_ignore_index_any_value_any_label_dtype(self, ignore_index, label_dtype, ignored_label):
        """``ignore_index`` may be a valid class id (PyTorch allows it) or a value only the
        labels' dtype can hold; its examples give 0 and leave the weighted mean."""
        case = IntCase((4, 3), weights=True, seed=22)
        labels = np.array([ignored_label, 1, 2, ignored_label])
        loss = jxent.softmax_cross_entropy_with_integer_labels(
            case.logits,
            jnp.asarray(labels, label_dtype),
            class_weights=case.weights,
            ignore_index=ignore_index,
            reduction="mean",
        )
        expected = ref.integer_cross_entropy(
            case.logits_ref,
            labels,
            weights=case.weights_ref,
            ignore_index=ignore_index,
            reduction="mean",
        )
        assert_close(loss, expected.value)

    def test_int64_labels_under_x64(self):
        """int64 labels (x64) work, including a negative ignore_index."""
        with jax.enable_x64(True):
            case = IntCase((6, 5), -1, jnp.float64, ignore=True, seed=6)
            labels = jnp.asarray(case.labels, jnp.int64)
            loss = jxent.softmax_cross_entropy_with_integer_labels(
                case.logits, labels, ignore_index=IGNORE, reduction="mean"
            )
            expected = ref.integer_cross_entropy(
                case.logits_ref, case.labels, ignore_index=IGNORE, reduction="mean"
            )
            assert loss.dtype == jnp.float64
            assert_close(loss, expected.value, jnp.float64)

    @pytest.mark.slow
    @pytest.mark.parametrize("bad", [7, -1, -100])
    def test_invalid_label_gives_nan_for_its_example_only(self, bad):
        """An id outside [0, C) that is not ignore_index gives NaN there (never wrapped);
        the other examples and their gradients are unaffected (the bad row's own gradient is
        left unspecified)."""
        case = IntCase((4, 7), seed=7)
        labels = np.array(case.labels)
        labels[2] = bad
        loss = jxent.softmax_cross_entropy_with_integer_labels(case.logits, labels)
        expected = ref.integer_cross_entropy(case.logits_ref, labels).value
        assert np.isnan(loss[2])
        assert_close(np.delete(loss, 2), np.delete(expected, 2))
        grad = jax.grad(
            lambda x: jnp.sum(
                jxent.softmax_cross_entropy_with_integer_labels(x, labels)[np.array([0, 1, 3])]
            )
        )(case.logits)
        expected_grad = ref.integer_cross_entropy(
            case.logits_ref, labels, cotangent=np.array([1.0, 1.0, 0.0, 1.0])
        ).grads["logits"]
        assert_close(np.delete(np.asarray(grad), 2, axis=0), np.delete(expected_grad, 2, axis=0))
        assert np.isnan(
            jxent.softmax_cross_entropy_with_integer_labels(case.logits, labels, reduction="mean")
        )

    def test_label_on_masked_class_gives_nan(self):
        """A label pointing at a class that ``where`` masks out gives NaN for its example."""
        logits = jnp.zeros((2, 3))
        where = jnp.array([[True, False, True], [True, True, True]])
        loss = jxent.softmax_cross_entropy_with_integer_labels(
            logits, jnp.array([1, 1]), where=where
        )
        assert np.isnan(loss[0])
        np.testing.assert_allclose(loss[1], np.log(3.0), rtol=1e-6)

    def test_fully_masked_row_gives_zero_and_no_weight(self):
        """A row masked out entirely gives 0, gradient 0, and does not count in the mean
        (whatever its label, even an invalid one)."""
        rng = np.random.default_rng(8)
        logits = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
        where = jnp.array([[True] * 4, [False] * 4, [True] * 4])
        labels = jnp.array([0, 9, 2])
        weights = jnp.array([1.0, 2.0, 3.0, 4.0])

        def f(x):
            return jxent.softmax_cross_entropy_with_integer_labels(
                x, labels, where=where, class_weights=weights, reduction="mean"
            )

        expected = ref.integer_cross_entropy(
            np.asarray(logits),
            np.array([0, 0, 2]),
            weights=np.asarray(weights),
            reduction="none",
        ).value
        np.testing.assert_allclose(f(logits), (expected[0] + expected[2]) / 4.0, rtol=1e-6)
        assert np.all(np.asarray(jax.grad(f)(logits))[1] == 0)

    @pytest.mark.slow
    @pytest.mark.parametrize("case", ["all_ignored", "all_masked"])
    def test_mean_over_no_valid_target_is_zero_with_zero_gradient(self, case):
        """PyTorch gives NaN; jxent documents 0, with zero gradients (logits and weights)."""
        logits = jnp.ones((3, 4))
        weights = jnp.ones(4)
        if case == "all_ignored":
            kw = {"ignore_index": IGNORE}
            labels = jnp.full((3,), IGNORE)
        else:
            kw = {"where": jnp.zeros((3,), bool)}
            labels = jnp.zeros((3,), jnp.int32)

        def f(x, w):
            return jxent.softmax_cross_entropy_with_integer_labels(
                x, labels, class_weights=w, reduction="mean", label_smoothing=0.1, **kw
            )

        value, (gx, gw) = jax.value_and_grad(f, argnums=(0, 1))(logits, weights)
        assert value == 0
        assert np.all(np.asarray(gx) == 0) and np.all(np.asarray(gw) == 0)

    def test_mean_divides_by_sum_of_target_weights(self):
        """PyTorch's weighted mean: Σ_n w_{y_n}·nll_n / Σ_n w_{y_n}, checked by hand."""
        logits = jnp.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
        labels = jnp.array([0, 1, 1])
        weights = jnp.array([1.0, 3.0])
        loss = jxent.softmax_cross_entropy_with_integer_labels(
            logits, labels, class_weights=weights, reduction="mean"
        )
        np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)  # (1+3+3)·log2 / 7

    def test_z_loss_adds_squared_log_normaliser(self):
        """z_loss=ζ adds ζ·lse² per example, checked by hand."""
        logits = jnp.array([[1.0, 2.0, 3.0]])
        lse = float(np.log(np.exp(1.0) + np.exp(2.0) + np.exp(3.0)))
        loss = jxent.softmax_cross_entropy_with_integer_labels(logits, jnp.array([2]), z_loss=0.5)
        np.testing.assert_allclose(loss, [lse - 3.0 + 0.5 * lse**2], rtol=1e-6)

    @pytest.mark.slow
    def test_second_order_gradients_in_float64(self):
        """Reverse mode to second order agrees with finite differences (float64)."""
        with jax.enable_x64(True):
            case = IntCase((3, 5), -1, jnp.float64, **OPTIONS["everything"], seed=9)

            def f(x, w):
                return jxent.softmax_cross_entropy_with_integer_labels(
                    x,
                    case.labels,
                    where=case.where,
                    class_weights=w,
                    ignore_index=IGNORE,
                    label_smoothing=0.2,
                    z_loss=1e-2,
                    reduction="mean",
                )

            check_grads(jax.jit(f), (case.logits, case.weights), order=2, modes=["rev"])

    @pytest.mark.slow
    def test_gradient_matches_autodiff_of_plain_formula(self):
        """Second opinion: ``jax.grad`` of a plain-jnp float64 formula of the same loss."""
        with jax.enable_x64(True):
            case = IntCase((4, 6), -1, jnp.float64, weights=True, seed=10)
            labels = jnp.asarray(case.labels)
            eps, zeta = 0.15, 0.02

            def plain(x, w):
                lse = jax.nn.logsumexp(x, axis=-1)
                lp = x - lse[:, None]
                w_y = w[labels]
                nll = -w_y * jnp.take_along_axis(lp, labels[:, None], axis=-1)[:, 0]
                loss = (1 - eps) * nll + eps / x.shape[-1] * jnp.sum(-w * lp, axis=-1)
                return jnp.sum(loss + zeta * lse**2) / jnp.sum(w_y)

            def ours(x, w):
                return jxent.softmax_cross_entropy_with_integer_labels(
                    x,
                    labels,
                    class_weights=w,
                    label_smoothing=eps,
                    z_loss=zeta,
                    reduction="mean",
                )

            args = (case.logits, case.weights)
            np.testing.assert_allclose(ours(*args), jax.jit(plain)(*args), rtol=1e-12)
            grad_ours = jax.jit(jax.grad(ours, (0, 1)))(*args)
            grad_plain = jax.jit(jax.grad(plain, (0, 1)))(*args)
            for a, b in zip(grad_ours, grad_plain, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

    def test_per_class_mask_of_shape_C_broadcasts(self):
        """A ``[C]`` mask is "broadcastable to logits" and masks classes in every row."""
        case = IntCase((5, 7), seed=11)
        mask = np.array([True, True, False, True, True, False, True])
        labels = np.array([0, 1, 3, 4, 6])
        loss = jxent.softmax_cross_entropy_with_integer_labels(case.logits, labels, where=mask)
        expected = ref.integer_cross_entropy(
            case.logits_ref, labels, where=np.broadcast_to(mask, (5, 7))
        )
        assert_close(loss, expected.value)

    # ---- validation

    def test_rejects_labels_of_wrong_shape(self):
        with pytest.raises(ValueError, match=r"\(4,\).*got labels of shape \(5,\)"):
            jxent.softmax_cross_entropy_with_integer_labels(jnp.zeros((4, 3)), jnp.zeros(5, int))

    def test_rejects_labels_of_wrong_shape_with_tuple_axis(self):
        with pytest.raises(ValueError, match=r"\(2,\).*got labels of shape \(2, 3\)"):
            jxent.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), int), axis=(1, 2)
            )

    def test_rejects_float_labels(self):
        with pytest.raises(TypeError, match="integer dtype, got float32"):
            jxent.softmax_cross_entropy_with_integer_labels(jnp.zeros((2, 3)), jnp.zeros(2))

    def test_rejects_class_weights_of_wrong_length(self):
        with pytest.raises(ValueError, match=r"shape \(3,\).*got shape \(4,\)"):
            jxent.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3)), jnp.zeros(2, int), class_weights=jnp.ones(4)
            )

    def test_rejects_unbroadcastable_where(self):
        with pytest.raises(ValueError, match=r"where of shape .*not broadcastable.*\(2, 3\)"):
            jxent.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3)), jnp.zeros(2, int), where=jnp.ones((4, 3), bool)
            )

    def test_rejects_non_boolean_where(self):
        with pytest.raises(TypeError, match="boolean mask, got dtype float32"):
            jxent.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3)), jnp.zeros(2, int), where=jnp.ones((2, 3))
            )

    def test_rejects_unknown_reduction(self):
        with pytest.raises(ValueError, match=r"reduction must be one of.*'average'"):
            jxent.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3)), jnp.zeros(2, int), reduction="average"
            )

    @pytest.mark.parametrize("eps", [-0.1, 1.5])
    def test_rejects_label_smoothing_outside_unit_interval(self, eps):
        with pytest.raises(ValueError, match=rf"label_smoothing must lie in \[0, 1\], got {eps}"):
            jxent.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3)), jnp.zeros(2, int), label_smoothing=eps
            )

    def test_rejects_negative_z_loss(self):
        with pytest.raises(ValueError, match=r"z_loss must be >= 0, got -0\.5"):
            jxent.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3)), jnp.zeros(2, int), z_loss=-0.5
            )

    def test_rejects_integer_logits(self):
        with pytest.raises(TypeError, match="logits must have a floating dtype, got int32"):
            jxent.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3), jnp.int32), jnp.zeros(2, int)
            )

    def test_rejects_out_of_range_axis(self):
        with pytest.raises(ValueError, match=r"axis=2 is out of range for an array of rank 2"):
            jxent.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3)), jnp.zeros(2, int), axis=2
            )

    # ---- check_labels

    def test_check_labels_raises_eagerly_naming_the_label(self):
        with pytest.raises(ValueError, match=r"label 7 at flat index 2 is outside \[0, 4\)"):
            jxent.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((3, 4)), jnp.array([0, 1, 7]), check_labels=True
            )

    def test_check_labels_accepts_ignore_index(self):
        loss = jxent.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((3, 4)), jnp.array([0, IGNORE, 3]), ignore_index=IGNORE, check_labels=True
        )
        np.testing.assert_allclose(loss, [np.log(4.0), 0.0, np.log(4.0)], rtol=1e-6)

    def test_check_labels_under_jit_reports_through_checkify(self):
        """Under ``jax.jit`` the check is a checkify check; ``err.get()`` names the label."""

        def f(x, y):
            return jxent.softmax_cross_entropy_with_integer_labels(x, y, check_labels=True)

        checked = checkify.checkify(jax.jit(f))
        err, _ = checked(jnp.zeros((3, 4)), jnp.array([0, -3, 1]))
        message = err.get()
        assert message is not None and "label -3" in message and "flat index 1" in message
        assert "[0, 4)" in message
        err, _ = checked(jnp.zeros((3, 4)), jnp.array([0, 3, 1]))
        assert err.get() is None


# ----------------------------------------------------------------------------- dense labels


class DenseCase:
    def __init__(
        self,
        shape=(5, 7),
        axis=-1,
        dtype=jnp.float32,
        *,
        weights=False,
        smoothing=0.0,
        z_loss=0.0,
        where=None,
        seed=0,
    ):
        rng = np.random.default_rng(seed)
        rows = ref.Rows(shape, axis)
        n, c = math_prod(rows.batch_shape), rows.num_classes
        self.rows = rows
        self.logits, self.logits_ref = as_input(2.0 * rng.normal(size=shape), dtype)
        t = rng.dirichlet(np.ones(c), size=n)
        t[0] = 0.0
        t[0, 1] = 1.0  # a one-hot row too
        self.labels, self.labels_ref = as_input(rows.from_rows(t), dtype)
        self.where = self.where_ref = None
        if where == "class":
            mask = rng.random((n, c)) < 0.6
            mask[:, 0] = True
            mask[-1] = False
            self.where = self.where_ref = rows.from_rows(mask)
        elif where == "example":
            flags = np.ones(n, bool)
            flags[1] = False
            self.where = flags.reshape(rows.batch_shape)
            self.where_ref = rows.from_rows(np.repeat(flags[:, None], c, axis=1))
        wdtype = compute_dtype(dtype)
        self.weights = jnp.asarray(rng.uniform(0.2, 2.0, size=c), wdtype) if weights else None
        self.weights_ref = None if self.weights is None else np.asarray(self.weights, np.float64)
        self.smoothing = smoothing
        self.z_loss = z_loss
        self.cotangent = rng.uniform(0.5, 1.5, size=rows.batch_shape)


DENSE_OPTIONS = {
    "plain": {},
    "weights": {"weights": True},
    "smoothing": {"smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "where_class": {"where": "class"},
    "where_example": {"where": "example"},
    "everything": {"weights": True, "smoothing": 0.2, "z_loss": 1e-3, "where": "class"},
}


def check_dense(case, reduction, dtype=jnp.float32, fn=jxent.softmax_cross_entropy):
    def f(logits, labels, weights):
        loss = fn(
            logits,
            labels,
            case.rows.axes,
            case.where,
            class_weights=weights,
            label_smoothing=case.smoothing,
            z_loss=case.z_loss,
            reduction=reduction,
        )
        return objective(loss, reduction, case.cotangent), loss

    argnums = (0, 1, 2) if case.weights is not None else (0, 1)
    (_, loss), grads = jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))(
        case.logits, case.labels, case.weights
    )
    expected = ref.dense_cross_entropy(
        case.logits_ref,
        case.labels_ref,
        axis=case.rows.axes,
        where=case.where_ref,
        weights=case.weights_ref,
        label_smoothing=case.smoothing,
        z_loss=case.z_loss,
        reduction=reduction,
        cotangent=case.cotangent,
    )
    assert loss.dtype == compute_dtype(dtype)
    assert_close(loss, expected.value, dtype)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    assert_close(grads[0], expected.grads["logits"], dtype, "grad")
    assert_close(grads[1], expected.grads["labels"], dtype, "grad")
    if case.weights is not None:
        assert grads[2].dtype == case.weights.dtype
        assert_close(grads[2], expected.grads["class_weights"], dtype, "grad")


class TestSoftmaxCrossEntropy:
    """``softmax_cross_entropy`` with probability targets: PyTorch's rule (the mean divides
    by the number of examples, weights not in the denominator) plus z-loss and ``where``."""

    @pytest.mark.parametrize("reduction", ["none", "mean"])
    @pytest.mark.parametrize("option", list(DENSE_OPTIONS))
    def test_value_and_gradient_match_reference(self, option, reduction):
        """Loss and gradients (logits, labels, class_weights) equal the reference."""
        check_dense(DenseCase(**DENSE_OPTIONS[option]), reduction)

    @pytest.mark.parametrize("layout", ["middle", "negative", "tuple"])
    def test_class_axis_layouts(self, layout):
        shape, axis = AXES[layout]
        check_dense(DenseCase(shape, axis, weights=True, smoothing=0.1, where="class"), "mean")

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_dtypes(self, dtype):
        """float32 losses for half inputs, float64 for float64; gradients in input dtype."""
        with x64_if(dtype):
            check_dense(DenseCase((4, 6), -1, dtype, **DENSE_OPTIONS["everything"]), "sum", dtype)

    def test_mean_ignores_class_weights_in_denominator(self):
        """Mean = Σ loss / N even with class weights (PyTorch, probability targets)."""
        logits = jnp.zeros((2, 2))
        labels = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        loss = jxent.softmax_cross_entropy(
            logits, labels, class_weights=jnp.array([1.0, 3.0]), reduction="mean"
        )
        np.testing.assert_allclose(loss, 2.0 * np.log(2.0), rtol=1e-6)  # (1+3)·log2 / 2

    def test_zero_mass_class_at_minus_infinity_contributes_zero(self):
        """``0·log 0 = 0``: a class with no target mass adds nothing even at logit -inf,
        and every gradient stays finite."""
        logits = jnp.array([[0.0, -jnp.inf, 1.0], [2.0, 0.0, -jnp.inf]])
        labels = jnp.array([[0.3, 0.0, 0.7], [1.0, 0.0, 0.0]])
        loss, grads = jax.value_and_grad(
            lambda x, t: jxent.softmax_cross_entropy(x, t, reduction="sum"), (0, 1)
        )(logits, labels)
        expected = ref.dense_cross_entropy(np.asarray(logits), np.asarray(labels), reduction="sum")
        assert_close(loss, expected.value)
        assert np.all(np.isfinite(np.asarray(grads[0])))
        assert_close(grads[0], expected.grads["logits"])

    def test_fully_masked_rows_do_not_count_in_the_mean(self):
        logits = jnp.asarray(np.random.default_rng(3).normal(size=(3, 4)), jnp.float32)
        labels = jnp.full((3, 4), 0.25)
        where = jnp.array([True, False, True])
        loss = jxent.softmax_cross_entropy(logits, labels, where=where, reduction="mean")
        per = ref.dense_cross_entropy(np.asarray(logits), np.asarray(labels)).value
        np.testing.assert_allclose(loss, (per[0] + per[2]) / 2, rtol=1e-6)

    def test_matches_optax(self):
        """Values and logits gradients equal optax's, plain and with a mask and tuple axis."""
        rng = np.random.default_rng(4)
        logits = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
        labels = jnp.asarray(rng.dirichlet(np.ones(20), size=3).reshape(3, 4, 5), jnp.float32)
        where = jnp.asarray(rng.random((3, 4, 5)) < 0.7)
        for kwargs in ({}, {"where": where}):

            def ours(x, kw=kwargs):
                return jnp.sum(jxent.softmax_cross_entropy(x, labels, (1, 2), **kw))

            def theirs(x, kw=kwargs):
                return jnp.sum(optax.softmax_cross_entropy(x, labels, (1, 2), **kw))

            np.testing.assert_allclose(ours(logits), jax.jit(theirs)(logits), rtol=1e-5)
            np.testing.assert_allclose(
                jax.jit(jax.grad(ours))(logits),
                jax.jit(jax.grad(theirs))(logits),
                rtol=1e-5,
                atol=1e-6,
            )

    def test_broadcast_labels(self):
        """Labels broadcastable to the logits are broadcast (one target for every row)."""
        logits = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4)), jnp.float32)
        target = jnp.array([0.1, 0.2, 0.3, 0.4])
        expected = ref.dense_cross_entropy(np.asarray(logits), np.broadcast_to(target, (3, 4)))
        assert_close(jxent.softmax_cross_entropy(logits, target), expected.value)

    @pytest.mark.slow
    def test_second_order_gradients_in_float64(self):
        with jax.enable_x64(True):
            case = DenseCase((3, 5), -1, jnp.float64, **DENSE_OPTIONS["everything"], seed=9)

            def f(x, t, w):
                return jxent.softmax_cross_entropy(
                    x,
                    t,
                    where=case.where,
                    class_weights=w,
                    label_smoothing=0.2,
                    z_loss=1e-2,
                    reduction="mean",
                )

            check_grads(
                jax.jit(f), (case.logits, case.labels, case.weights), order=2, modes=["rev"]
            )

    def test_rejects_unbroadcastable_labels(self):
        with pytest.raises(ValueError, match=r"shape \(2, 4\).*logits' shape \(2, 3\)"):
            jxent.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 4)))

    def test_rejects_integer_labels(self):
        with pytest.raises(TypeError, match="floating dtype, got int32"):
            jxent.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))

    def test_rejects_integer_logits(self):
        with pytest.raises(TypeError, match="logits must have a floating dtype, got int32"):
            jxent.softmax_cross_entropy(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))

    def test_rejects_class_weights_of_wrong_length(self):
        with pytest.raises(ValueError, match=r"shape \(3,\).*got shape \(2,\)"):
            jxent.softmax_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), class_weights=jnp.ones(2)
            )

    def test_rejects_unknown_reduction(self):
        with pytest.raises(ValueError, match=r"reduction must be one of.*'avg'"):
            jxent.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 3)), reduction="avg")

    def test_rejects_label_smoothing_outside_unit_interval(self):
        with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\], got 2.0"):
            jxent.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 3)), label_smoothing=2)


# ----------------------------------------------------------------------------- cross_entropy


class TestCrossEntropy:
    """``cross_entropy`` dispatches on the labels' dtype and reduces by the mean."""

    @pytest.mark.parametrize("option", ["plain", "everything", "where_example"])
    def test_integer_labels_follow_integer_rule(self, option):
        check_integer(IntCase(**OPTIONS[option], seed=12), "mean", fn=jxent.cross_entropy)

    @pytest.mark.parametrize("option", ["plain", "everything"])
    def test_dense_labels_follow_dense_rule(self, option):
        check_dense(DenseCase(**DENSE_OPTIONS[option], seed=13), "mean", fn=jxent.cross_entropy)

    def test_default_reduction_is_mean(self):
        case = IntCase(seed=14)
        expected = ref.integer_cross_entropy(case.logits_ref, case.labels, reduction="mean")
        assert_close(jxent.cross_entropy(case.logits, case.labels), expected.value)

    def test_float64_dtype(self):
        with jax.enable_x64(True):
            case = IntCase((3, 4), -1, jnp.float64, weights=True, seed=15)
            check_integer(case, "mean", jnp.float64, fn=jxent.cross_entropy)

    def test_rejects_ignore_index_with_dense_labels(self):
        with pytest.raises(ValueError, match="ignore_index=-100 applies to integer labels"):
            jxent.cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 3)), ignore_index=IGNORE)

    def test_rejects_check_labels_with_dense_labels(self):
        with pytest.raises(ValueError, match="check_labels=True applies to integer labels"):
            jxent.cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 3)), check_labels=True)

    def test_rejects_boolean_labels(self):
        with pytest.raises(TypeError, match="got dtype bool"):
            jxent.cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 3), bool))

    def test_rejects_integer_logits(self):
        with pytest.raises(TypeError, match="logits must have a floating dtype, got int32"):
            jxent.cross_entropy(jnp.zeros((2, 3), jnp.int32), jnp.zeros(2, jnp.int32))

    def test_check_labels_raises_eagerly(self):
        with pytest.raises(ValueError, match="label 5 at flat index 0"):
            jxent.cross_entropy(jnp.zeros((2, 3)), jnp.array([5, 0]), check_labels=True)


# ----------------------------------------------------------------------------- NLL


class TestNLLLoss:
    """``nll_loss``: PyTorch's ``nll_loss`` (mean over Σ w_y of non-ignored examples)."""

    @pytest.mark.parametrize("reduction", REDUCTIONS)
    @pytest.mark.parametrize("option", ["plain", "everything"])
    def test_value_and_gradient_match_reference(self, option, reduction):
        opts = {k: v for k, v in OPTIONS[option].items() if k not in ("smoothing", "z_loss")}
        case = IntCase(**opts, seed=17)
        case.logits = jax.nn.log_softmax(case.logits)  # any floats work; use real log-probs
        case.logits_ref = np.asarray(case.logits, np.float64)
        check_integer(case, reduction, fn=jxent.nll_loss, nll=True)

    @pytest.mark.parametrize("layout", ["middle", "tuple"])
    def test_class_axis_layouts(self, layout):
        shape, axis = AXES[layout]
        case = IntCase(shape, axis, weights=True, ignore=True, seed=18)
        check_integer(case, "mean", fn=jxent.nll_loss, nll=True)

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_dtypes(self, dtype):
        with x64_if(dtype):
            case = IntCase((4, 6), -1, dtype, weights=True, ignore=True, seed=19)
            check_integer(case, "mean", dtype, fn=jxent.nll_loss, nll=True)

    def test_equals_cross_entropy_of_log_softmax_reference(self):
        """``nll_loss(log_softmax(x), y)`` is the cross-entropy of ``x`` (reference)."""
        case = IntCase(weights=True, ignore=True, seed=20)
        lp = ref.log_softmax(case.logits_ref)
        loss = jxent.nll_loss(
            jnp.asarray(lp, jnp.float32),
            case.labels,
            class_weights=case.weights,
            ignore_index=IGNORE,
            reduction="mean",
        )
        expected = ref.integer_cross_entropy(
            case.logits_ref,
            case.labels,
            weights=case.weights_ref,
            ignore_index=IGNORE,
            reduction="mean",
        )
        assert_close(loss, expected.value)

    def test_invalid_label_gives_nan(self):
        loss = jxent.nll_loss(jnp.log(jnp.full((2, 3), 1 / 3)), jnp.array([3, 0]))
        assert np.isnan(loss[0])
        np.testing.assert_allclose(loss[1], np.log(3.0), rtol=1e-6)

    def test_second_order_gradients_in_float64(self):
        with jax.enable_x64(True):
            case = IntCase((3, 5), -1, jnp.float64, weights=True, ignore=True, seed=21)
            check_grads(
                jax.jit(
                    lambda lp, w: jxent.nll_loss(
                        lp, case.labels, class_weights=w, ignore_index=IGNORE, reduction="mean"
                    )
                ),
                (case.logits, case.weights),
                order=2,
                modes=["rev"],
            )

    def test_rejects_integer_log_probs(self):
        with pytest.raises(TypeError, match="log_probs must have a floating dtype, got int32"):
            jxent.nll_loss(jnp.zeros((2, 3), jnp.int32), jnp.zeros(2, jnp.int32))

    def test_rejects_labels_of_wrong_shape(self):
        with pytest.raises(ValueError, match=r"got labels of shape \(3,\)"):
            jxent.nll_loss(jnp.zeros((2, 3)), jnp.zeros(3, jnp.int32))

    def test_rejects_class_weights_of_wrong_length(self):
        with pytest.raises(ValueError, match=r"shape \(3,\).*got shape \(5,\)"):
            jxent.nll_loss(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), class_weights=jnp.ones(5))

    def test_check_labels_eager_and_under_checkify(self):
        with pytest.raises(ValueError, match="label 4 at flat index 1"):
            jxent.nll_loss(jnp.zeros((2, 3)), jnp.array([0, 4]), check_labels=True)
        checked = checkify.checkify(jax.jit(lambda lp, y: jxent.nll_loss(lp, y, check_labels=True)))
        err, _ = checked(jnp.zeros((2, 3)), jnp.array([0, 4]))
        assert err.get() is not None and "label 4" in err.get()
