"""Property tests (hypothesis): invariances and identities that hold for every input.

Inputs are float32 arrays of small shapes with entries in a sane range; each property is
checked against arithmetic identities or the float64 reference, never against jxent itself.
"""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

import jxent

pytestmark = pytest.mark.numerics

FAST = settings(max_examples=25, deadline=None)
# Op-by-op execution compiles every primitive: a few examples suffice there.
EAGER = settings(max_examples=5, deadline=None)

# Shapes [N, C] with N, C in small ranges; fixed few sizes keep the number of compiles low.
SHAPES = st.sampled_from([(1, 2), (3, 5), (4, 8)])
FLOATS = st.floats(-20.0, 20.0, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def logits_and_labels(draw, shapes=SHAPES):
    shape = draw(shapes)
    x = draw(hnp.arrays(np.float32, shape, elements=FLOATS))
    y = draw(hnp.arrays(np.int32, shape[:1], elements=st.integers(0, shape[1] - 1)))
    return x, y


@st.composite
def logits_and_probs(draw, shapes=SHAPES):
    shape = draw(shapes)
    x = draw(hnp.arrays(np.float32, shape, elements=FLOATS))
    raw = draw(hnp.arrays(np.float32, shape, elements=st.floats(0.0, 1.0, width=32)))
    raw[:, 0] += 1e-3  # rows never all zero
    return x, (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)


SHIFTS = st.floats(-1e3, 1e3, width=32, allow_nan=False)


@functools.cache
def _ce_grad(smoothing):
    return jax.jit(
        jax.grad(
            lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
                x, y, label_smoothing=smoothing, reduction="sum"
            )
        )
    )


class TestShiftInvariance:
    """Adding a constant to a row of logits changes neither probabilities nor losses."""

    @FAST
    @given(logits_and_labels(), SHIFTS)
    def test_cross_entropy(self, xy, k):
        x, y = xy
        shifted = (x.astype(np.float64) + k).astype(np.float32)
        base = jxent.softmax_cross_entropy_with_integer_labels(x, y)
        moved = jxent.softmax_cross_entropy_with_integer_labels(shifted, y)
        # The shift itself is rounded in float32: allow |k|·eps of slack per logit.
        slack = 4 * np.finfo(np.float32).eps * (abs(k) + np.abs(x).max() + 1)
        np.testing.assert_allclose(moved, base, rtol=1e-5, atol=slack)

    @FAST
    @given(logits_and_labels(), SHIFTS)
    def test_softmax_and_log_softmax(self, xy, k):
        x, _ = xy
        shifted = (x.astype(np.float64) + k).astype(np.float32)
        slack = 4 * np.finfo(np.float32).eps * (abs(k) + np.abs(x).max() + 1)
        np.testing.assert_allclose(jxent.softmax(shifted), jxent.softmax(x), atol=slack * 2)
        np.testing.assert_allclose(
            jxent.log_softmax(shifted), jxent.log_softmax(x), rtol=1e-5, atol=slack * 2
        )


class TestNormalisation:
    @FAST
    @given(logits_and_labels())
    def test_softmax_sums_to_one(self, xy):
        x, _ = xy
        np.testing.assert_allclose(np.sum(jxent.softmax(x), axis=-1), 1.0, rtol=1e-5)

    @FAST
    @given(logits_and_labels())
    def test_log_softmax_is_log_of_softmax_where_not_tiny(self, xy):
        x, _ = xy
        p = np.asarray(jxent.softmax(x), np.float64)
        big = p > 1e-30
        np.testing.assert_allclose(
            np.asarray(jxent.log_softmax(x))[big], np.log(p[big]), rtol=1e-5, atol=1e-5
        )

    @FAST
    @given(logits_and_labels())
    def test_softmax_matches_reference(self, xy):
        x, _ = xy
        np.testing.assert_allclose(jxent.softmax(x), ref.softmax(x), rtol=1e-5, atol=1e-7)


class TestGradientIdentities:
    """The CE gradient is ``softmax - target``: it sums to 0 over the classes."""

    @FAST
    @given(logits_and_labels(), st.sampled_from([0.0, 0.1]))
    def test_integer_ce_gradient_sums_to_zero(self, xy, smoothing):
        x, y = xy
        g = np.asarray(_ce_grad(smoothing)(x, y), np.float64)
        np.testing.assert_allclose(g.sum(axis=-1), 0.0, atol=1e-5)
        expected = ref.integer_cross_entropy(x, y, label_smoothing=smoothing, reduction="sum")
        np.testing.assert_allclose(g, expected.grads["logits"], rtol=1e-4, atol=1e-6)

    @FAST
    @given(logits_and_probs())
    def test_dense_ce_gradient_is_softmax_minus_target(self, xt):
        x, t = xt
        g = jax.grad(lambda a: jxent.softmax_cross_entropy(a, t, reduction="sum"))(x)
        g = np.asarray(g, np.float64)
        np.testing.assert_allclose(g.sum(axis=-1), 0.0, atol=1e-5)
        np.testing.assert_allclose(g, ref.softmax(x) - t, atol=1e-5)


