"""The GPU and TPU code paths, run on the CPU.

jxent picks some kernels per platform at lowering time (``lax.platform_dependent``): on
GPU and TPU the normaliser comes from one online (max, sum-of-exponentials) reduction and
the integer CE picks the target logit inside it; on GPU long rows are reduced in blocks.
The CI machine has no accelerator, so these tests make jxent take those branches on the
CPU (``jxent._reductions.simulated_platform``).

Values and gradients are compared with float64 NumPy formulas (``reference.py``), the
simulated paths and the real CPU path alike, within a bound on float32 rounding (see
:func:`_assert_near`); the two paths sum in different orders, so they are not compared
with each other except on degenerate rows, whose results (0, ``±inf``, NaN) are exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from platforms import simulated

import jxent

pytestmark = pytest.mark.numerics

PLATFORMS = ("cuda", "tpu")
PATHS = (*PLATFORMS, None)  # None: the real CPU path

# Rounding bound: |got - float64| <= (ULPS + 4·sqrt(C)) · eps(float32) · scale, where
# ``scale`` is the size of the terms a value is computed from (not of the value itself: a
# gradient ``p·A - 1`` or ``g - p·Σg`` cancels, and its error is that of its terms) and C
# the row length. 64 ulps cover exp/log rounding and ``x - lse`` for logits and lse of up
# to ~30 in size; 4·sqrt(C) is the probabilistic bound (Higham & Mary, 2019) on a
# float32 sum of C terms added one after another, which is how XLA:CPU evaluates the
# custom online reduction of the simulated paths (observed: up to ~280 ulps at C = 40000;
# on a real GPU or TPU the reduction is a tree, with less error).
ULPS = 64
F32_EPS = float(np.finfo(np.float32).eps)
BF16_HALF_ULP = 2.0**-8  # bfloat16 outputs: one rounding, relative 2^-9, with margin 2


def _run(platform, fn, *args):
    """``fn(*args)`` traced for ``platform`` (None: the real CPU path), caches cleared."""
    with simulated(platform):
        return jax.tree.map(np.asarray, fn(*args))


def _ulps(classes):
    return ULPS + 4 * np.sqrt(classes)


def _assert_near(got, want, scale, what, classes=None):
    """``got`` within float32 rounding of the float64 ``want`` (see ULPS); ``classes``
    (default: ``want``'s last axis) is the length of the sums it comes from."""
    got = np.asarray(got)
    a = got.astype(np.float64)
    w = np.asarray(want, np.float64)
    if classes is None:
        classes = w.shape[-1] if w.ndim else 1
    ulps = _ulps(classes)
    tol = ulps * F32_EPS * np.asarray(scale, np.float64)
    if got.dtype == jnp.bfloat16:
        tol = tol + BF16_HALF_ULP * np.abs(w)
    ok = np.abs(a - w) <= tol
    if not np.all(ok):
        worst = np.unravel_index(np.argmax(np.abs(a - w) - tol), a.shape)
        raise AssertionError(
            f"{what}: {np.sum(~ok)} of {ok.size} entries beyond {ulps:.0f} float32 ulps of the "
            f"terms' scale; worst at {worst}: got {a[worst]!r}, float64 {w[worst]!r}, "
            f"tolerance {tol[worst]!r}"
        )


def _logits(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0, 3, shape), dtype)


def _f64(x):
    return np.asarray(x).astype(np.float64)


def _softmax64(x, where=None):
    x = _f64(x)
    if where is not None:
        x = np.where(where, x, -np.inf)
    return ref.softmax(x)


def _int_ce_value_and_grad(x, y, **kw):
    def loss(x, w):
        return jnp.sum(jxent.softmax_cross_entropy_with_integer_labels(x, y, class_weights=w, **kw))

    weights = kw.pop("class_weights", None)
    if weights is None:
        return jax.value_and_grad(lambda x: loss(x, None))(x)
    return jax.value_and_grad(loss, argnums=(0, 1))(x, weights)


