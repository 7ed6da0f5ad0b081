"""Drop-in exactness against jax.nn and SciPy (issue 10, items 1-4), NaN hygiene under
``jax.debug_nans``, and what a user sees from forward-mode autodiff.

Each class is a named regression test for one defect; the references are ``jax.nn``,
``scipy.special`` and float64 NumPy, called with the same shapes and arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import jxent

NEG_INF = -np.inf


# ----------------------------------------------------------------------------- item 1


class TestSizeOneClassAxis:
    """A class axis of size 1 gives ``-inf`` (not NaN) where the answer is ``-inf``: XLA
    drops a reduction's start value on a size-1 axis, so the row max reached the kernels
    as ``-inf`` and ``x - max`` was NaN."""

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"a": [NEG_INF]},
            {"a": [2.87], "where": [False]},
            {"a": [2.87], "b": [0.0]},
            {"a": [[NEG_INF], [1.5]], "axis": -1},
        ],
        ids=["minus-inf", "masked", "b-zero", "rows"],
    )
    def test_logsumexp_matches_jax_nn(self, kwargs):
        args = {k: jnp.asarray(v) if k != "axis" else v for k, v in kwargs.items()}
        expected = jax.nn.logsumexp(**args)
        np.testing.assert_array_equal(jxent.logsumexp(**args), expected)
        if "b" in args:
            lse, sign = jxent.logsumexp(**args, return_sign=True)
            expected_lse, expected_sign = jax.nn.logsumexp(**args, return_sign=True)
            np.testing.assert_array_equal(lse, expected_lse)
            np.testing.assert_array_equal(sign, expected_sign)

    def test_logsumexp_gradient_is_zero_not_nan(self):
        grad = jax.grad(lambda a: jxent.logsumexp(a))(jnp.array([NEG_INF]))
        np.testing.assert_array_equal(grad, [0.0])
        grad = jax.grad(lambda a: jxent.logsumexp(a, where=jnp.array([False])))(jnp.array([2.0]))
        np.testing.assert_array_equal(grad, [0.0])
        args = (jnp.array([2.0]), jnp.array([0.0]))
        da, db = jax.grad(lambda a, b: jxent.logsumexp(a, b=b), argnums=(0, 1))(*args)
        np.testing.assert_array_equal(da, [0.0])
        # d log|Σ b e^a| / db at a zero sum has no value (±inf from either side): NaN, as
        # in jax.nn.
        expected = jax.grad(lambda a, b: jax.nn.logsumexp(a, b=b), argnums=1)(*args)
        np.testing.assert_array_equal(db, expected)

    def test_softmax_and_log_softmax(self):
        x = jnp.array([[NEG_INF], [3.0]])
        where = jnp.array([[True], [False]])
        np.testing.assert_array_equal(jxent.softmax(jnp.array([[3.0]])), [[1.0]])
        np.testing.assert_array_equal(jxent.log_softmax(x), [[NEG_INF], [0.0]])
        np.testing.assert_array_equal(jxent.softmax(x, where=where), [[0.0], [0.0]])
        np.testing.assert_array_equal(
            jxent.log_softmax(jnp.array([[3.0], [3.0]]), where=where), [[0.0], [NEG_INF]]
        )
        grad = jax.grad(lambda x: jxent.softmax(x, where=where).sum())(x)
        np.testing.assert_array_equal(grad, [[0.0], [0.0]])

    def test_losses_with_one_class(self):
        logits = jnp.array([[1.5], [-2.0]])
        where = jnp.array([[True], [False]])
        labels = jnp.array([0, 0])
        loss = jxent.softmax_cross_entropy_with_integer_labels(logits, labels, where=where)
        np.testing.assert_array_equal(loss, [0.0, 0.0])  # log p = 0; the masked row counts 0
        dense = jxent.softmax_cross_entropy(logits, jnp.ones((2, 1)), where=where)
        np.testing.assert_array_equal(dense, [0.0, 0.0])
        grad = jax.grad(lambda x: jxent.cross_entropy(x, labels, where=where))(logits)
        np.testing.assert_array_equal(grad, [[0.0], [0.0]])


# ----------------------------------------------------------------------------- item 2


def _public_calls():
    """(name, f(x) -> scalar) for every public function, on valid inputs with the
    degenerate-but-valid cases: -inf logits, fully masked rows, ignored labels, b = 0."""
    x = jnp.array([[1.0, -2.0, 0.5], [NEG_INF, 0.0, 3.0]])
    mask = jnp.array([[True, False, True], [False, False, False]])
    probs = jnp.array([[0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    weights = jnp.array([1.0, 2.0, 0.5])
    hidden, proj = jnp.ones((3, 4)), jnp.linspace(-0.5, 0.5, 12).reshape(4, 3)
    b = jnp.array([1.0, 0.0, 2.0])
    finite = jnp.array([[1.0, -2.0, 0.5], [0.3, 0.0, 3.0]])
    calls = {
        "logsumexp": lambda x: jxent.logsumexp(x, axis=-1).sum(),
        "logsumexp-b": lambda x: jxent.logsumexp(x, axis=-1, b=b).sum(),
        "logsumexp-scalar-b": lambda x: jxent.logsumexp(x[0, 0], b=1.0),
        "logsumexp-sign": lambda x: jxent.logsumexp(x, -1, -b, return_sign=True)[0].sum(),
        "logsumexp-where": lambda x: jxent.logsumexp(x, axis=-1, where=mask).sum(),
        "logsumexp-one-class": lambda x: jxent.logsumexp(x[:, 2:] * 0 + NEG_INF, -1).sum(),
        "softmax": lambda x: (jxent.softmax(x, where=mask) * jnp.arange(3.0)).sum(),
        "log_softmax": lambda x: jnp.where(mask, jxent.log_softmax(x, where=mask), 0).sum(),
        "integer-ce": lambda x: jxent.softmax_cross_entropy_with_integer_labels(
            x,
            jnp.array([2, 1]),
            where=mask,
            class_weights=weights,
            label_smoothing=0.1,
            z_loss=1e-3,
            reduction="mean",
        ),
        "cross_entropy-ignore": lambda x: jxent.cross_entropy(
            x, jnp.array([0, -100]), ignore_index=-100
        ),
        "dense-ce": lambda x: jxent.softmax_cross_entropy(
            x, probs, where=mask, class_weights=weights, label_smoothing=0.1, reduction="mean"
        ),
        "dense-ce-plain": lambda x: jxent.softmax_cross_entropy(x, probs).sum(),
        "nll_loss": lambda x: jxent.nll_loss(
            jxent.log_softmax(x), jnp.array([0, 2]), class_weights=weights, reduction="mean"
        ),
        "sigmoid_bce": lambda x: jxent.sigmoid_binary_cross_entropy(
            x * finite, probs, pos_weight=weights, label_smoothing=0.1, reduction="mean"
        ),
        "kl_divergence": lambda x: jxent.kl_divergence(jxent.log_softmax(x), probs).sum(),
        "kl_log_targets": lambda x: jxent.kl_divergence_with_log_targets(
            jxent.log_softmax(x), jnp.log(probs)
        ).sum(),
        "fused-mean": lambda x: jxent.fused_linear_cross_entropy(
            hidden * x[0, 0], proj, jnp.array([0, 2, -1]), ignore_index=-1, chunk_size=2
        ),
        "fused-none": lambda x: jxent.fused_linear_cross_entropy(
            hidden * x[0, 0], proj, jnp.array([0, 2, 1]), label_smoothing=0.1, reduction="none"
        ).sum(),
    }
    return x, calls


_X, _CALLS = _public_calls()


class TestNoFalseNanAlarms:
    """On valid input no NaN is made, even in a branch a ``where`` discards, so
    ``jax.debug_nans`` (the standard NaN hunt) stays quiet, eagerly and under jit."""

    @pytest.mark.parametrize("name", sorted(_CALLS))
    @pytest.mark.parametrize("mode", ["eager", "jit"])
    def test_value_and_gradient(self, name, mode):
        f = _CALLS[name]
        value_and_grad = jax.value_and_grad(f)
        with jax.debug_nans(True):
            if mode == "eager":
                with jax.disable_jit():
                    value, grad = value_and_grad(_X)
            else:
                value, grad = jax.jit(value_and_grad)(_X)
        assert not np.isnan(value) and not np.isnan(grad).any(), (value, grad)

    def test_a_real_nan_is_still_reported(self):
        """An invalid label gives NaN, and debug_nans catches where it is made."""
        with jax.debug_nans(True), jax.disable_jit(), pytest.raises(FloatingPointError):
            jxent.cross_entropy(_X, jnp.array([0, 7]))


# ----------------------------------------------------------------------------- item 3


class TestBBroadcastsBothWays:
    """``a`` and ``b`` broadcast against each other, as in jax.nn and SciPy."""

    A_SHAPE, B_SHAPE = (4, 1, 2, 1), (3, 1, 5)

    @pytest.mark.parametrize(
        "axis, keepdims", [(None, False), (1, True), (-1, False), ((3, 1), True), ((0, 2), False)]
    )
    def test_matches_scipy_and_jax_nn(self, axis, keepdims):
        rng = np.random.default_rng(0)
        a = rng.normal(size=self.A_SHAPE).astype(np.float32)
        b = rng.uniform(0.1, 2.0, size=self.B_SHAPE).astype(np.float32)
        got = jxent.logsumexp(a, axis=axis, b=b, keepdims=keepdims)
        expected = scipy.special.logsumexp(
            a.astype(np.float64), axis=axis, b=b.astype(np.float64), keepdims=keepdims
        )
        assert got.shape == expected.shape == jax.nn.logsumexp(a, axis, b, keepdims).shape
        np.testing.assert_allclose(got, expected, rtol=2e-6)

    def test_signed_b_and_gradients(self):
        rng = np.random.default_rng(1)
        a = jnp.asarray(rng.normal(size=self.A_SHAPE), jnp.float32)
        b = jnp.asarray(rng.choice([-1.0, 0.0, 0.5, 2.0], size=self.B_SHAPE), jnp.float32)
        lse, sign = jxent.logsumexp(a, 1, b, return_sign=True)
        expected_lse, expected_sign = jax.nn.logsumexp(a, 1, b, return_sign=True)
        np.testing.assert_allclose(lse, expected_lse, rtol=1e-5)
        np.testing.assert_array_equal(sign, expected_sign)

        def objective(a, b):
            return jnp.sum(jxent.logsumexp(a, 1, b, return_sign=True)[0] * sign)

        def naive(a, b):  # the plain formula, accurate at these magnitudes
            return jnp.sum(jnp.log(jnp.abs(jnp.sum(b * jnp.exp(a), axis=1))) * sign)

        # (Not jax.nn's gradient: it drops the b == 0 entries from d/db, which still move
        # the sum.)
        got = jax.grad(objective, argnums=(0, 1))(a, b)
        expected = jax.grad(naive, argnums=(0, 1))(a, b)
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- item 4


NORMALISERS = {
    "logsumexp": (jxent.logsumexp, jax.nn.logsumexp),
    "softmax": (jxent.softmax, jax.nn.softmax),
    "log_softmax": (jxent.log_softmax, jax.nn.log_softmax),
}


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype:UserWarning")  # x64 off: on purpose
# jax.nn.log_softmax's tracing casts -inf to the integer input dtype (its warning, not ours).
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
class TestResultDtypesFollowJaxNn:
    """Result dtypes are jax.nn's: integers of up to 32 bits give float32 even with x64
    on; ``a`` and ``b`` are promoted together. (Values are checked against float64
    NumPy: jax.nn's softmax of unsigned integers wraps ``x - max`` and gives NaN.)"""

    @pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
    @pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "int64"])
    @pytest.mark.parametrize("name", sorted(NORMALISERS))
    def test_integer_inputs(self, name, dtype, x64):
        ours, theirs = NORMALISERS[name]
        with jax.enable_x64(x64):
            x = jnp.arange(3, dtype=dtype)  # int64 is int32 with x64 off
            got, expected_dtype = ours(x), jax.eval_shape(theirs, x).dtype
            assert got.dtype == expected_dtype, (got.dtype, expected_dtype)
        values = np.arange(3.0)
        lse = np.log(np.sum(np.exp(values)))
        expected = {"logsumexp": lse, "softmax": np.exp(values - lse), "log_softmax": values - lse}
        np.testing.assert_allclose(got, expected[name], rtol=1e-6)

    @pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
    @pytest.mark.parametrize(
        "a_dtype, b_dtype",
        [
            ("float32", "float64"),
            ("float64", "float32"),
            ("float16", "float32"),
            ("bfloat16", "float16"),
            ("float16", "int32"),
            ("int32", "float16"),
        ],
    )
    def test_a_and_b_promote_together(self, a_dtype, b_dtype, x64):
        with jax.enable_x64(x64):
            a = jnp.array([0.5, 1.0, -1.0], a_dtype)
            b = jnp.array([1, 2, 0], b_dtype)
            got, expected = jxent.logsumexp(a, b=b), jax.nn.logsumexp(a, b=b)
            assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
            a64 = np.asarray(a, np.float64)  # as cast: int32 a holds [0, 1, -1]
            np.testing.assert_allclose(
                np.float64(got), np.log(np.sum(np.asarray(b, np.float64) * np.exp(a64))), rtol=2e-3
            )

    def test_python_scalar_b_keeps_a_dtype(self):
        with jax.enable_x64(True):
            a = jnp.array([0.5, 1.0], jnp.float32)
            assert jxent.logsumexp(a, b=2.0).dtype == jax.nn.logsumexp(a, b=2.0).dtype


# ----------------------------------------------------------------------------- forward mode


class TestForwardModeAlternatives:
    """What a user sees from ``jax.jvp``/``jax.jacfwd`` (JAX's error for a custom_vjp:
    jxent cannot replace it without losing reverse mode) and that the documented
    alternatives work."""

    def test_jvp_raises_jax_error(self):
        x = jnp.array([0.5, -1.0, 2.0])
        with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
            jax.jvp(jxent.softmax, (x,), (jnp.ones(3),))
        with pytest.raises(TypeError, match="custom_vjp"):
            jax.jacfwd(jxent.logsumexp)(x)

    def test_jacrev_and_hessian_work(self):
        x = jnp.array([0.5, -1.0, 2.0])
        p = np.asarray(jax.nn.softmax(x), np.float64)
        analytic = np.diag(p) - np.outer(p, p)  # d softmax / dx = Hessian of logsumexp
        np.testing.assert_allclose(jax.jacrev(jxent.softmax)(x), analytic, atol=1e-6)
        np.testing.assert_allclose(jax.hessian(jxent.logsumexp)(x), analytic, atol=1e-6)
        np.testing.assert_allclose(jax.jacrev(jax.jacrev(jxent.logsumexp))(x), analytic, atol=1e-6)
