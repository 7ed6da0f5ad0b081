"""Specification of jxent.softmax and jxent.log_softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jxent

pytestmark = pytest.mark.numerics

AXES = [0, -1, (1, 2), None]
DTYPES = [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2), (jnp.float16, 1e-3)]


def reference_softmax(x, axis=-1, where=None):
    x = np.asarray(x, np.float64)
    keep = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
    masked = np.where(keep, x, -np.inf)
    m = np.max(masked, axis=axis, keepdims=True)
    e = np.exp(masked - np.where(np.isfinite(m), m, 0.0))
    total = np.sum(e, axis=axis, keepdims=True)
    return np.where(keep, e / np.where(total == 0, 1.0, total), 0.0)


@pytest.fixture
def x():
    return jax.random.normal(jax.random.key(0), (3, 4, 5)) * 3


class TestTutorialVectors:
    def test_softmax_of_small_integers_matches_tensorflow(self):
        got = jxent.softmax(jnp.array([-1.0, 0.0, 1.0, 2.0, 3.0]))
        want = [0.01165623, 0.03168492, 0.08612854, 0.23412165, 0.6364086]
        np.testing.assert_allclose(got, want, rtol=1e-6)

    def test_softmax_of_huge_values_is_one_hot_without_nan(self):
        got = jxent.softmax(jnp.array([1000.0, 2000.0, 3000.0, 4000.0, 5000.0]))
        np.testing.assert_array_equal(got, [0.0, 0.0, 0.0, 0.0, 1.0])

    def test_softmax_jacobian_is_diag_p_minus_outer_p(self):
        x = jnp.array([-1.0, 0.0, 1.0, 2.0, 3.0])
        p = jxent.softmax(x)
        np.testing.assert_allclose(
            jax.jacrev(jxent.softmax)(x), jnp.diag(p) - jnp.outer(p, p), atol=1e-7
        )


class TestSoftmax:
    @pytest.mark.parametrize("axis", AXES)
    def test_matches_jax_nn(self, x, axis):
        np.testing.assert_allclose(
            jxent.softmax(x, axis=axis), jax.nn.softmax(x, axis=axis), rtol=1e-6, atol=1e-7
        )

    @pytest.mark.parametrize("axis", AXES)
    def test_where_matches_jax_nn(self, x, axis):
        where = jax.random.bernoulli(jax.random.key(1), 0.7, x.shape)
        np.testing.assert_allclose(
            jxent.softmax(x, axis=axis, where=where),
            jax.nn.softmax(x, axis=axis, where=where),
            rtol=1e-6,
            atol=1e-7,
        )

    @pytest.mark.parametrize(("dtype", "tol"), DTYPES)
    def test_returns_input_dtype_and_agrees_with_float64(self, x, dtype, tol):
        xd = x.astype(dtype)
        got = jxent.softmax(xd)
        assert got.dtype == dtype
        want = reference_softmax(np.asarray(xd.astype(jnp.float32)))
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=tol, atol=tol)

    @pytest.mark.parametrize(("dtype", "tol"), DTYPES)
    def test_gradient_dtype_and_value(self, x, dtype, tol):
        cot = jax.random.normal(jax.random.key(2), x.shape)
        xd = x.astype(dtype)
        got = jax.grad(lambda z: jnp.sum(jxent.softmax(z).astype(jnp.float32) * cot))(xd)
        assert got.dtype == dtype
        p = reference_softmax(np.asarray(xd.astype(jnp.float32)))
        cot = np.asarray(cot, np.float64)
        want = p * (cot - np.sum(cot * p, axis=-1, keepdims=True))
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=10 * tol, atol=10 * tol)

    @pytest.mark.parametrize("order", [1, 2])
    def test_check_grads_reverse_mode(self, x64, order):
        x = np.random.default_rng(0).normal(size=(3, 4))
        where = np.array([True, False, True, True])
        check_grads(lambda z: jxent.softmax(z, where=where), (x,), order, modes=["rev"])

    def test_integer_input_is_promoted(self):
        np.testing.assert_allclose(
            jxent.softmax(jnp.array([1, 2, 3])), jax.nn.softmax(jnp.array([1.0, 2.0, 3.0]))
        )


class TestLogSoftmax:
    @pytest.mark.parametrize("axis", AXES)
    def test_matches_jax_nn(self, x, axis):
        np.testing.assert_allclose(
            jxent.log_softmax(x, axis=axis), jax.nn.log_softmax(x, axis=axis), rtol=1e-6, atol=1e-6
        )

    def test_masked_entries_are_minus_inf_like_jax_nn(self, x):
        where = jax.random.bernoulli(jax.random.key(1), 0.7, x.shape)
        got = jxent.log_softmax(x, where=where)
        want = jax.nn.log_softmax(x, where=where)
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
        np.testing.assert_allclose(got[where], want[where], rtol=1e-6, atol=1e-6)

    def test_gradient_is_g_minus_p_sum_g(self, x64):
        rng = np.random.default_rng(1)
        x, g = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
        got = jax.grad(lambda z: jnp.sum(jxent.log_softmax(z) * g))(x)
        p = reference_softmax(x)
        np.testing.assert_allclose(got, g - p * g.sum(-1, keepdims=True), rtol=1e-12)

    @pytest.mark.parametrize("order", [1, 2])
    def test_check_grads_reverse_mode(self, x64, order):
        x = np.random.default_rng(2).normal(size=(3, 4))
        check_grads(lambda z: jxent.log_softmax(z, axis=0), (x,), order, modes=["rev"])

    @pytest.mark.parametrize(("dtype", "tol"), DTYPES)
    def test_returns_input_dtype(self, x, dtype, tol):
        got = jxent.log_softmax(x.astype(dtype))
        assert got.dtype == dtype
        want = np.log(reference_softmax(np.asarray(x.astype(dtype).astype(jnp.float32))))
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=tol, atol=5 * tol)