def _check_integer_ce(got, x, y, options):
    """``got`` (value, grads) of the summed integer CE against the float64 reference."""
    kw = dict(options)
    where = kw.pop("where", None)
    full_where = None if where is None else np.broadcast_to(np.asarray(where), x.shape)
    weights = kw.pop("class_weights", None)
    want = ref.integer_cross_entropy(
        _f64(x),
        np.asarray(y),
        where=full_where,
        weights=None if weights is None else _f64(weights),
        reduction="sum",
        ignore_index=kw.get("ignore_index"),
        label_smoothing=kw.get("label_smoothing", 0.0),
        z_loss=kw.get("z_loss", 0.0),
    )
    value, grads = got
    grads = grads if isinstance(grads, tuple) else (grads,)
    x64 = _f64(x)
    finite = np.where(np.isfinite(x64), np.abs(x64), 0.0)
    # loss_n = lse_n - x_y (+ smoothing / z terms): terms of the size of the row's logits.
    z = kw.get("z_loss", 0.0)
    row_scale = np.max(finite, axis=-1) * (1 + 2 * z * np.max(finite)) + 1.0
    _assert_near(value, want.value, np.sum(row_scale), "loss", x.shape[-1])
    # d/dx = p·A - (1-ε)·w_y·[c = y] - (ε/C)·w_c: terms up to p·max(w) + max(w).
    w_max = 1.0 if weights is None else float(np.max(_f64(weights)))
    p = _softmax64(x, full_where)
    p = np.where(np.isnan(p), 0.0, p)
    _assert_near(
        grads[0], want.grads["logits"], w_max * (p + 1.0) * row_scale[:, None], "d/dlogits"
    )
    if weights is not None:
        # d/dw_c sums -log p over the batch: terms of the size of the rows' logits.
        _assert_near(
            grads[1],
            want.grads["class_weights"],
            np.sum(row_scale),
            "d/dclass_weights",
            x.shape[-1],
        )


# 40000 classes: the GPU path reduces 4 blocks of 10000, the TPU path whole rows;
# 40009 (prime): the GPU path reduces 2 blocks of 13337 and a ragged one of 13335.
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("classes", [7, 40000, 40009])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_integer_ce_matches_float64(path, classes, dtype):
    x = _logits((6, classes), dtype)
    y = jnp.asarray(np.random.default_rng(1).integers(0, classes, 6), jnp.int32)
    _check_integer_ce(_run(path, _int_ce_value_and_grad, x, y), x, y, {})


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1, "z_loss": 1e-3},
        {"ignore_index": 2, "class_weights": jnp.linspace(0.5, 2.0, 9)},
        {"label_smoothing": 0.2, "class_weights": jnp.linspace(0.5, 2.0, 9)},
        {"where": jnp.arange(9) != 4},
    ],
)
def test_integer_ce_options_match_float64(path, options):
    x = _logits((8, 9))
    y = jnp.asarray([0, 2, 5, 8, 3, 2, 1, 7], jnp.int32)
    got = _run(path, lambda x: _int_ce_value_and_grad(x, y, **options), x)
    _check_integer_ce(got, x, y, options)


def test_integer_ce_invalid_labels_are_nan_on_every_path():
    x = _logits((3, 9))
    y = jnp.asarray([0, 9, 4], jnp.int32)  # 9 out of range, 4 masked
    where = jnp.arange(9) != 4

    def run(x):
        return jxent.softmax_cross_entropy_with_integer_labels(x, y, where=where)

    for platform in PLATFORMS:
        got = _run(platform, run, x)
        np.testing.assert_array_equal(np.isnan(got), [False, True, True])


def _degenerate_logits(classes):
    """Rows: ordinary; one +inf; all -inf but one; ties at a huge value; a NaN."""
    x = np.array(_logits((5, classes)))  # a writable copy
    x[1, 3] = np.inf
    x[2, :] = -np.inf
    x[2, 1] = 0.5
    x[3, :] = 3e38
    x[4, 2] = np.nan
    return jnp.asarray(x)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("classes", [6, 40000])
def test_degenerate_rows_match_cpu_path(platform, classes):
    """+inf, all -inf but one, ties at 3e38 and NaN rows: value and gradient as on CPU.

    Those rows' results are exact (0, 1, -log C, ±inf, NaN; test_degenerate.py checks the
    CPU path's against their formulas), so NaN and inf positions must agree exactly; the
    ordinary row 0 agrees within float32 summation order of 40000 terms.
    """
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
        np.testing.assert_array_equal(np.isinf(a), np.isinf(e))
        tol = _ulps(classes) * F32_EPS
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol)


