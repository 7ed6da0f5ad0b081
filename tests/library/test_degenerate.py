"""Named regression tests: the degenerate cases where today's libraries give NaN or worse.

Each test names the upstream report it guards against (see ../shared/README.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent

pytestmark = pytest.mark.numerics

NEG_INF = -jnp.inf
HUGE = 3e38


def _grad(f, *args):
    return jax.grad(lambda x: jnp.sum(f(x, *args)))


class TestAllMinusInfRow:
    """jax-ml/jax#6811: the gradient of logsumexp over an all -inf row was NaN."""

    def test_logsumexp_is_minus_inf_with_zero_gradient(self):
        x = jnp.array([[NEG_INF, NEG_INF, NEG_INF], [0.0, 1.0, 2.0]])
        assert jxent.logsumexp(x, axis=-1)[0] == -jnp.inf
        g = _grad(lambda x: jxent.logsumexp(x, axis=-1))(x)
        np.testing.assert_array_equal(g[0], [0.0, 0.0, 0.0])
        assert np.all(np.isfinite(g))

    def test_fully_masked_row_is_minus_inf_with_zero_gradient(self):
        x = jnp.array([[1e30, 5.0, -1e30]])
        where = jnp.zeros((1, 3), bool)
        assert jxent.logsumexp(x, axis=-1, where=where)[0] == -jnp.inf
        g = _grad(lambda x: jxent.logsumexp(x, axis=-1, where=where))(x)
        np.testing.assert_array_equal(g, jnp.zeros_like(x))

    def test_softmax_of_fully_masked_row_is_zero_with_zero_gradient(self):
        x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
        where = jnp.array([[False, False], [True, True]])
        np.testing.assert_array_equal(jxent.softmax(x, where=where)[0], [0.0, 0.0])
        g = _grad(lambda x: jxent.softmax(x, where=where) * jnp.arange(2.0))(x)
        np.testing.assert_array_equal(g[0], [0.0, 0.0])


class TestPlusInfEntry:
    """A ``+inf`` logit: logsumexp is ``+inf`` (with b's sign) as in jax.nn, never NaN or a
    finite number; its softmax entry is NaN (as in jax.nn), never a probability above 1,
    and the loss of that row is not finite (``+inf``, the limit, or NaN)."""

    rows = jnp.array([[jnp.inf, 0.0], [1.0, 2.0], [NEG_INF, NEG_INF]])

    @pytest.mark.parametrize("b", [None, [2.0, 1.0], [-1.0, 1.0]])
    def test_logsumexp_matches_jax_nn(self, b):
        b = None if b is None else jnp.array(b)
        got = jxent.logsumexp(self.rows, axis=-1, b=b, return_sign=True)
        want = jax.nn.logsumexp(self.rows, axis=-1, b=b, return_sign=True)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)  # inf == inf, -inf == -inf
        np.testing.assert_array_equal(got[1], want[1])

    def test_softmax_and_cross_entropy_of_that_row_are_nan(self):
        p = jxent.softmax(self.rows[0])
        assert jnp.isnan(p[0]) and (jnp.isnan(p[1]) or p[1] == 0)
        loss = jxent.softmax_cross_entropy_with_integer_labels(self.rows[:2], jnp.array([1, 1]))
        assert not jnp.isfinite(loss[0]) and jnp.isfinite(loss[1])


