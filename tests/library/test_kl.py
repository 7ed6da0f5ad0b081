"""Specification tests for ``kl_divergence`` and ``kl_divergence_with_log_targets``.

Reference: ``Σ_c t_c·(log t_c - lp_c)`` with ``0·log 0 = 0`` and ``Σ_c e^{lt_c}·(lt_c - lp_c)``
as float64 NumPy in ``reference.py``; and optax's functions of the same names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from jax.test_util import check_grads
from tolerances import as64, assert_close, compute_dtype, x64_if

import jxent

pytestmark = pytest.mark.numerics

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float64]
DTYPE_IDS = ["f32", "bf16", "f64"]


def make(shape=(4, 6), axis=-1, dtype=jnp.float32, seed=0, zeros=True):
    """Log-predictions and targets (probabilities) normalised over ``axis``."""
    rng = np.random.default_rng(seed)
    rows = ref.Rows(shape, axis)
    n, c = int(np.prod(rows.batch_shape)), rows.num_classes
    lp = rows.from_rows(ref.log_softmax(rng.normal(size=(n, c))))
    t = rng.dirichlet(np.ones(c), size=n)
    if zeros:
        t[0, :2] = 0.0  # 0·log 0 terms
        t[0] /= t[0].sum()
    t = rows.from_rows(t)
    return jnp.asarray(lp, dtype), jnp.asarray(t, dtype), rows.axes


CASES = {"last": ((4, 6), -1), "middle": ((3, 5, 2), 1), "tuple": ((2, 3, 4), (1, 2))}


def check_against_reference(fn, reference, lp, t, axes, where, target_name):
    """Value and both gradients of ``Σ cot·fn(lp, t)`` (a random per-example cotangent)
    against the float64 ``reference``."""
    cot = np.random.default_rng(3).uniform(0.5, 1.5, size=ref.Rows(lp.shape, axes).batch_shape)

    def f(lp, t):
        loss = fn(lp, t, axes, where)
        return jnp.sum(loss * cot), loss

    (_, loss), grads = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(lp, t)
    expected = reference(as64(lp), as64(t), axis=axes, where=where, cotangent=cot)
    assert_close(loss, expected.value)
    assert_close(grads[0], expected.grads["log_predictions"], kind="grad")
    assert_close(grads[1], expected.grads[target_name], kind="grad")


class TestKLDivergence:
    """``Σ t·(log t - lp)``, ``0·log 0 = 0``; ``d/dlp = -t``, ``d/dt = log t + 1 - lp``."""

    @pytest.mark.parametrize("layout", list(CASES))
    @pytest.mark.parametrize("masked", [False, True])
    def test_value_and_gradients_match_reference(self, layout, masked):
        shape, axis = CASES[layout]
        lp, t, axes = make(shape, axis, seed=1)
        where = np.random.default_rng(2).random(shape) < 0.7 if masked else None
        check_against_reference(
            jxent.kl_divergence, ref.kl_divergence, lp, t, axes, where, "targets"
        )

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_dtypes(self, dtype):
        with x64_if(dtype):
            lp, t, _ = make(dtype=dtype, seed=4)
            loss, grads = jax.value_and_grad(
                lambda a, b: jnp.sum(jxent.kl_divergence(a, b)), (0, 1)
            )(lp, t)
            expected = ref.kl_divergence(as64(lp), as64(t))
            assert jxent.kl_divergence(lp, t).dtype == compute_dtype(dtype)
            assert grads[0].dtype == dtype and grads[1].dtype == dtype
            assert_close(loss, expected.value.sum(), dtype)
            assert_close(grads[0], expected.grads["log_predictions"], dtype, "grad")
            assert_close(grads[1], expected.grads["targets"], dtype, "grad")

    def test_matches_optax(self):
        """Value and gradient w.r.t. log-predictions equal optax's (strictly positive
        targets, so optax's own gradient is defined everywhere)."""
        lp, t, _ = make(seed=5, zeros=False)
        np.testing.assert_allclose(
            jxent.kl_divergence(lp, t), optax.losses.kl_divergence(lp, t), rtol=1e-5, atol=1e-6
        )
        for argnum in (0, 1):
            g_ours = jax.grad(lambda a, b: jnp.sum(jxent.kl_divergence(a, b)), argnum)(lp, t)
            g_theirs = jax.grad(lambda a, b: jnp.sum(optax.losses.kl_divergence(a, b)), argnum)(
                lp, t
            )
            np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-5, atol=1e-6)

    def test_zero_target_at_minus_infinity_contributes_zero(self):
        """A class with zero target mass contributes 0 even where lp = -inf (optax: NaN)."""
        lp = jnp.array([[0.0, -jnp.inf]])
        t = jnp.array([[1.0, 0.0]])
        np.testing.assert_array_equal(jxent.kl_divergence(lp, t), [0.0])
        g = jax.grad(lambda a: jnp.sum(jxent.kl_divergence(a, t)))(lp)
        np.testing.assert_array_equal(g, [[-1.0, 0.0]])

    def test_identical_distributions_have_zero_divergence(self):
        _, t, _ = make(seed=6)
        np.testing.assert_allclose(jxent.kl_divergence(jnp.log(t), t), 0.0, atol=1e-6)

    def test_second_order_gradients_in_float64(self):
        with jax.enable_x64(True):
            lp, t, _ = make((3, 4), dtype=jnp.float64, seed=7, zeros=False)
            check_grads(
                jax.jit(lambda a, b: jxent.kl_divergence(a, b)), (lp, t), order=2, modes=["rev"]
            )

    def test_rejects_mismatched_shapes(self):
        with pytest.raises(ValueError, match=r"targets of shape \(2, 4\).*\(2, 3\)"):
            jxent.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 4)))

    def test_rejects_integer_inputs(self):
        with pytest.raises(TypeError, match="log_predictions must have a floating dtype"):
            jxent.kl_divergence(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))