def _normalisers_and_dense_ce(t, g):
    def everything(x):
        dense = jax.value_and_grad(lambda x: jnp.sum(jxent.softmax_cross_entropy(x, t)))(x)
        lse = jax.value_and_grad(lambda x: jnp.sum(jxent.logsumexp(x, axis=-1)))(x)
        soft = jax.vjp(jxent.softmax, x)
        log_soft = jax.vjp(jxent.log_softmax, x)
        return dense, lse, soft[0], soft[1](g)[0], log_soft[0], log_soft[1](g)[0]

    return everything


def _check_normalisers_and_dense_ce(got, x, t, g):
    (dense, dense_grad), (lse, lse_grad), soft, soft_vjp, log_soft, log_soft_vjp = got
    x, t, g = _f64(x), _f64(t), _f64(g)
    lp = ref.log_softmax(x)
    p = np.exp(lp)
    lse64 = np.max(x, -1) + np.log(np.sum(np.exp(x - np.max(x, -1, keepdims=True)), -1))
    want = ref.dense_cross_entropy(x, t, reduction="sum")
    mass = t.sum(-1, keepdims=True)
    _assert_near(
        dense, want.value, np.sum(t * (np.abs(x) + np.abs(lse64)[:, None])), "dense CE", x.shape[-1]
    )
    _assert_near(dense_grad, want.grads["logits"], p * mass + t, "dense CE d/dlogits")
    _assert_near(lse, lse64.sum(), np.sum(np.max(np.abs(x), -1) + 1), "logsumexp", x.shape[-1])
    _assert_near(lse_grad, p, p, "logsumexp d/dx")
    _assert_near(soft, p, p, "softmax")
    inner = np.sum(g * p, -1, keepdims=True)
    _assert_near(
        soft_vjp,
        p * (g - inner),
        p * (np.abs(g) + np.sum(p * np.abs(g), -1, keepdims=True)),
        "softmax vjp",
    )
    _assert_near(log_soft, lp, np.abs(x) + np.abs(lse64)[:, None], "log_softmax")
    _assert_near(
        log_soft_vjp,
        g - p * g.sum(-1, keepdims=True),
        np.abs(g) + p * np.sum(np.abs(g), -1, keepdims=True),
        "log_softmax vjp",
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("classes", [40000, 40009])
def test_dense_ce_and_normalisers_match_float64(path, classes):
    x = _logits((4, classes))
    t = jax.nn.softmax(_logits((4, classes), seed=2))
    g = _logits((4, classes), seed=3)
    got = _run(path, _normalisers_and_dense_ce(t, g), x)
    _check_normalisers_and_dense_ce(got, x, t, g)


@pytest.mark.parametrize("path", PATHS)
def test_half_precision_normaliser_vjps_match_float64(path):
    """bfloat16 softmax and log_softmax backward passes. On TPU their row sums are rounded to
    bfloat16 (see ``jxent._softmax._row_sum_like_a_loss``): each term and the sum once, so
    within 2^-8 of the terms' scale beyond the output's own rounding; a sum accumulated in
    bfloat16 would be off by about sqrt(C)·2^-9 of it."""
    x = _logits((4, 4096), jnp.bfloat16)
    g = _logits((4, 4096), jnp.bfloat16, seed=3)

    def vjps(x):
        return jax.vjp(jxent.softmax, x)[1](g)[0], jax.vjp(jxent.log_softmax, x)[1](g)[0]

    soft, log_soft = _run(path, vjps, x)
    x64, g64 = _f64(x), _f64(g)
    p = np.exp(ref.log_softmax(x64))
    abs_g = np.abs(g64)
    for got, want, scale, what in (
        (
            soft,
            p * (g64 - np.sum(g64 * p, -1, keepdims=True)),
            p * (abs_g + np.sum(p * abs_g, -1, keepdims=True)),
            "softmax vjp",
        ),
        (
            log_soft,
            g64 - p * g64.sum(-1, keepdims=True),
            abs_g + p * abs_g.sum(-1, keepdims=True),
            "log_softmax vjp",
        ),
    ):
        assert got.dtype == jnp.bfloat16, (what, got.dtype)
        error = np.abs(_f64(got) - want)
        bound = BF16_HALF_ULP * (np.abs(want) + scale)
        assert np.all(error <= bound), (what, float(np.max(error / bound)))


# ----------------------------------------------------------------------------- debug_nans


@pytest.mark.parametrize("platform", PLATFORMS)
def test_all_masked_row_is_finite_under_debug_nans(platform):
    x = _logits((3, 5))
    where = jnp.asarray([[True] * 5, [False] * 5, [True, False, True, False, True]])
    y = jnp.asarray([1, 0, 2], jnp.int32)
    t = jax.nn.softmax(_logits((3, 5), seed=2))

    def everything(x):
        return (
            _int_ce_value_and_grad(x, y, where=where),
            jax.value_and_grad(lambda x: jnp.sum(jxent.softmax_cross_entropy(x, t, where=where)))(
                x
            ),
            jax.vjp(lambda x: jxent.softmax(x, where=where), x)[1](t)[0],
            jax.vjp(lambda x: jxent.log_softmax(x, where=where), x)[1](t)[0],
            jxent.logsumexp(x, axis=-1, where=where),
        )

    with jax.debug_nans(True):
        (loss, grad), (dense, dense_grad), soft_vjp, log_soft_vjp, lse = _run(
            platform, everything, x
        )
    for value in (loss, grad, dense, dense_grad, soft_vjp, log_soft_vjp):
        assert np.all(np.isfinite(value))
    for value in (grad, dense_grad, soft_vjp, log_soft_vjp):
        assert np.all(value[1] == 0)
    assert lse[1] == -np.inf and np.all(np.isfinite(lse[[0, 2]]))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("classes", [9, 40000])
def test_valid_input_raises_nothing_under_debug_nans(platform, classes):
    x = _logits((3, classes))
    y = jnp.asarray([1, 0, 2], jnp.int32)
    t = jax.nn.softmax(_logits((3, classes), seed=2))
    with jax.debug_nans(True):
        got = _run(platform, _normalisers_and_dense_ce(t, t), x)
        loss = _run(
            platform, lambda x: _int_ce_value_and_grad(x, y, label_smoothing=0.1, z_loss=1e-3), x
        )
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves((got, loss)))