class TestMaskedHugeValues:
    """jax-ml/jax#19490, #17117, #22398: NaN/inf gradients from where= masks over huge values."""

    x = jnp.array([[HUGE, 1.0, 2.0], [1.0, -HUGE, jnp.inf]])
    where = jnp.array([[False, True, True], [True, False, False]])

    @pytest.mark.parametrize("fn", [jxent.softmax, jxent.log_softmax])
    def test_normalisers_give_exactly_zero_gradient_on_masked_entries(self, fn):
        cot = jnp.ones_like(self.x).at[:, 1].set(2.0)
        g = jax.grad(lambda x: jnp.sum(jnp.where(self.where, fn(x, where=self.where), 0) * cot))(
            self.x
        )
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[~self.where], 0.0)

    def test_logsumexp_gives_exactly_zero_gradient_on_masked_entries(self):
        g = _grad(lambda x: jxent.logsumexp(x, axis=-1, where=self.where))(self.x)
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[~self.where], 0.0)

    def test_cross_entropy_gives_exactly_zero_gradient_on_masked_entries(self):
        labels = jnp.array([1, 0])
        loss, g = jax.value_and_grad(
            lambda x: jxent.cross_entropy(x, labels, where=self.where, label_smoothing=0.1)
        )(self.x)
        assert np.isfinite(loss)
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[~self.where], 0.0)


class TestMinusInfLogitWithZeroTarget:
    """google-deepmind/optax#896: softmax_cross_entropy was NaN at a -inf logit with label 0."""

    def test_dense_ce_is_finite_and_the_minus_inf_entry_gets_zero_gradient(self):
        x = jnp.array([[NEG_INF, 0.0, 1.0]])
        y = jnp.array([[0.0, 0.3, 0.7]])
        loss, (gx, gy) = jax.value_and_grad(
            lambda x, y: jxent.softmax_cross_entropy(x, y, reduction="sum"), (0, 1)
        )(x, y)
        p = jax.nn.softmax(jnp.array([0.0, 1.0]))
        np.testing.assert_allclose(loss, -(0.3 * jnp.log(p[0]) + 0.7 * jnp.log(p[1])), rtol=1e-6)
        assert gx[0, 0] == 0.0
        np.testing.assert_allclose(gx[0, 1:], p - y[0, 1:], rtol=1e-6)
        # The gradient w.r.t. the zero target is -log p = +inf: honest, not NaN.
        assert gy[0, 0] == jnp.inf

    def test_integer_ce_ignores_a_minus_inf_logit_of_another_class(self):
        x = jnp.array([[NEG_INF, 0.0, 0.0]])
        loss, g = jax.value_and_grad(lambda x: jxent.cross_entropy(x, jnp.array([1])))(x)
        np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
        np.testing.assert_allclose(g, [[0.0, -0.5, 0.5]])

    def test_kl_divergence_with_zero_target_at_minus_inf_prediction(self):
        lp = jnp.array([NEG_INF, jnp.log(0.5), jnp.log(0.5)])
        t = jnp.array([0.0, 0.5, 0.5])
        loss, g = jax.value_and_grad(jxent.kl_divergence)(lp, t)
        assert loss == 0.0
        np.testing.assert_array_equal(g, [-0.0, -0.5, -0.5])


class TestOutOfRangeLabels:
    """google-deepmind/optax#1185: out-of-range labels gave silent NaN or wrapped around."""

    x = jnp.zeros((4, 3))

    def test_too_large_label_gives_nan_for_that_example_only(self):
        loss = jxent.softmax_cross_entropy_with_integer_labels(self.x, jnp.array([0, 3, 1, 2]))
        assert np.isnan(loss[1])
        np.testing.assert_allclose(loss[jnp.array([0, 2, 3])], np.log(3.0), rtol=1e-6)

    def test_negative_label_is_not_wrapped_to_the_last_class(self):
        loss = jxent.softmax_cross_entropy_with_integer_labels(self.x, jnp.array([-1, 0, 0, 0]))
        assert np.isnan(loss[0])

    def test_nll_loss_out_of_range_is_nan(self):
        assert np.isnan(jxent.nll_loss(self.x, jnp.array([5, 0, 0, 0]))[0])

    def test_mean_over_a_batch_with_a_bad_label_is_nan_not_hidden(self):
        assert np.isnan(jxent.cross_entropy(self.x, jnp.array([0, 1, 7, 2])))

    def test_check_labels_raises_eagerly_naming_the_label(self):
        with pytest.raises(ValueError, match=r"label 7 at flat index 2 is outside \[0, 3\)"):
            jxent.cross_entropy(self.x, jnp.array([0, 1, 7, 2]), check_labels=True)

    def test_check_labels_under_jit_goes_through_checkify(self):
        from jax.experimental import checkify

        loss_fn = jax.jit(lambda x, y: jxent.cross_entropy(x, y, check_labels=True))
        err, _ = checkify.checkify(loss_fn)(self.x, jnp.array([0, -5, 1, 2]))
        assert "label -5 at flat index 1" in err.get()
        err, loss = checkify.checkify(loss_fn)(self.x, jnp.array([0, 1, 1, 2]))
        assert err.get() is None
        np.testing.assert_allclose(loss, np.log(3.0), rtol=1e-6)


