"""The fused loss's options of issue 18: ``return_aux``, ``weights``, ``normalizer``,
``temperature`` and ``w_layout="vd"``, in both kernels.

References: float64 NumPy (the logits formed in float64 and handed to the independent
``reference.integer_cross_entropy``; the aux fields written out below), and, for gradients,
the unfused plain-JAX composition ``softmax_cross_entropy_with_integer_labels(x @ w + b)``
with the token weights, the normaliser and the aux fields written with ``jax.nn``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hlo_checks import assert_no_transposed_copy_of_w, largest_collective
from jax import export
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from platforms import simulated

import jxent
from jxent import _fused_linear
from jxent._aux_outputs import CrossEntropyAux

pytestmark = pytest.mark.numerics

N, D, V = 29, 12, 37
# vocab_block 5: eight blocks, the last overlapping its predecessor; chunk_size 8: padding.
KERNELS = {
    "chunked": _fused_linear.with_kernel("chunked"),
    "blocked": _fused_linear.with_kernel("blocked", 5),
}
REDUCTIONS = ["none", "sum", "mean"]
AUX_FIELDS = ("lse", "entropy", "z_loss")


def _inputs(seed=0, n=N, d=D, v=V):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) / np.sqrt(d) * 3).astype(np.float32)
    b = rng.normal(size=(v,)).astype(np.float32)
    y = rng.integers(0, v, size=(n,)).astype(np.int32)
    y[::7] = -100  # ignored
    t = rng.uniform(0.0, 2.0, size=(n,)).astype(np.float32)
    t[3] = 0.0
    return x, w, b, y, t


X, W, B, Y, T = _inputs()
CLASS_WEIGHTS = np.random.default_rng(1).uniform(0.2, 2.0, size=(V,)).astype(np.float32)
# Every option at once: each multiplies or shifts a different part of the gradient.
OPTIONS = dict(
    class_weights=CLASS_WEIGHTS,
    ignore_index=-100,
    label_smoothing=0.1,
    z_loss=1e-2,
    logit_softcap=4.0,
    temperature=0.7,
)
# The logits neither capped nor tempered: the blocked kernel then takes a block's
# log-normaliser, entropy and argmax from one pass over it.
PLAIN_LOGITS = {k: v for k, v in OPTIONS.items() if k not in ("logit_softcap", "temperature")}
LOGITS = {"capped and tempered": OPTIONS, "plain": PLAIN_LOGITS}


def _logits64(x, w, bias, logit_softcap=None, temperature=1.0, w_layout="dv"):
    w64 = np.asarray(w, np.float64)
    z = np.asarray(x, np.float64) @ (w64 if w_layout == "dv" else w64.T)
    if bias is not None:
        z = z + np.asarray(bias, np.float64)
    if logit_softcap is not None:
        z = logit_softcap * np.tanh(z / logit_softcap)
    return z / temperature


def reference64(
    x,
    w,
    labels,
    *,
    bias=None,
    weights=None,
    normalizer=None,
    reduction="mean",
    w_layout="dv",
    logit_softcap=None,
    temperature=1.0,
    **options,
):
    """(loss, aux fields as a dict) in float64."""
    u = _logits64(x, w, bias, logit_softcap, temperature, w_layout)
    ce_options = dict(options)
    ce_options["weights"] = ce_options.pop("class_weights", None)
    rows = ref.integer_cross_entropy(u, labels, reduction="none", **ce_options).value
    ignore = options.get("ignore_index")
    counted = (labels != ignore) & (labels >= 0) & (labels < u.shape[1])
    class_w = ce_options["weights"]
    w_y = np.where(
        counted,
        1.0
        if class_w is None
        else np.asarray(class_w, np.float64)[np.clip(labels, 0, u.shape[1] - 1)],
        0.0,
    )
    t = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)
    lse = np.log(np.sum(np.exp(u - u.max(1, keepdims=True)), 1)) + u.max(1)
    log_p = u - lse[:, None]
    z_rows = np.where(counted, options.get("z_loss", 0.0) * lse**2, 0.0)

    def reduce(values):
        if reduction == "none":
            return values * t
        total = np.sum(values * t)
        if reduction == "sum":
            return total
        denominator = np.sum(w_y * t) if normalizer is None else float(normalizer)
        return total / denominator if denominator else 0.0

    argmax = np.argmax(u, axis=1)
    aux = dict(
        lse=lse,
        z_loss=reduce(z_rows),
        entropy=-np.sum(np.exp(log_p) * log_p, axis=1),
        argmax=argmax,
        correct=(argmax == labels) & counted,
        counted=counted,
    )
    return reduce(rows), aux


def composed(
    x,
    w,
    labels,
    *,
    bias=None,
    weights=None,
    normalizer=None,
    reduction="mean",
    w_layout="dv",
    logit_softcap=None,
    temperature=1.0,
    class_weights=None,
    ignore_index=None,
    z_loss=0.0,
    **options,
):
    """The unfused plain-JAX computation, returning (loss, CrossEntropyAux)."""
    z = x @ (w if w_layout == "dv" else w.T)
    if bias is not None:
        z = z + bias
    if logit_softcap is not None:
        z = logit_softcap * jnp.tanh(z / logit_softcap)
    u = z / temperature
    rows = jxent.softmax_cross_entropy_with_integer_labels(
        u, labels, class_weights=class_weights, ignore_index=ignore_index, z_loss=z_loss, **options
    )
    counted = (labels != ignore_index) & (labels >= 0) & (labels < u.shape[1])
    w_y = (
        jnp.ones(u.shape[0])
        if class_weights is None
        else jnp.take(jnp.asarray(class_weights), jnp.clip(labels, 0, u.shape[1] - 1))
    )
    w_y = jnp.where(counted, w_y, 0.0)
    t = jnp.ones(u.shape[0]) if weights is None else weights
    lse = jax.nn.logsumexp(u, axis=1)

    def reduce(values):
        if reduction == "none":
            return values * t
        total = jnp.sum(values * t)
        if reduction == "sum":
            return total
        denominator = jnp.sum(w_y * t) if normalizer is None else normalizer
        return jnp.where(
            denominator == 0, 0.0, total / jnp.where(denominator == 0, 1.0, denominator)
        )

    log_p = jax.nn.log_softmax(u, axis=1)
    argmax = jnp.argmax(u, axis=1).astype(jnp.int32)
    aux = CrossEntropyAux(
        lse=lse,
        z_loss=reduce(jnp.where(counted, z_loss * lse**2, 0.0)),
        entropy=-jnp.sum(jnp.exp(log_p) * log_p, axis=1),
        argmax=argmax,
        correct=(argmax == labels) & counted,
        counted=counted,
    )
    return reduce(rows), aux


def _assert_aux(got, want, rtol=2e-5, atol=1e-6):
    for name in ("lse", "z_loss", "entropy"):
        np.testing.assert_allclose(
            getattr(got, name), want[name], rtol=rtol, atol=atol, err_msg=name
        )
    for name in ("argmax", "correct", "counted"):
        np.testing.assert_array_equal(getattr(got, name), want[name], err_msg=name)
    assert got.argmax.dtype == jnp.int32


@pytest.mark.parametrize("logits", list(LOGITS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_values_against_float64(kernel, reduction, logits):
    options = LOGITS[logits]
    got, aux = KERNELS[kernel](
        X, W, Y, bias=B, weights=T, reduction=reduction, return_aux=True, chunk_size=8, **options
    )
    want, want_aux = reference64(X, W, Y, bias=B, weights=T, reduction=reduction, **options)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    _assert_aux(aux, want_aux)
    np.testing.assert_allclose(aux.accuracy, np.mean(want_aux["correct"][want_aux["counted"]]))


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_normalizer_against_float64(kernel):
    got, aux = KERNELS[kernel](
        X, W, Y, bias=B, weights=T, normalizer=jnp.float32(41.5), return_aux=True, **OPTIONS
    )
    want, want_aux = reference64(X, W, Y, bias=B, weights=T, normalizer=41.5, **OPTIONS)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    np.testing.assert_allclose(aux.z_loss, want_aux["z_loss"], rtol=2e-5)
    # A normaliser of 0 gives 0 (reduce_loss's rule), with zero gradient.
    zero = KERNELS[kernel](X, W, Y, normalizer=0.0, ignore_index=-100)
    assert float(zero) == 0.0


def _objective(fn, field, reduction, **kwargs):
    """A scalar mixing the loss and one aux field (``"all"``: every one) with fixed random
    cotangents, so that each field's gradient is checked on its own."""
    rng = np.random.default_rng(5)
    v_loss, v_lse, v_ent = (jnp.asarray(rng.normal(size=N), jnp.float32) for _ in range(3))

    def objective(x, w, b, t):
        loss, aux = fn(x, w, Y, bias=b, weights=t, reduction=reduction, **kwargs)
        total = 0.0
        if field in ("loss", "all"):
            total += jnp.sum(v_loss * loss) if reduction == "none" else loss
        if field in ("lse", "all"):
            total += jnp.sum(v_lse * aux.lse)
        if field in ("entropy", "all"):
            total += jnp.sum(v_ent * aux.entropy)
        if field in ("z_loss", "all"):
            total += jnp.sum(v_loss * aux.z_loss) if reduction == "none" else 3.0 * aux.z_loss
        return total

    return objective