# ----------------------------------------------------------------------------- second order


@pytest.mark.parametrize("platform", PLATFORMS)
def test_second_derivatives_through_the_online_reduction(platform):
    """``jax.hessian`` differentiates the custom reduction: the softmax Jacobian."""
    x = jnp.asarray([0.3, -1.0, 0.3, 2.0])  # with a tie
    y = jnp.asarray(2)

    def both(x):
        return (
            jax.hessian(lambda x: jxent.softmax_cross_entropy_with_integer_labels(x, y))(x),
            jax.hessian(lambda x: jxent.logsumexp(x))(x),
        )

    p = _softmax64(x)
    for hess in _run(platform, both, x):
        _assert_near(hess, np.diag(p) - np.outer(p, p), p, "Hessian")


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("classes", [40000, 40009])
def test_hessian_vector_products_on_long_rows(platform, classes):
    """Forward over reverse through the (GPU: blocked) online reduction: H v = p⊙v - p⟨p, v⟩."""
    x = _logits((2, classes))
    v = _logits((2, classes), seed=4)
    y = jnp.asarray([3, 5], jnp.int32)

    def hvps(x):
        def ce(x):
            return jnp.sum(jxent.softmax_cross_entropy_with_integer_labels(x, y))

        def lse(x):
            return jnp.sum(jxent.logsumexp(x, axis=-1))

        return [jax.jvp(jax.grad(f), (x,), (v,))[1] for f in (ce, lse)]

    p, v64 = _softmax64(x), _f64(v)
    want = p * v64 - p * np.sum(p * v64, -1, keepdims=True)
    scale = p * (np.abs(v64) + np.sum(p * np.abs(v64), -1, keepdims=True))
    for hvp in _run(platform, hvps, x):
        _assert_near(hvp, want, scale, "Hessian-vector product")


# ----------------------------------------------------------------------------- sharded