class TestHalfPrecisionAccumulation:
    """google-deepmind/optax#1020: bf16 logits gave visibly quantized losses."""

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    def test_loss_is_float32_and_equals_the_float32_loss_of_the_same_values(self, dtype):
        x = (jax.random.normal(jax.random.key(0), (64, 1000)) * 3).astype(dtype)
        y = jax.random.randint(jax.random.key(1), (64,), 0, 1000)
        loss = jxent.softmax_cross_entropy_with_integer_labels(x, y)
        assert loss.dtype == jnp.float32
        want = jxent.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), y)
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        # Distinct losses stay distinct: no bf16 rounding of the result.
        assert len(np.unique(np.asarray(loss))) == len(np.unique(np.asarray(want)))

    def test_gradient_comes_back_in_the_input_dtype(self):
        x = jnp.ones((2, 5), jnp.bfloat16)
        g = jax.grad(lambda x: jxent.cross_entropy(x, jnp.array([0, 1])))(x)
        assert g.dtype == jnp.bfloat16


class TestAllTargetsIgnored:
    """pytorch/pytorch#116349: mean cross-entropy with every target ignored was NaN."""

    def test_mean_is_zero_with_zero_gradient(self):
        x = jax.random.normal(jax.random.key(0), (3, 4))
        labels = jnp.array([-100, -100, -100])
        loss, g = jax.value_and_grad(
            lambda x: jxent.cross_entropy(x, labels, ignore_index=-100, class_weights=jnp.ones(4))
        )(x)
        assert loss == 0.0
        np.testing.assert_array_equal(g, jnp.zeros_like(x))

    @pytest.mark.parametrize("labels", [jnp.array([0, 1]), jnp.eye(3)[:2]])
    def test_mean_over_fully_masked_rows_is_zero_with_zero_gradient(self, labels):
        x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        where = jnp.zeros((2, 3), bool)
        loss, g = jax.value_and_grad(lambda x: jxent.cross_entropy(x, labels, where=where))(x)
        assert loss == 0.0
        np.testing.assert_array_equal(g, jnp.zeros_like(x))


class TestForwardMode:
    """google-research/t5x#351, jax-ml/jax#16049: no forward mode through a custom_vjp loss.

    ``jax.jvp`` / ``jax.jacfwd`` of a jxent function raise. Because every backward rule is
    itself differentiable, forward-over-reverse (``jax.hessian``) and reverse-over-reverse
    (``jax.jacrev(jax.jacrev(f))``) both work.
    """

    x = jnp.array([0.5, -1.0, 2.0])

    @staticmethod
    def loss(x):
        return jxent.cross_entropy(x, jnp.array(2))

    def test_jvp_and_jacfwd_raise(self):
        with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
            jax.jvp(self.loss, (self.x,), (self.x,))
        with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
            jax.jacfwd(self.loss)(self.x)

    @pytest.mark.parametrize("second_order", [jax.hessian, lambda f: jax.jacrev(jax.jacrev(f))])
    def test_hessian_is_diag_p_minus_outer_p(self, second_order):
        p = jax.nn.softmax(self.x)
        np.testing.assert_allclose(
            second_order(self.loss)(self.x), jnp.diag(p) - jnp.outer(p, p), atol=1e-6
        )

    @pytest.mark.parametrize(
        ("ours", "theirs"),
        [
            (jxent.logsumexp, jax.nn.logsumexp),
            (lambda x: jxent.softmax(x)[0], lambda x: jax.nn.softmax(x)[0]),
            (lambda x: jxent.log_softmax(x)[2], lambda x: jax.nn.log_softmax(x)[2]),
        ],
        ids=["logsumexp", "softmax", "log_softmax"],
    )
    def test_normaliser_hessians_match_jax_nn(self, ours, theirs):
        np.testing.assert_allclose(
            jax.hessian(ours)(self.x), jax.hessian(theirs)(self.x), atol=1e-6
        )


