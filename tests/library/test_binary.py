"""Specification tests for ``sigmoid_binary_cross_entropy``.

Reference: PyTorch's ``binary_cross_entropy_with_logits(x, t', pos_weight=pw)`` with
``t' = (1-ε)·t + ε/2``, written as float64 NumPy in ``reference.py``; and optax's
``sigmoid_binary_cross_entropy`` where the two define the same thing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from jax.test_util import check_grads
from tolerances import assert_close, compute_dtype, x64_if

import jxent

pytestmark = pytest.mark.numerics

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64]
DTYPE_IDS = ["f32", "bf16", "f16", "f64"]


def make(shape=(4, 5), dtype=jnp.float32, *, pos_weight=None, seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(3.0 * rng.normal(size=shape), dtype)
    labels = rng.random(shape)
    labels[0] = rng.integers(0, 2, size=shape[1:])  # hard 0/1 labels too
    labels = jnp.asarray(labels, dtype)
    pw = None
    if pos_weight is not None:
        pw = jnp.asarray(rng.uniform(0.5, 3.0, size=pos_weight), compute_dtype(dtype))
    cotangent = rng.uniform(0.5, 1.5, size=shape)
    return logits, labels, pw, cotangent


def f64(x):
    return None if x is None else np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def check(logits, labels, pw, cotangent, reduction, smoothing=0.0, dtype=jnp.float32):
    def f(x, t, w):
        loss = jxent.sigmoid_binary_cross_entropy(
            x, t, pos_weight=w, label_smoothing=smoothing, reduction=reduction
        )
        obj = jnp.sum(loss * jnp.asarray(cotangent, loss.dtype)) if reduction == "none" else loss
        return obj, loss

    argnums = (0, 1, 2) if pw is not None else (0, 1)
    (_, loss), grads = jax.jit(jax.value_and_grad(f, argnums, has_aux=True))(logits, labels, pw)
    to64 = (lambda a: np.asarray(a, np.float64)) if dtype == jnp.float64 else f64
    expected = ref.sigmoid_binary_cross_entropy(
        to64(logits),
        to64(labels),
        pos_weight=None if pw is None else to64(pw),
        label_smoothing=smoothing,
        reduction=reduction,
        cotangent=cotangent,
    )
    assert loss.dtype == compute_dtype(dtype)
    assert_close(loss, expected.value, dtype)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    assert_close(grads[0], expected.grads["logits"], dtype, "grad")
    assert_close(grads[1], expected.grads["labels"], dtype, "grad")
    if pw is not None:
        assert grads[2].shape == pw.shape and grads[2].dtype == pw.dtype
        assert_close(grads[2], expected.grads["pos_weight"], dtype, "grad")


class TestSigmoidBinaryCrossEntropy:
    """``pw·t'·softplus(-x) + (1-t')·softplus(x)``; the mean averages every element."""

    @pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
    @pytest.mark.parametrize(
        "pos_weight", [None, (5,), (4, 5), (4, 1), ()], ids=["none", "C", "full", "col", "scalar"]
    )
    def test_value_and_gradients_match_reference(self, pos_weight, reduction):
        """Loss and gradients w.r.t. logits, labels and pos_weight (summed back to its own
        shape when broadcast) equal the reference."""
        check(*make(pos_weight=pos_weight), reduction)

    @pytest.mark.parametrize("smoothing", [0.1, 1.0])
    def test_label_smoothing_is_the_two_class_rule(self, smoothing):
        """t' = (1-ε)·t + ε/2 (ε = 1 makes every target 1/2)."""
        check(*make(pos_weight=(5,), seed=1), "mean", smoothing=smoothing)

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    def test_dtypes(self, dtype):
        """float32 losses for half inputs (float64 for float64); gradients in input dtype."""
        with x64_if(dtype):
            check(*make(dtype=dtype, pos_weight=(5,), seed=2), "none", 0.1, dtype)

    def test_matches_optax(self):
        """Without pos_weight and smoothing this is optax's loss, in value and gradient."""
        logits, labels, _, _ = make(seed=3)
        ours = jxent.sigmoid_binary_cross_entropy(logits, labels)
        theirs = optax.sigmoid_binary_cross_entropy(logits, labels)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
        g_ours = jax.jit(
            jax.grad(lambda x, t: jxent.sigmoid_binary_cross_entropy(x, t, reduction="sum"))
        )(logits, labels)
        g_theirs = jax.jit(
            jax.grad(lambda x, t: jnp.sum(optax.sigmoid_binary_cross_entropy(x, t)))
        )(logits, labels)
        np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-5, atol=1e-6)

    def test_huge_logits_give_finite_exact_losses(self):
        """At x = ±3e38 the loss is the exact softplus (≈|x| or 0), never inf or NaN, and
        the gradient is exact (σ saturates to 0 or 1)."""
        x = jnp.array([3e38, -3e38, 3e38, -3e38, 3e38], jnp.float32)
        t = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5], jnp.float32)
        per = jxent.sigmoid_binary_cross_entropy(x, t)
        grad = jax.grad(lambda x: jnp.sum(jxent.sigmoid_binary_cross_entropy(x, t)))(x)
        assert np.all(np.isfinite(np.asarray(per)))
        expected = ref.sigmoid_binary_cross_entropy(f64(x), f64(t))
        np.testing.assert_allclose(per, expected.value, rtol=1e-6)
        np.testing.assert_allclose(grad, expected.grads["logits"], rtol=1e-6)

    def test_integer_labels_are_converted(self):
        logits, _, _, _ = make(seed=4)
        labels = jnp.asarray(np.random.default_rng(4).integers(0, 2, size=(4, 5)))
        expected = ref.sigmoid_binary_cross_entropy(f64(logits), np.asarray(labels))
        assert_close(jxent.sigmoid_binary_cross_entropy(logits, labels), expected.value)

    def test_second_order_gradients_in_float64(self):
        with jax.enable_x64(True):
            logits, labels, pw, _ = make((3, 4), jnp.float64, pos_weight=(4,), seed=5)

            @jax.jit
            def f(x, t, w):
                return jxent.sigmoid_binary_cross_entropy(
                    x, t, pos_weight=w, label_smoothing=0.1, reduction="mean"
                )

            check_grads(f, (logits, labels, pw), order=2, modes=["rev"])

    def test_rejects_labels_of_another_shape(self):
        with pytest.raises(ValueError, match=r"shape \(2, 3\), got labels of shape \(3,\)"):
            jxent.sigmoid_binary_cross_entropy(jnp.zeros((2, 3)), jnp.zeros(3))

    def test_rejects_unbroadcastable_pos_weight(self):
        with pytest.raises(ValueError, match=r"pos_weight of shape \(4,\).*\(2, 3\)"):
            jxent.sigmoid_binary_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), pos_weight=jnp.ones(4)
            )

    def test_rejects_pos_weight_larger_than_logits(self):
        with pytest.raises(ValueError, match=r"pos_weight of shape \(5, 2, 3\)"):
            jxent.sigmoid_binary_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), pos_weight=jnp.ones((5, 2, 3))
            )

    def test_rejects_unknown_reduction(self):
        with pytest.raises(ValueError, match=r"reduction must be one of.*'total'"):
            jxent.sigmoid_binary_cross_entropy(jnp.zeros(3), jnp.zeros(3), reduction="total")

    def test_rejects_label_smoothing_outside_unit_interval(self):
        with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\], got -0\.2"):
            jxent.sigmoid_binary_cross_entropy(jnp.zeros(3), jnp.zeros(3), label_smoothing=-0.2)

    def test_rejects_integer_logits(self):
        with pytest.raises(TypeError, match="logits must have a floating dtype, got int32"):
            jxent.sigmoid_binary_cross_entropy(jnp.zeros(3, jnp.int32), jnp.zeros(3))