def _mesh(shape, names, axis_type=AxisType.Auto):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (host) devices: see tests/conftest.py")
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def _vocab_parallel(y, t, g, mesh):
    """Every function with ``axis_name="v"`` inside ``jax.shard_map``, classes sharded."""
    rows, full = P(), P(None, "v")

    def shmap(fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)

    int_ce = shmap(
        lambda x, y: jxent.softmax_cross_entropy_with_integer_labels(
            x, y, label_smoothing=0.1, z_loss=1e-3, axis_name="v"
        ),
        (full, rows),
        rows,
    )
    dense = shmap(lambda x, t: jxent.softmax_cross_entropy(x, t, axis_name="v"), (full, full), rows)
    lse = shmap(lambda x: jxent.logsumexp(x, axis=-1, axis_name="v"), (full,), rows)
    soft = shmap(lambda x: jxent.softmax(x, axis_name="v"), (full,), full)
    log_soft = shmap(lambda x: jxent.log_softmax(x, axis_name="v"), (full,), full)

    @jax.jit
    def everything(x):
        return (
            jax.value_and_grad(lambda x: jnp.sum(int_ce(x, y)))(x),
            jax.value_and_grad(lambda x: jnp.sum(dense(x, t)))(x),
            jax.value_and_grad(lambda x: jnp.sum(lse(x)))(x),
            soft(x),
            jax.vjp(soft, x)[1](g)[0],
            log_soft(x),
            jax.vjp(log_soft, x)[1](g)[0],
        )

    return everything


# 8 x 9 classes: unblocked; 8 x 20000: each device's rows take the GPU block path.
@pytest.mark.sharding
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("local_classes", [9, 20000])
def test_vocab_parallel_axis_name_in_shard_map(path, local_classes):
    classes = 8 * local_classes
    x = _logits((4, classes))
    y = jnp.asarray([0, classes - 1, local_classes, 3 * local_classes + 2], jnp.int32)
    t = jax.nn.softmax(_logits((4, classes), seed=2))
    g = _logits((4, classes), seed=3)
    mesh = _mesh((8,), ("v",))
    got = _run(path, lambda x: _vocab_parallel(y, t, g, mesh)(x), x)
    int_ce, dense, lse, soft, soft_vjp, log_soft, log_soft_vjp = got
    _check_integer_ce(int_ce, x, y, {"label_smoothing": 0.1, "z_loss": 1e-3})
    _check_normalisers_and_dense_ce((dense, lse, soft, soft_vjp, log_soft, log_soft_vjp), x, t, g)


@pytest.mark.sharding
@pytest.mark.parametrize("platform", PLATFORMS)
def test_vocab_parallel_all_masked_row_under_debug_nans(platform):
    mesh = _mesh((8,), ("v",))
    x = _logits((2, 16))
    where = jnp.asarray([[True] * 16, [False] * 16])
    y = jnp.asarray([5, 0], jnp.int32)
    loss = jax.shard_map(
        lambda x, w, y: jxent.softmax_cross_entropy_with_integer_labels(
            x, y, where=w, axis_name="v"
        ),
        mesh=mesh,
        in_specs=(P(None, "v"), P(None, "v"), P()),
        out_specs=P(),
    )
    with jax.debug_nans(True):
        value, grad = _run(
            platform, jax.jit(jax.value_and_grad(lambda x: jnp.sum(loss(x, where, y)))), x
        )
    _check_integer_ce((value, grad), x, y, {"where": where})
    assert np.all(grad[1] == 0)


# Sharded long rows, on Explicit meshes (jxent maps the shards itself: the block reshapes of
# the long-row reductions then see local rows; on the global, class-sharded array JAX refused
# them with "ShardingTypeError: This reshape is not supported") and on Auto meshes (GSPMD).
# 80000 classes: whole rows (the "batch" layout) take the CPU and GPU block paths; 20000
# per device (the "2d" layout) the GPU block path; 10000 per device ("classes") neither.
MESH_LAYOUTS = {
    "classes": ((8,), ("v",), P(None, "v")),
    "2d": ((2, 4), ("b", "v"), P("b", "v")),
    "batch": ((8,), ("b",), P("b", None)),
}
LONG = 80000