class TestReductionNoneGradients:
    """linkedin/Liger-Kernel#678, #968: reduction='none' gave wrong gradients in a fused kernel."""

    def test_per_example_cotangents_scale_each_row(self):
        x = jax.random.normal(jax.random.key(0), (4, 6))
        y = jnp.array([0, 5, 2, 3])
        cot = jnp.array([1.0, -2.0, 0.0, 3.5])
        g = jax.grad(
            lambda x: jnp.sum(
                jxent.softmax_cross_entropy_with_integer_labels(x, y, label_smoothing=0.2) * cot
            )
        )(x)
        p = jax.nn.softmax(x)
        target = 0.8 * jax.nn.one_hot(y, 6) + 0.2 / 6
        np.testing.assert_allclose(g, cot[:, None] * (p - target), rtol=1e-5, atol=1e-6)


class TestExtremeFiniteInputs:
    """Finite inputs up to ±3e38 give finite losses and gradients, never NaN."""

    def test_integer_ce_at_plus_minus_3e38(self):
        x = jnp.array([[HUGE, -HUGE, 0.0], [HUGE, HUGE, -HUGE]])
        loss, g = jax.value_and_grad(
            lambda x: jxent.softmax_cross_entropy_with_integer_labels(x, jnp.array([0, 1])).sum()
        )(x)
        np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
        np.testing.assert_allclose(g, [[0.0, 0.0, 0.0], [0.5, -0.5, 0.0]])

    def test_dense_ce_and_logsumexp_at_plus_minus_3e38(self):
        x = jnp.array([[HUGE, -HUGE, HUGE]])
        y = jnp.array([[0.5, 0.0, 0.5]])
        loss, g = jax.value_and_grad(lambda x: jxent.softmax_cross_entropy(x, y).sum())(x)
        np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
        np.testing.assert_allclose(g, [[0.0, 0.0, 0.0]], atol=1e-7)
        np.testing.assert_allclose(jxent.logsumexp(x), HUGE, rtol=1e-6)

    def test_binary_ce_at_plus_minus_3e38(self):
        x = jnp.array([HUGE, -HUGE, HUGE, -HUGE])
        y = jnp.array([1.0, 0.0, 0.0, 1.0])
        loss = jxent.sigmoid_binary_cross_entropy(x, y)
        np.testing.assert_array_equal(loss, np.array([0.0, 0.0, HUGE, HUGE], np.float32))
        g = jax.grad(lambda x: jxent.sigmoid_binary_cross_entropy(x, y, reduction="mean"))(x)
        np.testing.assert_array_equal(g, [0.0, 0.0, 0.25, -0.25])


class TestNaNIsNeverHidden:
    @pytest.mark.parametrize(
        "fn",
        [
            lambda x: jxent.logsumexp(x, axis=-1),
            jxent.softmax,
            jxent.log_softmax,
            lambda x: jxent.cross_entropy(x, jnp.array([0, 1]), reduction="none"),
            lambda x: jxent.softmax_cross_entropy(x, jnp.full((2, 3), 1 / 3)),
        ],
    )
    def test_nan_input_gives_nan_in_its_row(self, fn):
        x = jnp.array([[0.0, jnp.nan, 1.0], [0.0, 1.0, 2.0]])
        out = np.asarray(fn(x))
        assert np.all(np.isnan(out[0]))
        assert np.all(np.isfinite(out[1]))
