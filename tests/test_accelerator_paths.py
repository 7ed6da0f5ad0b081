"""The GPU and TPU code paths, run on the CPU.

jxent picks some kernels per platform at lowering time (``lax.platform_dependent``): on
GPU and TPU the normaliser comes from one online (max, sum-of-exponentials) reduction and
the integer CE picks the target logit inside it; on GPU long rows are reduced in blocks.
The CI machine has no accelerator, so these tests make jxent take those branches on the
CPU (``jxent._common.simulated_platform``) and compare values and gradients with the CPU
path, which the rest of the suite checks against independent references, and with
jax.nn / optax directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jxent
from jxent import _common

PLATFORMS = ("cuda", "tpu")


def _run(platform, fn, *args):
    """``fn(*args)`` traced for ``platform`` (None: the real CPU path), caches cleared."""
    jax.clear_caches()
    _common.simulated_platform = platform
    try:
        return jax.tree.map(np.asarray, fn(*args))
    finally:
        _common.simulated_platform = None
        jax.clear_caches()


def _assert_same(actual, expected, rtol=1e-4, atol=2e-6):
    """Equal up to float32 summation order (bfloat16 results: up to one bf16 rounding)."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        half = a.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            a.astype(np.float64),
            e.astype(np.float64),
            1e-2 if half else rtol,
            1e-3 if half else atol,
        )


def _logits(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0, 3, shape), dtype)


def _degenerate_logits(classes):
    """Rows: ordinary; one +inf; all -inf but one; ties at a huge value; a NaN."""
    x = np.array(_logits((5, classes)))  # a writable copy
    x[1, 3] = np.inf
    x[2, :] = -np.inf
    x[2, 1] = 0.5
    x[3, :] = 3e38
    x[4, 2] = np.nan
    return jnp.asarray(x)


def _int_ce_value_and_grad(x, y, **kw):
    def loss(x):
        return jnp.sum(jxent.softmax_cross_entropy_with_integer_labels(x, y, **kw))

    return jax.value_and_grad(loss)(x)


# 40000 classes: the GPU path reduces 4 blocks of 10000, the TPU path whole rows.
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("classes", [7, 40000])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_integer_ce_matches_cpu_path_and_optax(platform, classes, dtype):
    x = _logits((6, classes), dtype)
    y = jnp.asarray(np.random.default_rng(1).integers(0, classes, 6), jnp.int32)
    got = _run(platform, _int_ce_value_and_grad, x, y)
    _assert_same(got, _run(None, _int_ce_value_and_grad, x, y))
    ref = jax.value_and_grad(
        lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), y))
    )(x)
    tol = 1e-4 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(got[0], ref[0], rtol=tol)
    np.testing.assert_allclose(got[1].astype(np.float32), ref[1], rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1, "z_loss": 1e-3},
        {"ignore_index": 2, "class_weights": jnp.linspace(0.5, 2.0, 9)},
        {"where": jnp.arange(9) != 4},
    ],
)
def test_integer_ce_options_match_cpu_path(platform, options):
    x = _logits((8, 9))
    y = jnp.asarray([0, 2, 4, 8, 3, 2, 1, 9], jnp.int32)  # 2 ignored, 4 masked, 9 invalid

    def run(x):
        return _int_ce_value_and_grad(x, y, **options)

    _assert_same(_run(platform, run, x), _run(None, run, x))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("classes", [6, 40000])
def test_degenerate_rows_match_cpu_path(platform, classes):
    """+inf, all -inf but one, ties at 3e38 and NaN rows: value and gradient as on CPU."""
    x = _degenerate_logits(classes)
    y = jnp.asarray([0, 3, 1, 2, 0], jnp.int32)

    def everything(x):
        lse, lse_grad = jax.value_and_grad(lambda x: jnp.sum(jxent.logsumexp(x, axis=-1)))(x)
        return (
            _int_ce_value_and_grad(x, y),
            (lse, lse_grad),
            jxent.softmax(x),
            jxent.log_softmax(x),
        )

    got, want = _run(platform, everything, x), _run(None, everything, x)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e))
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_all_masked_row_is_finite_under_debug_nans(platform):
    x = _logits((3, 5))
    where = jnp.asarray([[True] * 5, [False] * 5, [True, False, True, False, True]])
    y = jnp.asarray([1, 0, 2], jnp.int32)
    with jax.debug_nans(True):
        loss, grad = _run(platform, lambda x: _int_ce_value_and_grad(x, y, where=where), x)
        lse = _run(platform, lambda x: jxent.logsumexp(x, axis=-1, where=where), x)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert np.all(grad[1] == 0) and lse[1] == -np.inf


@pytest.mark.parametrize("platform", PLATFORMS)
def test_dense_ce_and_normalisers_match_jax_nn(platform):
    x = _logits((4, 40000))
    t = jax.nn.softmax(_logits((4, 40000), seed=2))
    g = _logits((4, 40000), seed=3)

    def everything(x):
        dense = jax.value_and_grad(lambda x: jnp.sum(jxent.softmax_cross_entropy(x, t)))(x)
        soft = jax.vjp(jxent.softmax, x)[1](g)
        log_soft = jax.vjp(jxent.log_softmax, x)[1](g)
        return dense, jxent.softmax(x), soft, jxent.log_softmax(x), log_soft

    def reference(x):
        dense = jax.value_and_grad(lambda x: jnp.sum(optax.softmax_cross_entropy(x, t)))(x)
        soft = jax.vjp(jax.nn.softmax, x)[1](g)
        log_soft = jax.vjp(jax.nn.log_softmax, x)[1](g)
        return dense, jax.nn.softmax(x), soft, jax.nn.log_softmax(x), log_soft

    _assert_same(_run(platform, everything, x), reference(x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_second_derivatives_through_the_online_reduction(platform):
    """``jax.hessian`` differentiates the custom reduction: the softmax Jacobian."""
    x = jnp.asarray([0.3, -1.0, 0.3, 2.0])  # with a tie
    y = jnp.asarray(2)
    hess = _run(
        platform,
        jax.hessian(lambda x: jxent.softmax_cross_entropy_with_integer_labels(x, y)),
        x,
    )
    p = np.asarray(jax.nn.softmax(x))
    np.testing.assert_allclose(hess, np.diag(p) - np.outer(p, p), rtol=1e-5, atol=1e-7)