def _on_mesh(path, axis_type, mesh_layout, fn, *arrays, specs=None):
    """``jax.jit(fn)(*arrays)`` for ``path``, each array put on the mesh of ``mesh_layout``
    with its spec in ``specs`` (default: the layout's, sharded like the logits)."""
    shape, names, spec = MESH_LAYOUTS[mesh_layout]
    mesh = _mesh(shape, names, axis_type)
    specs = specs or (spec,) * len(arrays)

    def run(*arrays):
        with jax.set_mesh(mesh):
            put = (
                jax.device_put(a, NamedSharding(mesh, s))
                for a, s in zip(arrays, specs, strict=True)
            )
            return jax.jit(fn)(*put)

    return _run(path, run, *arrays)


@pytest.mark.sharding
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("layout", MESH_LAYOUTS)
def test_sharded_logits_on_meshes(path, axis_type, layout):
    """Logits sharded on an explicit or auto mesh: the normalisers, dense and integer CE."""
    x0 = _logits((8, LONG))
    y0 = jnp.asarray([0, LONG - 1, 20001, 7, 39999, 40000, 12, 79000], jnp.int32)
    t0 = jax.nn.softmax(_logits((8, LONG), seed=2))
    g0 = _logits((8, LONG), seed=3)

    def everything(x, y, t, g):
        return _normalisers_and_dense_ce(t, g)(x), _int_ce_value_and_grad(
            x, y, label_smoothing=0.1, z_loss=1e-3
        )

    spec = MESH_LAYOUTS[layout][2]
    specs = (spec, P(spec[0]), spec, spec)
    normalisers, int_ce = _on_mesh(path, axis_type, layout, everything, x0, y0, t0, g0, specs=specs)
    _check_normalisers_and_dense_ce(normalisers, x0, t0, g0)
    _check_integer_ce(int_ce, x0, y0, {"label_smoothing": 0.1, "z_loss": 1e-3})


def _normalisers_with_options(axis, where, g):
    """logsumexp (per row, with its sign and the gradients of the sum for ``x`` and, when
    given, ``b``), softmax and log_softmax with their vjps against ``g``, over ``axis``
    masked by ``where``."""

    def everything(x, *b):
        def lse(x, *b):
            value, sign = jxent.logsumexp(x, axis, *b, where=where, return_sign=True)
            return jnp.sum(jnp.where(jnp.isfinite(value), value, 0.0)), (value, sign)

        argnums = tuple(range(1 + len(b)))
        (_, (value, sign)), grads = jax.value_and_grad(lse, argnums, has_aux=True)(x, *b)
        soft = jax.vjp(lambda x: jxent.softmax(x, axis, where), x)
        log_soft = jax.vjp(lambda x: jxent.log_softmax(x, axis, where), x)
        return (value, sign, grads), (soft[0], soft[1](g)[0], log_soft[0], log_soft[1](g)[0])

    return everything