def _check_gradients(kernel, field, reduction, **options):
    fused = functools.partial(KERNELS[kernel], return_aux=True, chunk_size=8)
    got = jax.grad(_objective(fused, field, reduction, **options), argnums=(0, 1, 2, 3))(X, W, B, T)
    want = jax.grad(_objective(composed, field, reduction, **options), argnums=(0, 1, 2, 3))(
        X, W, B, T
    )
    for name, g, h in zip(("x", "w", "bias", "weights"), got, want, strict=True):
        np.testing.assert_allclose(g, h, rtol=2e-4, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("field", ["loss", *AUX_FIELDS])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_gradient_of_each_output(kernel, field):
    """d/dx, dw, dbias, dweights of the loss and of each aux field alone (the loss's own
    cotangent then a symbolic zero)."""
    _check_gradients(kernel, field, "mean", **OPTIONS)


@pytest.mark.parametrize("logits", list(LOGITS))
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_gradients_of_everything_at_once(kernel, reduction, logits):
    _check_gradients(kernel, "all", reduction, **LOGITS[logits])


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_gradients_with_a_normalizer(kernel):
    fused = functools.partial(KERNELS[kernel], normalizer=jnp.float32(17.0), **OPTIONS)

    def reference(*args, **kwargs):
        return composed(*args, normalizer=jnp.float32(17.0), **OPTIONS, **kwargs)[0]

    def objective(fn):
        return lambda x, w, t: fn(x, w, Y, weights=t)

    got = jax.grad(objective(fused), argnums=(0, 1, 2))(X, W, T)
    want = jax.grad(objective(reference), argnums=(0, 1, 2))(X, W, T)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(g, h, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_aux_only_logged_leaves_the_loss_and_its_gradient_alone(kernel):
    """``return_aux=True`` with the aux outputs only logged (``has_aux``): the same loss and
    gradients as ``return_aux=False``."""
    fused = KERNELS[kernel]
    plain = jax.value_and_grad(lambda x, w: fused(x, w, Y, **OPTIONS), argnums=(0, 1))(X, W)
    (value, aux), grads = jax.value_and_grad(
        lambda x, w: fused(x, w, Y, return_aux=True, **OPTIONS), argnums=(0, 1), has_aux=True
    )(X, W)
    np.testing.assert_allclose(value, plain[0], rtol=1e-6)
    for g, h in zip(grads, plain[1], strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)
    assert isinstance(aux, CrossEntropyAux)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_vd_layout_equals_dv(kernel):
    """w as [V, D]: the same values and aux outputs, and w's gradient transposed."""
    fused = functools.partial(KERNELS[kernel], return_aux=True, **OPTIONS)

    def run(w, layout):
        def objective(x, w, b):
            loss, aux = fused(x, w, Y, bias=b, w_layout=layout)
            return loss + jnp.sum(aux.entropy), aux

        return jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(X, w, B)

    (dv_value, dv_aux), dv_grads = run(W, "dv")
    (vd_value, vd_aux), vd_grads = run(jnp.asarray(W.T), "vd")
    np.testing.assert_allclose(vd_value, dv_value, rtol=1e-6)
    for a, b in zip(vd_aux, dv_aux, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert vd_grads[1].shape == (V, D)
    np.testing.assert_allclose(vd_grads[1].T, dv_grads[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vd_grads[0], dv_grads[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vd_grads[2], dv_grads[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_vd_layout_makes_no_transposed_copy_of_w(kernel):
    """The compiled CPU program of loss, gradients and aux outputs holds no [D, V] array and
    no copy or transpose of w ([V, D]). (tests/benchmarks/test_aot.py checks H100, v5e.)"""
    n, d, v = 64, 48, 320
    spec = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((v, d), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    fused = KERNELS[kernel] if kernel == "chunked" else _fused_linear.with_kernel("blocked", 128)

    def loss(x, w, y):
        value, aux = fused(x, w, y, w_layout="vd", chunk_size=16, return_aux=True)
        return value + jnp.sum(aux.entropy)

    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*spec).compile().as_text()
    assert_no_transposed_copy_of_w(text, v, d)


@pytest.mark.compiled_memory
def test_return_aux_adds_no_logits_sized_buffer():
    """Compiled temp memory of loss and gradients (CPU, chunked kernel): with the aux outputs
    only logged, the same as without them; with their gradients used (the re-forming pass
    runs), at most its [D, V] accumulators more, never a [chunk, V] block (let alone [N, V])."""
    n, d, v = 4096, 64, 8192
    spec = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def temp_bytes(fn, has_aux=False):
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=has_aux))
        return step.lower(*spec).compile().memory_analysis().temp_size_in_bytes

    def fused(x, w, y, **kwargs):
        return jxent.fused_linear_cross_entropy(x, w, y, chunk_size=512, **kwargs)

    def aux_used(x, w, y):
        loss, aux = fused(x, w, y, return_aux=True)
        return loss + jnp.mean(aux.entropy) + jnp.mean(aux.lse)

    plain = temp_bytes(fused)
    logged = temp_bytes(functools.partial(fused, return_aux=True), has_aux=True)
    chunk, accumulator = 512 * v * 4, d * v * 4
    assert logged <= plain + accumulator // 4
    assert temp_bytes(aux_used) <= plain + 2 * accumulator + accumulator // 4 < plain + chunk


@pytest.mark.parametrize("kernel", ["auto", "blocked"])
def test_explicit_mesh_with_w_vocabulary_sharded_in_vd_layout(kernel):
    """Rows over "b", w's vocabulary (axis 0 in "vd") over "v": the per-row aux statistics
    merge across the vocabulary's devices (psum'd entropy, global argmax)."""
    fused = jxent.fused_linear_cross_entropy
    if kernel == "blocked":
        fused = _fused_linear.with_kernel("blocked", 3)
    mesh = jax.make_mesh((4, 2), ("b", "v"), axis_types=(AxisType.Explicit,) * 2)
    n = 32
    x, w, b, y, t = _inputs(3, n=n, v=40)
    w_vd = np.ascontiguousarray(w.T)
    options = dict(label_smoothing=0.1, z_loss=1e-2, temperature=1.5, ignore_index=-100)

    def objective(x, w, b, t, y):
        loss, aux = fused(x, w, y, bias=b, weights=t, w_layout="vd", return_aux=True, **options)
        return loss + jnp.sum(aux.entropy) + aux.z_loss, aux

    step = jax.value_and_grad(objective, argnums=(0, 1, 2, 3), has_aux=True)
    with jax.set_mesh(mesh):
        args = (
            jax.device_put(x, NamedSharding(mesh, P("b", None))),
            jax.device_put(w_vd, NamedSharding(mesh, P("v", None))),
            jax.device_put(b, NamedSharding(mesh, P("v"))),
            jax.device_put(t, NamedSharding(mesh, P("b"))),
            jax.device_put(y, NamedSharding(mesh, P("b"))),
        )
        (value, aux), grads = jax.jit(step)(*args)
    (want_value, want_aux), want_grads = step(x, w_vd, b, t, y)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for a, c in zip(aux, want_aux, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    for g, h in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6)
    assert tuple(jax.typeof(grads[1]).sharding.spec)[:1] == ("v",)


# (kernel, V): on a 2 x 4 Auto mesh the blocked kernel views the vocabulary as
# [gcd(V, 8), V / gcd(V, 8)]: 8 groups of 5 classes (blocks of 2, the last overlapping), or
# with V = 36 (not a multiple of the 8 devices) 4 groups of 9, one a device of "v".
AUTO_MESH_CASES = [("auto", 40), ("blocked", 40), ("blocked", 36)]


@pytest.mark.parametrize(("kernel", "v"), AUTO_MESH_CASES)
def test_auto_mesh_with_w_vocabulary_sharded_in_vd_layout(kernel, v):
    mesh = jax.make_mesh((2, 4), ("b", "v"), axis_types=(AxisType.Auto,) * 2)
    x, w, _, y, t = _inputs(4, n=16, v=v)
    w_vd = np.ascontiguousarray(w.T)
    fused = _fused_linear.with_kernel(kernel, 2 if kernel == "blocked" else 0)

    def objective(x, w, t):
        loss, aux = fused(
            x,
            w,
            y,
            weights=t,
            w_layout="vd",
            return_aux=True,
            z_loss=1e-2,
            ignore_index=-100,
            label_smoothing=0.1,
        )
        return loss + jnp.sum(aux.lse) + jnp.sum(aux.entropy), aux

    step = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)
    xs = jax.device_put(x, NamedSharding(mesh, P("b", None)))
    ws = jax.device_put(w_vd, NamedSharding(mesh, P("v", None)))
    compiled = jax.jit(step).lower(xs, ws, t).compile()
    (value, aux), grads = compiled(xs, ws, t)
    (want_value, want_aux), want_grads = step(x, w_vd, t)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_array_equal(aux.argmax, want_aux.argmax)
    np.testing.assert_allclose(aux.entropy, want_aux.entropy, rtol=1e-5, atol=1e-6)
    for g, h in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6)
    # w (v x D) is never moved between devices: the collectives carry per-row values, the
    # [16, D] input gradient and (summed over "b") slices of w's gradient.
    assert largest_collective(compiled.as_text(), ("all-gather", "all-to-all")) <= 16 * D


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_auto_mesh_on_accelerators_runs_the_blocked_kernel_over_groups(platform):
    """The public function on an Auto mesh, traced for GPU or TPU (float32 w: the TPU branch
    multiplies each block of w by a loop-dependent 1): the blocked kernel over 8 vocabulary
    groups, equal to one device, with w left where it is."""
    mesh = jax.make_mesh((2, 4), ("b", "v"), axis_types=(AxisType.Auto,) * 2)
    x, w, b, y, _ = _inputs(6, n=16, v=40)
    options = {**OPTIONS, "class_weights": np.linspace(0.5, 2.0, 40, dtype=np.float32)}

    def loss(x, w, b):
        return jxent.fused_linear_cross_entropy(x, w, y, bias=b, **options)

    args = (
        jax.device_put(x, NamedSharding(mesh, P("b", None))),
        jax.device_put(w, NamedSharding(mesh, P(None, "v"))),
        jax.device_put(b, NamedSharding(mesh, P("v"))),
    )
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    with simulated(platform):
        assert "name=_blocked_impl" in str(jax.make_jaxpr(loss)(*args))
        compiled = step.lower(*args).compile()
        value, grads = compiled(*args)
    want_value, want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, b)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for g, h in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6)
    assert largest_collective(compiled.as_text(), ("all-gather", "all-to-all")) <= 16 * D


@pytest.mark.parametrize(
    ("platform", "axis_type"),
    [
        ("cuda", AxisType.Explicit),
        ("cuda", AxisType.Auto),
        ("tpu", AxisType.Explicit),
        ("tpu", AxisType.Auto),
    ],
)
def test_blocked_backward_on_meshes_forms_dx_over_row_tiles(platform, axis_type):
    """On a mesh the blocked kernel's backward pass is split: dw over vocabulary blocks, dx
    over row tiles with the vocabulary blocks inside (two loops more than on one device,
    where dx is one float32 [N, D] sum; for TPU, where a device's 10 classes or a group's 5
    are no multiple of 128, one, over (tile, block) pairs). Every option and the aux
    outputs' cotangents, 40 rows: per device 20 (explicit), or 8 row groups of 5 (Auto),
    in tiles of 2, the last overlapping its predecessor. Equal to one device."""
    mesh = jax.make_mesh((2, 4), ("b", "v"), axis_types=(axis_type,) * 2)
    x, w, b, y, t = _inputs(8, n=40, v=40)
    fused = _fused_linear.with_kernel("blocked", 2)
    options = {**OPTIONS, "class_weights": np.linspace(0.5, 2.0, 40, dtype=np.float32)}

    def objective(x, w, b, t):
        loss, aux = fused(x, w, y, bias=b, weights=t, return_aux=True, **options)
        return loss + jnp.sum(jnp.cos(aux.lse)) + jnp.sum(aux.entropy)

    step = jax.value_and_grad(objective, argnums=(0, 1, 2, 3))
    args = (x, w, b, t)
    with simulated(platform):
        loops_one = str(jax.make_jaxpr(step)(*args)).count("scan[")
        want_value, want_grads = jax.jit(step)(*args)
        with jax.set_mesh(mesh):
            specs = (P("b", None), P(None, "v"), P("v"), P("b"))
            sharded = [
                jax.device_put(a, NamedSharding(mesh, spec))
                for a, spec in zip(args, specs, strict=True)
            ]
            loops_mesh = str(jax.make_jaxpr(step)(*sharded)).count("scan[")
            value, grads = jax.jit(step)(*sharded)
    assert loops_mesh == loops_one + (1 if platform == "tpu" else 2)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for g, h in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6)


