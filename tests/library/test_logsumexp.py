"""Specification of jxent.logsumexp: jax.nn.logsumexp's contract, exact gradients, stability."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jxent

pytestmark = pytest.mark.numerics

AXES = [None, 0, 1, -1, (0, 2), (1, 2)]


def reference_logsumexp(a, axis=None, b=None, keepdims=False, where=None):
    """float64 NumPy log|Σ b·exp(a)| and its sign, by the max-shift formula."""
    a = np.asarray(a, np.float64)
    b = np.ones_like(a) if b is None else np.broadcast_to(np.asarray(b, np.float64), a.shape)
    keep = np.ones(a.shape, bool) if where is None else np.broadcast_to(where, a.shape)
    keep = keep & (b != 0)
    masked = np.where(keep, a, -np.inf)
    m = np.max(masked, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    total = np.sum(np.where(keep, b * np.exp(masked - m), 0.0), axis=axis, keepdims=True)
    with np.errstate(divide="ignore"):  # an empty sum is log 0 = -inf, as intended
        out = np.log(np.abs(total)) + m
    sign = np.sign(total)
    if not keepdims:
        out, sign = np.squeeze(out, axis=axis), np.squeeze(sign, axis=axis)
    return out, sign


@pytest.fixture
def a():
    return jax.random.normal(jax.random.key(0), (3, 4, 5)) * 3


class TestAgreementWithJaxNN:
    @pytest.mark.parametrize("axis", AXES)
    @pytest.mark.parametrize("keepdims", [False, True])
    def test_value_matches_jax_nn(self, a, axis, keepdims):
        got = jxent.logsumexp(a, axis=axis, keepdims=keepdims)
        want = jax.nn.logsumexp(a, axis=axis, keepdims=keepdims)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("axis", AXES)
    def test_gradient_matches_jax_nn(self, a, axis):
        cot = jax.random.normal(jax.random.key(1), jax.nn.logsumexp(a, axis=axis).shape)
        got = jax.grad(lambda x: jnp.sum(jxent.logsumexp(x, axis=axis) * cot))(a)
        want = jax.grad(lambda x: jnp.sum(jax.nn.logsumexp(x, axis=axis) * cot))(a)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("axis", [-1, (0, 2)])
    def test_where_matches_jax_nn(self, a, axis):
        where = jax.random.bernoulli(jax.random.key(2), 0.6, a.shape)
        got = jxent.logsumexp(a, axis=axis, where=where)
        want = jax.nn.logsumexp(a, axis=axis, where=where)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    def test_b_and_return_sign_match_jax_nn(self, a):
        b = jax.random.normal(jax.random.key(3), a.shape[-1:])
        got_lse, got_sign = jxent.logsumexp(a, axis=-1, b=b, return_sign=True)
        want_lse, want_sign = jax.nn.logsumexp(a, axis=-1, b=b, return_sign=True)
        np.testing.assert_allclose(got_lse, want_lse, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got_sign, want_sign)

    def test_negative_sum_without_return_sign_is_nan(self):
        out = jxent.logsumexp(jnp.array([0.0, 1.0]), b=jnp.array([1.0, -1.0]))
        assert np.isnan(out)

    def test_integer_input_is_promoted(self):
        out = jxent.logsumexp(jnp.array([1, 2, 3]))
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, jax.nn.logsumexp(jnp.array([1.0, 2.0, 3.0])))

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    def test_half_precision_accumulates_in_float32(self, dtype):
        a = (jax.random.normal(jax.random.key(4), (8, 4096)) * 4).astype(dtype)
        got = jxent.logsumexp(a, axis=-1)
        assert got.dtype == dtype
        want, _ = reference_logsumexp(np.asarray(a.astype(jnp.float32)), axis=-1)
        # Only the final rounding to the half type is lost.
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2**-7)


class TestFloat64Reference:
    @pytest.mark.parametrize("axis", AXES)
    def test_value_and_sign_with_b_and_where(self, x64, axis):
        rng = np.random.default_rng(0)
        a = rng.normal(size=(3, 4, 5)) * 10
        b = rng.normal(size=(3, 4, 5))
        where = rng.random((3, 4, 5)) < 0.7
        got, sign = jxent.logsumexp(a, axis=axis, b=b, where=where, return_sign=True)
        want, want_sign = reference_logsumexp(a, axis=axis, b=b, where=where)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        np.testing.assert_array_equal(sign, want_sign)

    def test_gradients_wrt_a_and_b(self, x64):
        rng = np.random.default_rng(1)
        a, b = rng.normal(size=(4, 6)), rng.uniform(0.5, 2.0, size=(4, 6))
        da, db = jax.grad(lambda a, b: jnp.sum(jxent.logsumexp(a, axis=1, b=b)), (0, 1))(a, b)
        lse, _ = reference_logsumexp(a, axis=1, b=b, keepdims=True)
        np.testing.assert_allclose(da, b * np.exp(a - lse), rtol=1e-12)
        np.testing.assert_allclose(db, np.exp(a - lse), rtol=1e-12)

    @pytest.mark.parametrize("order", [1, 2])
    def test_check_grads_reverse_mode(self, x64, order):
        rng = np.random.default_rng(2)
        a, b = rng.normal(size=(3, 5)), rng.uniform(0.5, 2.0, size=(3, 5))
        check_grads(lambda a, b: jxent.logsumexp(a, axis=-1, b=b), (a, b), order, modes=["rev"])

    def test_check_grads_with_where(self, x64):
        a = np.random.default_rng(3).normal(size=(3, 5))
        where = np.array([[1, 1, 0, 1, 0]] * 3, bool)
        check_grads(lambda a: jxent.logsumexp(a, axis=-1, where=where), (a,), 2, modes=["rev"])


class TestValidation:
    def test_axis_out_of_range_names_axis_and_rank(self):
        with pytest.raises(ValueError, match=r"axis=3 is out of range for an array of rank 2"):
            jxent.logsumexp(jnp.zeros((2, 3)), axis=3)

    def test_where_not_broadcastable_names_shapes(self):
        message = r"where of shape \(4,\) is not broadcastable.*\(2, 3\)"
        with pytest.raises(ValueError, match=message):
            jxent.logsumexp(jnp.zeros((2, 3)), axis=-1, where=jnp.ones(4, bool))

    def test_b_not_broadcastable_names_shapes(self):
        with pytest.raises(
            ValueError, match=r"b of shape \(4,\) does not broadcast against a of shape \(2, 3\)"
        ):
            jxent.logsumexp(jnp.zeros((2, 3)), b=jnp.ones(4))

    def test_non_boolean_where_is_rejected(self):
        with pytest.raises(TypeError, match="boolean mask, got dtype int32"):
            jxent.logsumexp(jnp.zeros((2, 3)), where=jnp.ones((2, 3), jnp.int32))