class _Rows:
    """Float64 row statistics of ``x`` (``reference.Rows``: batch axes first, the class
    axes flattened last) masked by ``where``, with weights ``b`` (1 when None)."""

    def __init__(self, x, axis, where, b):
        self.rows = ref.Rows(np.shape(x), axis)
        self.x = self.rows.to_rows(_f64(x))
        self.m = np.ones(self.x.shape, bool) if where is None else self.rows.to_rows(where)
        self.b = np.ones(self.x.shape) if b is None else self.rows.to_rows(_f64(b))
        live = self.m & (self.b != 0)
        top = np.max(np.where(live, self.x, -np.inf), -1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        total = np.sum(self.b * np.where(live, np.exp(self.x - top), 0.0), -1, keepdims=True)
        with np.errstate(divide="ignore"):
            self.lse = top + np.log(np.abs(total))
        self.sign = np.sign(total)
        self.empty = total == 0  # all masked: lse -inf, sign 0, no gradient
        finite_lse = np.where(self.empty, 0.0, self.lse)
        self.ratio = np.where(live, np.exp(self.x - finite_lse), 0.0)  # b·ratio sums to ±1

    def out(self, rows):
        return self.rows.from_rows(rows)


def _check_logsumexp(got, x, axis, where, b):
    value, sign, grads = got
    r = _Rows(x, axis, where, b)
    n = r.rows.num_classes
    _assert_near(sign, r.rows.batch(r.sign[:, 0]), 0.0, "logsumexp sign", n)
    finite = ~r.empty[:, 0]
    np.testing.assert_array_equal(np.isneginf(np.ravel(value)), ~finite)
    scale = np.max(np.abs(r.x), -1) + 1
    _assert_near(np.ravel(value)[finite], r.lse[finite, 0], scale[finite], "logsumexp", n)
    dx, dx_scale = r.out(r.sign * r.b * r.ratio), r.out(np.abs(r.b) * r.ratio)
    _assert_near(grads[0], dx, dx_scale, "logsumexp d/dx", n)
    if b is not None:
        db = r.out(r.sign * np.where(r.m, r.ratio, 0.0))
        _assert_near(grads[1], db, np.abs(db), "logsumexp d/db", n)


def _check_softmaxes(got, x, axis, where, g):
    soft, soft_vjp, log_soft, log_soft_vjp = got
    r = _Rows(x, axis, where, None)
    n = r.rows.num_classes
    p, g = r.ratio, np.where(r.m, r.rows.to_rows(_f64(g)), 0.0)
    inner, abs_inner = np.sum(g * p, -1, keepdims=True), np.sum(np.abs(g) * p, -1, keepdims=True)
    _assert_near(soft, r.out(p), r.out(p), "softmax", n)
    _assert_near(soft_vjp, r.out(p * (g - inner)), r.out(p * (np.abs(g) + abs_inner)), "vjp", n)
    kept = r.m & ~r.empty
    log_soft = r.rows.to_rows(np.asarray(log_soft))
    np.testing.assert_array_equal(np.isneginf(log_soft), ~kept)
    lse = np.where(r.empty, 0.0, r.lse)
    _assert_near(
        log_soft[kept], (r.x - lse)[kept], (np.abs(r.x) + np.abs(lse))[kept], "log_softmax", n
    )
    total, abs_total = g.sum(-1, keepdims=True), np.abs(g).sum(-1, keepdims=True)
    want = r.out(g - p * total)
    _assert_near(log_soft_vjp, want, r.out(np.abs(g) + p * abs_total), "log_softmax vjp", n)


def _masked_classes_and_one_empty_row(shape):
    """Every seventh class masked out, and row 1 entirely."""
    where = np.broadcast_to(np.arange(shape[-1]) % 7 != 0, shape).copy()
    where[1] = False
    return where


# name -> (shape, class axis, mesh layout, the logits' spec, with where, with b)
NORMALISER_CASES = {
    "1-d": ((LONG,), -1, "classes", P("v"), False, False),
    "3-d": ((2, 4, LONG), -1, "2d", P("b", None, "v"), False, False),
    # 40 x 2000 classes flattened, the major axis sharded (see _layout.ClassLayout)
    "tuple_axes": ((4, 40, 2000), (1, 2), "2d", P("b", "v", None), False, False),
    "class_axis_first": ((LONG, 4), 0, "2d", P("v", "b"), False, False),
    "where": ((4, LONG), -1, "classes", P(None, "v"), True, False),
    "where_and_signed_b": ((4, LONG), -1, "2d", P("b", "v"), True, True),
}


@pytest.mark.slow
@pytest.mark.sharding
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("case", NORMALISER_CASES)
def test_normaliser_options_on_meshes(path, axis_type, case):
    """Normalisers of 1-D and 3-D inputs, over tuple and leading class axes, with ``where``
    (replicated; one row fully masked) and with signed ``b`` (sharded like the logits)."""
    shape, axis, layout, spec, with_where, with_b = NORMALISER_CASES[case]
    x0, g0 = _logits(shape), _logits(shape, seed=3)
    where = _masked_classes_and_one_empty_row(shape) if with_where else None
    arrays = [x0]
    if with_b:  # weights in [-0.3, 1); row 2 negated, so that its sum is negative
        b = np.random.default_rng(4).uniform(-0.3, 1.0, shape).astype(np.float32)
        b[2] *= -1.0
        arrays.append(jnp.asarray(b))
    fn = _normalisers_with_options(axis, None if where is None else jnp.asarray(where), g0)
    lse, softmaxes = _on_mesh(path, axis_type, layout, fn, *arrays, specs=(spec,) * len(arrays))
    _check_logsumexp(lse, x0, axis, where, arrays[1] if with_b else None)
    _check_softmaxes(softmaxes, x0, axis, where, g0)


@pytest.mark.slow
@pytest.mark.sharding
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("layout", MESH_LAYOUTS)
def test_kl_and_binary_ce_on_meshes(path, axis_type, layout):
    """KL (class sums: the block reshapes of long rows) and binary CE (a replicated
    ``pos_weight`` per class, whose gradient is summed over the sharded batch)."""
    lp0 = jax.nn.log_softmax(_logits((8, LONG)))
    t0 = jax.nn.softmax(_logits((8, LONG), seed=2)).at[:, ::5].set(0.0)

    def pos_weight():  # made inside the jitted function: replicated on the mesh
        return jnp.linspace(0.5, 2.0, LONG)

    def everything(lp, t):
        kl = jax.value_and_grad(lambda lp, t: jnp.sum(jxent.kl_divergence(lp, t)), argnums=(0, 1))(
            lp, t
        )
        kl_log = jax.value_and_grad(
            lambda lp, lt: jnp.sum(jxent.kl_divergence_with_log_targets(lp, lt)), argnums=(0, 1)
        )(lp, jnp.log(t))
        binary = jax.value_and_grad(
            lambda x, t, pw: jnp.sum(jxent.sigmoid_binary_cross_entropy(x, t, pos_weight=pw)),
            argnums=(0, 1, 2),
        )(lp, t, pos_weight())
        return kl, kl_log, binary

    kl, kl_log, binary = _on_mesh(path, axis_type, layout, everything, lp0, t0)
    lp, t = _f64(lp0), _f64(t0)
    size = np.abs(lp) + np.abs(np.log(np.where(t == 0, 1.0, t))) + 1.0
    with np.errstate(divide="ignore"):
        log_t = np.log(t)
    # d/dt = log t + 1 - lp; d/d(log t) = t·(log t - lp + 1)
    for (value, (dlp, dt)), want, dt_name, dt_scale in (
        (kl, ref.kl_divergence(lp, t), "targets", size),
        (kl_log, ref.kl_divergence_with_log_targets(lp, log_t), "log_targets", t * size),
    ):
        _assert_near(value, want.value.sum(), np.sum(t * size), dt_name, LONG)
        _assert_near(dlp, want.grads["log_predictions"], t, f"{dt_name}: d/dlp")
        _assert_near(dt, want.grads[dt_name], dt_scale, f"{dt_name}: d/d{dt_name}")
    value, (dx, dt, dpw) = binary
    pw = _f64(pos_weight())
    want = ref.sigmoid_binary_cross_entropy(lp, t, pos_weight=pw, reduction="sum")
    scale = (pw * t + 1.0) * (np.abs(lp) + 1.0)
    _assert_near(value, want.value, np.sum(scale), "binary", lp.size)
    _assert_near(dx, want.grads["logits"], pw * t + 1.0, "binary d/dx")
    _assert_near(dt, want.grads["labels"], scale, "binary d/dt")
    _assert_near(dpw, want.grads["pos_weight"], np.sum(scale, 0), "binary d/dpos_weight", 8)


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_reverse_over_reverse_through_the_online_reduction(platform, x64):
    """``grad`` of ``grad``: reverse mode transposes the online normaliser's derivative
    (JAX's own derivative of a custom reduction cannot be transposed)."""
    from jax.test_util import check_grads

    x = jnp.asarray(np.random.default_rng(5).normal(0, 2, (3, 5)))
    y = jnp.asarray([0, 3, 4])
    where = jnp.asarray([True, True, False, True, True])
    t = jax.nn.softmax(x[::-1])

    def everything(x):
        return (
            jxent.softmax_cross_entropy_with_integer_labels(
                x, y, where=where, label_smoothing=0.2, z_loss=1e-2, reduction="mean"
            ),
            jnp.sum(jxent.softmax_cross_entropy(x, t, z_loss=1e-2)),
            jnp.sum(jxent.logsumexp(x, axis=-1) * jnp.arange(3.0)),
            jnp.sum(jxent.softmax(x) * t),
            jnp.sum(jxent.log_softmax(x) * t),
        )

    def check(x):
        for i in range(5):
            check_grads(lambda x, i=i: everything(x)[i], (x,), order=2, modes=["rev"])
        return x

    _run(platform, check, x)