def test_export_round_trip():
    def step(x, w, y, t):
        def objective(x, w):
            loss, aux = jxent.fused_linear_cross_entropy(
                x, w, y, weights=t, w_layout="vd", return_aux=True, temperature=2.0
            )
            return loss + jnp.sum(aux.entropy), aux.argmax

        return jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(x, w)

    n = export.symbolic_shape("n")[0]
    exported = export.export(jax.jit(step))(
        jax.ShapeDtypeStruct((n, D), jnp.float32),
        jax.ShapeDtypeStruct((V, D), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
    )
    restored = export.deserialize(exported.serialize())
    args = (X, np.ascontiguousarray(W.T), np.where(Y < 0, 0, Y), T)
    got, want = restored.call(*args), jax.jit(step)(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=0.0), r"temperature must be a finite float > 0, got 0.0"),
        (dict(w_layout="dt"), r"w_layout must be one of \('dv', 'vd'\), got 'dt'"),
        (
            dict(weights=np.ones(3)),
            r"weights must have shape \(29,\) \(the labels' shape: one weight per token\), "
            r"got shape \(3,\)",
        ),
        (dict(normalizer=2.0, reduction="sum"), r"normalizer .* got reduction='sum'"),
        (dict(w_layout="vd"), r"x's last dimension must equal w's D dimension \(axis 1"),
    ],
)
def test_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jxent.fused_linear_cross_entropy(X, W, Y, **kwargs)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_argmax_is_the_first_of_equal_maxima(kernel, temperature):
    """Integer-valued inputs make exact ties; the first tied class wins, as in jnp.argmax,
    across the blocked kernel's blocks too (classes 4 and 9 lie in different blocks of 5).
    (Tempered, the argmax comes from another pass over the logits than the normaliser's.)"""
    w = np.zeros((2, 12), np.float32)
    w[:, [4, 9]] = [[1.0, 1.0], [2.0, 2.0]]
    w[:, 11] = [1.0, 1.0]
    x = np.array([[1.0, 1.0], [3.0, -1.0], [-1.0, -1.0], [0.0, 0.0]], np.float32)
    _, aux = KERNELS[kernel](x, w, np.array([4, 9, 0, 3]), return_aux=True, temperature=temperature)
    # Row 1: class 11 alone is largest; row 2: the zeros, first at class 0; row 3: all 0.
    np.testing.assert_array_equal(aux.argmax, [4, 11, 0, 0])
    np.testing.assert_array_equal(aux.correct, [True, False, True, False])


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_float64_against_float64_reference(kernel, x64):
    x, w, b = (np.asarray(a, np.float64) for a in (X, W, B))
    got, aux = KERNELS[kernel](x, w, Y, bias=b, weights=np.float64(T), return_aux=True,
                               reduction="sum", **OPTIONS)  # fmt: skip
    want, want_aux = reference64(x, w, Y, bias=b, weights=T, reduction="sum", **OPTIONS)
    assert got.dtype == aux.lse.dtype == aux.entropy.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-12)
    _assert_aux(aux, want_aux, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_gradients_raise_nothing_under_debug_nans(kernel):
    """Valid input: no NaN in any value or gradient, aux outputs' included (the blocked
    kernel's first merge starts from lse = -inf; its last block's overlap is masked)."""
    with jax.debug_nans(True):
        _check_gradients(kernel, "all", "mean", **OPTIONS)


@pytest.mark.parametrize("kw", [{}, {"temperature": 2.0}, {"logit_softcap": 30.0}], ids=str)
def test_aux_argmax_and_entropy_with_run_maxima(kw):
    """1000 classes: the CPU kernel takes each chunk's row max and argmax from the maxima of
    runs of 50 classes (plain logits) or from its own passes (capped or tempered): either
    way the first of equal maxima of the exact logits (small integers: many ties, one row
    all zero) and the reference's entropy."""
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 4, size=(40, 8)).astype(np.float32)
    w = rng.integers(-3, 4, size=(8, 1000)).astype(np.float32)
    x[3] = 0.0
    y = rng.integers(0, 1000, size=40)
    _, aux = jxent.fused_linear_cross_entropy(
        jnp.asarray(x), jnp.asarray(w), jnp.asarray(y), return_aux=True, chunk_size=16, **kw
    )
    z = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_array_equal(aux.argmax, np.argmax(z, axis=-1))
    if "logit_softcap" in kw:
        z = kw["logit_softcap"] * np.tanh(z / kw["logit_softcap"])
    stats = ref.row_statistics(z, temperature=kw.get("temperature", 1.0))
    np.testing.assert_allclose(aux.entropy, stats["entropy"], rtol=1e-5, atol=1e-5)
