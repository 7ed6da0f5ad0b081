"""Regression tests for label semantics shared by the integer CE, ``nll_loss`` and the fused
loss (one resolution path, ``jxent._labels``): invalid labels are never hidden by a mean,
unsigned labels never wrap, tuple class axes flatten in the order given (as optax), and
``cross_entropy`` refuses floating labels it would have to guess about."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jxent

pytestmark = pytest.mark.numerics

LOGITS = jnp.array([[1.0, 2.0, 3.0, 0.5], [0.0, -1.0, 2.0, 1.0], [0.3, 0.2, 0.1, 0.0]])
X = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
W = jnp.array([[1.0, -1.0, 0.0, 0.5], [0.5, 0.0, 1.0, -0.5]])

# name -> fn(labels, reduction, **options) -> loss
INTEGER_LOSSES = {
    "cross_entropy": lambda y, r, **k: jxent.cross_entropy(LOGITS, y, reduction=r, **k),
    "integer_ce": lambda y, r, **k: jxent.softmax_cross_entropy_with_integer_labels(
        LOGITS, y, reduction=r, **k
    ),
    "nll_loss": lambda y, r, **k: jxent.nll_loss(jxent.log_softmax(LOGITS), y, reduction=r, **k),
    "fused": lambda y, r, **k: jxent.fused_linear_cross_entropy(X, W, y, reduction=r, **k),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", INTEGER_LOSSES)
class TestInvalidLabelsAreNeverHiddenByAMean:
    def test_every_label_invalid(self, name, reduction):
        """Was 0.0 (nll_loss: with gradient 0, fully silent): an evaluation loop with
        batch 1 reported loss 0 for a bad label."""
        loss = INTEGER_LOSSES[name](jnp.array([4, 9, 7]), reduction)
        assert np.isnan(loss)

    def test_invalid_label_beside_ignored_ones(self, name, reduction):
        labels = jnp.array([-100, 7, -100])
        assert np.isnan(INTEGER_LOSSES[name](labels, reduction, ignore_index=-100))

    def test_invalid_label_with_zero_class_weights(self, name, reduction):
        weights = jnp.zeros(4)
        loss = INTEGER_LOSSES[name](jnp.array([0, 9, 1]), reduction, class_weights=weights)
        assert np.isnan(loss)

    def test_nothing_counts_and_nothing_is_invalid_gives_zero(self, name, reduction):
        loss = INTEGER_LOSSES[name](jnp.array([-100, -100, -100]), reduction, ignore_index=-100)
        assert float(loss) == 0.0


@pytest.mark.parametrize("loss", [jxent.cross_entropy, jxent.nll_loss], ids=["ce", "nll"])
def test_gradient_of_a_batch_with_an_invalid_label_is_nan(loss):
    grad = jax.grad(lambda x: loss(x, jnp.array([0, 9, 1]), reduction="mean"))(LOGITS)
    assert np.isnan(grad[1]).all()


@pytest.mark.parametrize("dtype", [jnp.uint32, jnp.uint8, jnp.uint16])
@pytest.mark.parametrize("name", INTEGER_LOSSES)
def test_unsigned_labels_never_wrap(name, dtype):
    """uint32 2**32 - 1 used to become -1: ignored with ignore_index=-1, and passed
    check_labels. Now it is out of range, whatever ignore_index is."""
    big = np.iinfo(np.dtype(dtype)).max
    labels = jnp.array([0, big, 2], dtype)
    for ignore in (-1, None):
        per_example = INTEGER_LOSSES[name](labels, "none", ignore_index=ignore)
        per_example = np.asarray(per_example)
        assert np.isnan(per_example[1]) and np.isfinite(per_example[[0, 2]]).all()
    valid = INTEGER_LOSSES[name](jnp.array([0, 3, 2], dtype), "none")
    signed = INTEGER_LOSSES[name](jnp.array([0, 3, 2]), "none")
    np.testing.assert_allclose(valid, signed, rtol=1e-6)


def test_check_labels_reports_the_unsigned_value():
    labels = jnp.array([0, 2**32 - 1, 1], jnp.uint32)
    with pytest.raises(ValueError, match="label 4294967295 at flat index 1"):
        jxent.cross_entropy(LOGITS, labels, ignore_index=-1, check_labels=True)


@pytest.mark.slow
@pytest.mark.parametrize("axis", [(3, 2), (2, 3), (-1, -2), (1, 3)])
def test_tuple_axes_flatten_in_the_order_given_as_optax(axis):
    """optax's own test_axes: axis=(3, 2) makes axis 3 the major one."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
    batch_shape = tuple(d for i, d in enumerate(x.shape) if i not in {a % 4 for a in axis})
    num_classes = x.shape[axis[0]] * x.shape[axis[1]]
    y = jax.random.randint(jax.random.key(1), batch_shape, 0, num_classes)
    got = jxent.softmax_cross_entropy_with_integer_labels(x, y, axis=axis)
    want = optax.softmax_cross_entropy_with_integer_labels(x, y, axis=axis)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(jxent.softmax_cross_entropy_with_integer_labels(x, y, axis)))(x),
        jax.grad(lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, y, axis)))(x),
        atol=1e-6,
    )