class TestKLDivergenceWithLogTargets:
    """``Σ e^{lt}·(lt - lp)``; ``lt = -inf`` entries contribute 0 to value and gradient."""

    @pytest.mark.parametrize("layout", list(CASES))
    @pytest.mark.parametrize("masked", [False, True])
    def test_value_and_gradients_match_reference(self, layout, masked):
        shape, axis = CASES[layout]
        lp, t, axes = make(shape, axis, seed=8, zeros=False)
        lt = jnp.log(t)
        where = np.random.default_rng(9).random(shape) < 0.7 if masked else None
        check_against_reference(
            jxent.kl_divergence_with_log_targets,
            ref.kl_divergence_with_log_targets,
            lp,
            lt,
            axes,
            where,
            "log_targets",
        )

    def test_matches_optax(self):
        lp, t, _ = make(seed=10, zeros=False)
        lt = jnp.log(t)
        np.testing.assert_allclose(
            jxent.kl_divergence_with_log_targets(lp, lt),
            optax.losses.kl_divergence_with_log_targets(lp, lt),
            rtol=1e-5,
            atol=1e-6,
        )
        for argnum in (0, 1):
            g_ours = jax.grad(
                lambda a, b: jnp.sum(jxent.kl_divergence_with_log_targets(a, b)), argnum
            )(lp, lt)
            g_theirs = jax.grad(
                lambda a, b: jnp.sum(optax.losses.kl_divergence_with_log_targets(a, b)), argnum
            )(lp, lt)
            np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-5, atol=1e-6)

    def test_minus_infinity_log_target_contributes_zero(self):
        lp = jnp.array([[-0.5, -jnp.inf, -1.0]])
        lt = jnp.array([[-0.1, -jnp.inf, -jnp.inf]])
        value, grads = jax.value_and_grad(
            lambda a, b: jnp.sum(jxent.kl_divergence_with_log_targets(a, b)), (0, 1)
        )(lp, lt)
        expected = ref.kl_divergence_with_log_targets(np.asarray(lp), np.asarray(lt))
        np.testing.assert_allclose(value, expected.value.sum(), rtol=1e-6)
        assert np.all(np.isfinite(np.asarray(grads[1])))
        np.testing.assert_allclose(grads[1], expected.grads["log_targets"], rtol=1e-6)

    def test_agrees_with_kl_divergence_on_probabilities(self):
        lp, t, _ = make(seed=11, zeros=False)
        np.testing.assert_allclose(
            jxent.kl_divergence_with_log_targets(lp, jnp.log(t)),
            jxent.kl_divergence(lp, t),
            rtol=1e-5,
            atol=1e-6,
        )

    def test_second_order_gradients_in_float64(self):
        with jax.enable_x64(True):
            lp, t, _ = make((3, 4), dtype=jnp.float64, seed=12, zeros=False)
            check_grads(
                jax.jit(lambda a, b: jxent.kl_divergence_with_log_targets(a, b)),
                (lp, jnp.log(t)),
                order=2,
                modes=["rev"],
            )

    def test_rejects_mismatched_shapes(self):
        with pytest.raises(ValueError, match=r"log_targets of shape \(3,\).*\(2, 3\)"):
            jxent.kl_divergence_with_log_targets(jnp.zeros((2, 3)), jnp.zeros(3))