class TestTransformations:
    """jit, vmap and per-example gradients agree with the plain batched call."""

    @EAGER
    @given(logits_and_labels(st.just((3, 5))))
    def test_jit_equals_eager(self, xy):
        x, y = xy

        def f(a, b):
            return jxent.softmax_cross_entropy_with_integer_labels(
                a, b, label_smoothing=0.1, z_loss=1e-3
            )

        with jax.disable_jit():
            eager = f(x, y)
        np.testing.assert_allclose(jax.jit(f)(x, y), eager, rtol=1e-6, atol=1e-6)

    @FAST
    @given(logits_and_labels())
    def test_vmap_over_batch_equals_batched_call(self, xy):
        x, y = xy
        batched = jxent.softmax_cross_entropy_with_integer_labels(x, y)
        mapped = jax.vmap(jxent.softmax_cross_entropy_with_integer_labels)(x, y)
        np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            batched, ref.integer_cross_entropy(x, y).value, rtol=1e-5, atol=1e-5
        )

    @FAST
    @given(logits_and_labels())
    def test_per_example_gradients_are_rows_of_batch_gradient(self, xy):
        x, y = xy
        per_example = jax.vmap(jax.grad(jxent.softmax_cross_entropy_with_integer_labels))(x, y)
        full = _ce_grad(0.0)(x, y)
        np.testing.assert_allclose(per_example, full, rtol=1e-6, atol=1e-7)

    @FAST
    @given(logits_and_probs())
    def test_vmap_dense_and_kl(self, xt):
        x, t = xt
        np.testing.assert_allclose(
            jax.vmap(jxent.softmax_cross_entropy)(x, t),
            jxent.softmax_cross_entropy(x, t),
            rtol=1e-6,
            atol=1e-6,
        )
        lp = jxent.log_softmax(x)
        np.testing.assert_allclose(
            jax.vmap(jxent.kl_divergence)(lp, t), jxent.kl_divergence(lp, t), rtol=1e-6, atol=1e-6
        )


# ----------------------------------------------------------------------------- vs jax.nn

NORMALISERS = {
    "logsumexp": (jxent.logsumexp, jax.nn.logsumexp),
    "softmax": (jxent.softmax, jax.nn.softmax),
    "log_softmax": (jxent.log_softmax, jax.nn.log_softmax),
}
# Half precision: jax.nn computes in the input dtype, jxent accumulates in float32.
TOLERANCE = {"float16": 2e-2, "bfloat16": 3e-2, "float32": 2e-6, "float64": 1e-13}


@st.composite
def normaliser_cases(draw):
    """A normaliser call with random shape (dims of size 0 to 3), axis (None, an int or a
    tuple in any order), ``where`` broadcast up to the input, ``b`` broadcast both ways
    against it (logsumexp), a float dtype, and x64 on or off."""
    name = draw(st.sampled_from(sorted(NORMALISERS)))
    x64 = draw(st.booleans())
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"] + ["float64"] * x64))
    shape = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=3)))
    a = draw(hnp.arrays(np.float32, shape, elements=st.floats(-5.0, 5.0, width=32)))
    full = shape
    b = None
    if name == "logsumexp" and draw(st.booleans()):
        # b may expand a's size-1 dims (and a may expand b's), and may have fewer dims.
        b_shape = tuple(draw(st.sampled_from([1, 2] if d == 1 else [d, 1])) for d in shape)
        b_shape = b_shape[draw(st.integers(0, len(b_shape))) :]
        values = st.sampled_from([0.0, 0.5, 1.0, 2.0])
        b = draw(hnp.arrays(np.float32, b_shape, elements=values))
        full = np.broadcast_shapes(shape, b_shape)
    where = None
    if draw(st.booleans()):
        where_shape = tuple(draw(st.sampled_from([d, 1])) for d in full)
        where = draw(hnp.arrays(np.bool_, where_shape))
    ndim = len(full)
    axis_choices = [st.none()]
    if ndim:
        axis_choices.append(st.integers(-ndim, ndim - 1))
        axis_choices.append(
            st.permutations(range(ndim)).flatmap(
                lambda p: st.integers(1, ndim).map(lambda k: tuple(p[:k]))
            )
        )
    axis = draw(st.one_of(axis_choices))
    return name, x64, dtype, a, b, where, axis


class TestNormalisersMatchJaxNn:
    """Every normaliser equals ``jax.nn``'s in value, shape and dtype over random calls."""

    @pytest.mark.slow
    @settings(max_examples=40, deadline=None)
    @given(normaliser_cases())
    def test_value_shape_and_dtype(self, case):
        name, x64, dtype, a, b, where, axis = case
        ours, theirs = NORMALISERS[name]
        with jax.enable_x64(x64):
            kwargs = {"axis": axis}
            if where is not None:
                kwargs["where"] = jnp.asarray(where)
            if b is not None:
                kwargs["b"] = jnp.asarray(b, dtype)
            x = jnp.asarray(a, dtype)
            got, expected = ours(x, **kwargs), theirs(x, **kwargs)
            assert got.shape == expected.shape and got.dtype == expected.dtype
            tol = TOLERANCE[dtype]
            np.testing.assert_allclose(
                np.asarray(got, np.float64), np.asarray(expected, np.float64), rtol=tol, atol=tol
            )