def test_tuple_axes_order_with_class_weights():
    """A class weight belongs to the flat class id in the given order."""
    x = jax.random.normal(jax.random.key(2), (3, 2, 4))
    y = jnp.array([1, 6, 3])
    weights = jnp.arange(1.0, 9.0)
    flat = jnp.transpose(x, (0, 2, 1)).reshape(3, 8)  # axis 2 major, axis 1 minor
    np.testing.assert_allclose(
        jxent.cross_entropy(x, y, axis=(2, 1), class_weights=weights),
        jxent.cross_entropy(flat, y, class_weights=weights),
        rtol=1e-6,
    )


class TestCrossEntropyRefusesAmbiguousFloatLabels:
    def test_class_ids_given_as_floats(self):
        """Was 11.90 against 0.609 for the same ids as ints (read as probabilities)."""
        with pytest.raises(ValueError, match=r"must have the logits' shape \(3, 4\).*integers"):
            jxent.cross_entropy(LOGITS, jnp.array([0.0, 2.0, 1.0]))

    def test_broadcastable_probabilities(self):
        with pytest.raises(ValueError, match=r"jxent\.softmax_cross_entropy"):
            jxent.cross_entropy(LOGITS, jnp.full((4,), 0.25))

    def test_probabilities_of_the_logits_shape_still_work(self):
        t = jax.nn.softmax(-LOGITS)
        np.testing.assert_allclose(
            jxent.cross_entropy(LOGITS, t),
            jnp.mean(optax.softmax_cross_entropy(LOGITS, t)),
            rtol=1e-6,
        )

    def test_softmax_cross_entropy_keeps_optax_broadcasting(self):
        t = jnp.full((4,), 0.25)
        np.testing.assert_allclose(
            jxent.softmax_cross_entropy(LOGITS, t),
            optax.softmax_cross_entropy(LOGITS, jnp.broadcast_to(t, LOGITS.shape)),
            rtol=1e-6,
        )


def test_python_lists_as_labels():
    np.testing.assert_allclose(
        jxent.cross_entropy(LOGITS, [0, 1, 2]),
        jxent.cross_entropy(LOGITS, jnp.array([0, 1, 2])),
        rtol=1e-7,
    )


def test_fused_loss_with_zero_classes_is_a_clear_error():
    """Was IndexError: Cannot do a non-empty jnp.take()."""
    with pytest.raises(ValueError, match=r"w must have at least one class .* \(2, 0\)"):
        jxent.fused_linear_cross_entropy(X, jnp.zeros((2, 0)), jnp.array([0, 0, 0]))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_zero_classes_make_every_reduction_nan(reduction):
    loss = jxent.cross_entropy(jnp.zeros((3, 0)), jnp.array([0, 0, 0]), reduction=reduction)
    assert np.isnan(loss).all()


STATIC_OPTIONS = {
    "label_smoothing": lambda v: jxent.cross_entropy(LOGITS, [0, 1, 2], label_smoothing=v),
    "z_loss": lambda v: jxent.softmax_cross_entropy(LOGITS, jax.nn.softmax(LOGITS), z_loss=v),
    "ignore_index": lambda v: jxent.nll_loss(LOGITS, [0, 1, 2], ignore_index=v),
    "logit_softcap": lambda v: jxent.fused_linear_cross_entropy(X, W, [0, 1, 2], logit_softcap=v),
    "axis": lambda v: jxent.softmax(LOGITS, axis=v),
    # Positional static options are checked too (the positional-or-keyword ``axis``, and
    # ``keepdims`` / ``return_sign`` of logsumexp).
    "axis (positional)": lambda v: jxent.log_softmax(LOGITS, v),
    "keepdims": lambda v: jxent.logsumexp(LOGITS, -1, None, v),
    "return_sign": lambda v: jxent.logsumexp(LOGITS, -1, None, False, v),
}


@pytest.mark.parametrize("name", STATIC_OPTIONS)
@pytest.mark.parametrize("value", [jnp.float32(0.5), np.array([1]), [1]], ids=["jax", "np", "list"])
def test_static_option_given_as_an_array_gets_jxents_error(name, value):
    """Was JAX's "Non-hashable static arguments are not supported"."""
    with pytest.raises(TypeError, match=rf"^{name.split()[0]} must be a static Python value"):
        STATIC_OPTIONS[name](value)
