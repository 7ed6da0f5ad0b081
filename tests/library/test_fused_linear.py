"""Tests for jxent's fused linear + cross-entropy against an unfused float64 reference.

The reference forms the float64 logits ``x @ w + b`` (soft-capped when asked) with NumPy and
hands them to the independent float64 cross-entropy reference in ``tests/library/reference.py``; the
gradients for ``x``, ``w`` and ``bias`` follow from its logits gradient by the chain rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
import reference as ref
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from platforms import simulated

from jxent import _fused_linear
from jxent._fused_linear import fused_linear_cross_entropy
from jxent._fused_linear_kernels import default_chunk_size, vocab_block_size

pytestmark = pytest.mark.numerics

N, D, V = 29, 12, 37  # N is not a multiple of the chunk sizes below: padding is exercised.
RTOL = 1e-5


# "auto" is the public function (on CPU: the chunked kernel); "blocked" forces the
# vocabulary-blocked kernel that GPU and TPU run, in blocks of 3 classes, so that every test
# has several blocks and a last one overlapping its predecessor.
KERNELS = {"auto": {}, "blocked": {"kernel": "blocked", "vocab_block": 3}}


@pytest.fixture(params=list(KERNELS))
def kernel(request):
    return request.param


def _fused(kernel):
    if kernel == "auto":
        return fused_linear_cross_entropy
    return _fused_linear.with_kernel(**KERNELS[kernel])


def _inputs(seed=0, n=N, d=D, v=V):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32) * 3
    b = rng.normal(size=(v,)).astype(np.float32)
    y = rng.integers(0, v, size=(n,)).astype(np.int32)
    return x, w, b, y


X, W, B, Y = _inputs()
CLASS_WEIGHTS = np.random.default_rng(1).uniform(0.2, 2.0, size=(V,)).astype(np.float32)
COTANGENT = np.random.default_rng(2).normal(size=(N,))


def reference(x, w, labels, *, bias=None, logit_softcap=None, cotangent=None, **options):
    """(value, dx, dw, dbias) of the unfused computation in float64."""
    x64 = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    w64 = np.asarray(w, np.float64)
    z = x64 @ w64
    if bias is not None:
        z = z + np.asarray(bias, np.float64)
    capped = None
    if logit_softcap is not None:
        capped = np.tanh(z / logit_softcap)
        z = logit_softcap * capped
    options = dict(options)
    if "class_weights" in options:
        options["weights"] = options.pop("class_weights")
    result = ref.integer_cross_entropy(
        z, np.asarray(labels).reshape(-1), cotangent=cotangent, **options
    )
    dz = result.grads["logits"]
    if capped is not None:
        dz = dz * (1.0 - capped**2)
    value = result.value
    if options.get("reduction") == "none":
        value = np.asarray(value).reshape(np.shape(labels))
    return value, (dz @ w64.T).reshape(np.shape(x)), x64.T @ dz, dz.sum(axis=0)


def _objective(reduction, cotangent):
    """The scalar that is differentiated: the loss, or Σ v_n·loss_n for reduction="none"."""
    if reduction == "none":
        return lambda loss: jnp.sum(loss * jnp.asarray(cotangent, jnp.float32).reshape(loss.shape))
    return lambda loss: loss


def _assert_close(got, want, rtol=RTOL):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    scale = np.max(np.abs(want[np.isfinite(want)]), initial=0.0)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


OPTIONS = {
    "plain": {},
    "bias": {"bias": B},
    "class_weights": {"class_weights": CLASS_WEIGHTS},
    "ignore_index": {"ignore_index": int(Y[0])},  # ignores every example of that class
    "label_smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"logit_softcap": 2.5},
    "everything": {
        "bias": B,
        "class_weights": CLASS_WEIGHTS,
        "ignore_index": int(Y[0]),
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "logit_softcap": 3.0,
    },
}


# "sum" only differs from "mean" by the divisor: it runs with two option sets, to keep the
# suite fast; "mean" and "none" (a different backward pass) run with every option.
CASES = [(o, r) for o in OPTIONS for r in ("mean", "none")] + [
    ("plain", "sum"),
    ("everything", "sum"),
]


@pytest.mark.parametrize(("option", "reduction"), CASES)
def test_value_and_grads_match_unfused_float64(kernel, option, reduction):
    options = OPTIONS[option]
    bias = options.get("bias")
    kwargs = {k: v for k, v in options.items() if k != "bias"}
    want_value, want_dx, want_dw, want_db = reference(
        X, W, Y, bias=bias, reduction=reduction, cotangent=COTANGENT, **kwargs
    )
    objective = _objective(reduction, COTANGENT)

    def loss(x, w, b):
        out = _fused(kernel)(x, w, Y, bias=b, chunk_size=8, reduction=reduction, **kwargs)
        return objective(out), out

    argnums = (0, 1, 2) if bias is not None else (0, 1)
    step = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))
    (_, value), grads = step(X, W, bias)
    _assert_close(value, want_value)
    _assert_close(grads[0], want_dx)
    _assert_close(grads[1], want_dw)
    if bias is not None:
        _assert_close(grads[2], want_db)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_evaluation_path_matches_gradient_path(kernel, reduction):
    """Without differentiation no gradient work is done; the value must be the same."""
    kwargs = OPTIONS["everything"]
    value = _fused(kernel)(X, W, Y, chunk_size=8, reduction=reduction, **kwargs)
    _assert_close(value, reference(X, W, Y, reduction=reduction, **kwargs)[0])


@pytest.mark.parametrize("chunk_size", [None, 1, 29])
def test_chunk_size_does_not_change_the_result(chunk_size):
    want_value, want_dx, want_dw, _ = reference(X, W, Y, reduction="mean")
    loss = functools.partial(fused_linear_cross_entropy, labels=Y, chunk_size=chunk_size)
    value, (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1))(X, W)
    _assert_close(value, want_value)
    _assert_close(dx, want_dx)
    _assert_close(dw, want_dw)


def test_batch_shape_and_reduction_none_shape(kernel):
    x = X[:28].reshape(2, 14, D)
    y = Y[:28].reshape(2, 14)
    out = _fused(kernel)(x, W, y, reduction="none", chunk_size=8)
    assert out.shape == (2, 14) and out.dtype == jnp.float32
    want = reference(x, W, y, reduction="none")[0]
    _assert_close(out, want)
    dx = jax.grad(lambda x: _fused(kernel)(x, W, y, chunk_size=8))(x)
    assert dx.shape == x.shape
    _assert_close(dx, reference(x, W, y, reduction="mean")[1])


def test_long_vocabulary_blocked_weight_gradient():
    """D > chunk and V above the block size: the [D, V] update runs block by block."""
    x, w, b, y = _inputs(seed=3, n=40, d=24, v=2 * 8192 + 300)
    want_value, want_dx, want_dw, want_db = reference(x, w, y, bias=b, reduction="sum")
    loss = functools.partial(fused_linear_cross_entropy, labels=y, reduction="sum")
    value, (dx, dw, db) = jax.value_and_grad(
        lambda x, w, b: loss(x, w, bias=b, chunk_size=16), argnums=(0, 1, 2)
    )(x, w, b)
    _assert_close(value, want_value)
    _assert_close(dx, want_dx)
    _assert_close(dw, want_dw)
    _assert_close(db, want_db)


@pytest.mark.parametrize("bad_label", [V, V + 5, -1])
def test_out_of_range_label_gives_nan_for_that_example_only(kernel, bad_label):
    y = Y.copy()
    y[4] = bad_label
    out = _fused(kernel)(X, W, y, reduction="none", ignore_index=-100, chunk_size=8)
    assert np.isnan(out[4])
    assert np.all(np.isfinite(np.delete(np.asarray(out), 4)))
    assert np.isnan(_fused(kernel)(X, W, y))
    # Not wrapped to another class: the other examples are untouched.
    _assert_close(
        np.delete(np.asarray(out), 4), np.delete(reference(X, W, Y, reduction="none")[0], 4)
    )


def test_all_ignored_mean_is_zero_with_zero_gradient(kernel):
    y = np.full_like(Y, -100)
    loss = functools.partial(
        _fused(kernel), labels=y, ignore_index=-100, label_smoothing=0.1, z_loss=0.1
    )
    value, (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1))(X, W)
    assert value == 0.0
    assert not np.any(dx) and not np.any(dw)


@pytest.mark.slow
def test_vmap_matches_a_loop(kernel):
    xs = np.stack([X, _inputs(seed=5)[0]])
    ys = np.stack([Y, _inputs(seed=5)[3]])

    def loss(x, y, w):
        return _fused(kernel)(x, w, y, label_smoothing=0.1, chunk_size=8)

    batched = jax.vmap(jax.value_and_grad(loss, argnums=(0, 2)), in_axes=(0, 0, None))
    values, (dxs, dws) = batched(xs, ys, W)
    for i in range(2):
        want_value, want_dx, want_dw, _ = reference(
            xs[i], W, ys[i], label_smoothing=0.1, reduction="mean"
        )
        _assert_close(values[i], want_value)
        _assert_close(dxs[i], want_dx)
        _assert_close(dws[i], want_dw)


@pytest.mark.slow
def test_bfloat16_inputs_accumulate_in_float32(kernel):
    x16, w16 = jnp.asarray(X, jnp.bfloat16), jnp.asarray(W, jnp.bfloat16)
    loss = functools.partial(_fused(kernel), labels=Y, chunk_size=8)
    value, (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1))(x16, w16)
    assert value.dtype == jnp.float32
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    # The reference sees the same bf16-rounded inputs; what remains is bf16 gradient rounding.
    want_value, want_dx, want_dw, _ = reference(
        np.asarray(x16, np.float32), np.asarray(w16, np.float32), Y, reduction="mean"
    )
    _assert_close(value, want_value, rtol=1e-5)
    _assert_close(dx, want_dx, rtol=2e-2)
    _assert_close(dw, want_dw, rtol=2e-2)


def test_jit_and_float64(kernel, x64):
    x, w = np.asarray(X, np.float64), np.asarray(W, np.float64)
    value, dx = jax.jit(jax.value_and_grad(lambda x: _fused(kernel)(x, w, Y, z_loss=0.1)))(x)
    assert value.dtype == jnp.float64 and dx.dtype == jnp.float64
    want_value, want_dx, _, _ = reference(x, w, Y, z_loss=0.1, reduction="mean")
    _assert_close(value, want_value, rtol=1e-12)
    _assert_close(dx, want_dx, rtol=1e-12)


def test_labels_are_not_differentiated_and_forward_mode_is_refused():
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: fused_linear_cross_entropy(x, W, Y), (X,), (X,))


@pytest.mark.slow
@pytest.mark.parametrize("argnum", [0, 1])
@pytest.mark.parametrize("second_order", ["hessian", "jacrev_of_grad"])
def test_second_derivatives_match_unfused(kernel, argnum, second_order):
    """The backward rule is differentiable: Hessians in x and in w equal the unfused ones."""
    x, w, y = X[:4, :5], W[:5, :7], np.array([0, 3, 6, 2])

    def fused(x, w):
        return _fused(kernel)(x, w, y, z_loss=0.1, label_smoothing=0.2)

    def unfused(x, w):
        logits = x @ w
        log_p = jax.nn.log_softmax(logits)
        smooth = 0.8 * jax.nn.one_hot(y, 7) + 0.2 / 7
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.mean(-jnp.sum(smooth * log_p, axis=-1) + 0.1 * lse**2)

    if second_order == "hessian":
        got = jax.hessian(fused, argnum)(x, w)
    else:
        got = jax.jacrev(jax.grad(fused, argnum), argnum)(x, w)
    np.testing.assert_allclose(got, jax.hessian(unfused, argnum)(x, w), atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": np.zeros((4, 5), np.float32)}, ValueError, r"x of shape \(4, 5\).*w of shape"),
        ({"labels": np.zeros((3,), np.int32)}, ValueError, r"labels of shape \(3,\)"),
        ({"labels": np.zeros((N,), np.float32)}, TypeError, "integer dtype"),
        ({"x": np.zeros((N, D), np.int32)}, TypeError, "x must have a floating dtype"),
        ({"w": np.zeros((D, V), np.int32)}, TypeError, "w must have a floating dtype"),
        ({"w": np.zeros((D, V, 1), np.float32)}, ValueError, r"w must have shape \[D, V\]"),
        ({"bias": np.zeros((V + 1,), np.float32)}, ValueError, r"bias must have shape \(37,\)"),
        ({"class_weights": np.ones((V - 1,))}, ValueError, r"class_weights must have shape"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must lie in \[0, 1\], got 1.5"),
        ({"label_smoothing": -0.1}, ValueError, r"label_smoothing must lie in \[0, 1\]"),
        ({"z_loss": -1.0}, ValueError, "z_loss must be >= 0"),
        ({"logit_softcap": 0.0}, ValueError, "logit_softcap must be > 0"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
    ],
)
def test_validation_errors_name_the_offending_value(kwargs, error, match):
    args = {"x": X, "w": W, "labels": Y, **kwargs}
    x, w, labels = args.pop("x"), args.pop("w"), args.pop("labels")
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(x, w, labels, **args)


def test_default_chunk_size_rule():
    # K = ceil(N·V·4 B / 256 MiB) equal chunks, rows rounded up to a multiple of 8.
    assert default_chunk_size(4096, 32000) == 2048  # 500 MiB -> 2 chunks
    assert default_chunk_size(8192, 128256) == 512  # 3.9 GiB -> 16 chunks
    assert default_chunk_size(29, 37) == 32  # one chunk, padded to a multiple of 8
    assert default_chunk_size(100_000, 10**7) == 8  # at least 8 rows


# How many [chunk, V] logits blocks XLA:CPU keeps alive in the chunked kernel: one from jaxlib
# 0.10.2 (the lock); two in every older release measured (0.8.2, the floor, to 0.10.1: 136.6 MB
# against 2181 MB unfused at the shape below). Values and gradients are the same; only this
# compiled-memory bound depends on the compiler (docs/compatibility.md).
CPU_BLOCKS_KEPT = 1 if jaxlib.version.__version_info__ >= (0, 10, 2) else 2


def test_compiled_memory_is_far_below_unfused():
    """No [N, V] array in the compiled program (compiled only, nothing is run)."""
    n, d, v = 8192, 64, 32768
    spec = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def unfused(x, w, y):
        logits = x @ w
        target = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target)

    def temp_bytes(fn):
        jitted = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        return jitted.lower(*spec).compile().memory_analysis().temp_size_in_bytes

    fused = temp_bytes(lambda x, w, y: fused_linear_cross_entropy(x, w, y, chunk_size=512))
    block = 512 * v * 4
    assert fused < (CPU_BLOCKS_KEPT + 1) * block  # one (or two) [chunk, V] blocks, never [N, V]
    if CPU_BLOCKS_KEPT == 1:
        assert fused * 16 <= temp_bytes(unfused)


def test_a_bias_costs_no_second_block():
    """On CPU the bias rides in the GEMM ([x, 1] @ [w; b]); added after it, XLA:CPU kept the
    product and the biased logits (two [chunk, V] arrays) alive at once."""
    n, d, v = 2048, 64, 8192
    x, w = jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32)
    y, b = jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((v,), jnp.float32)

    def temp_bytes(fn, *spec):
        jitted = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        return jitted.lower(*spec).compile().memory_analysis().temp_size_in_bytes

    block = n * v * 4
    plain = temp_bytes(lambda x, w, y: fused_linear_cross_entropy(x, w, y, chunk_size=n), x, w, y)
    biased = temp_bytes(
        lambda x, w, y, b: fused_linear_cross_entropy(x, w, y, bias=b, chunk_size=n), x, w, y, b
    )
    assert plain < (CPU_BLOCKS_KEPT + 0.5) * block
    assert biased < plain + block / 4


def _vocab_mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (host) devices: see tests/conftest.py")
    return Mesh(np.array(jax.devices()[:8]), ("vocab",))


@pytest.mark.slow
@pytest.mark.sharding
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_parallel_equals_single_device(kernel, reduction):
    mesh = _vocab_mesh()
    x, w, b, y = _inputs(seed=7, n=21, d=6, v=8 * 5)
    weights = np.random.default_rng(8).uniform(0.5, 1.5, size=(40,)).astype(np.float32)
    y[3] = -100
    options = {
        "ignore_index": -100,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "logit_softcap": 4.0,
        "reduction": reduction,
        "chunk_size": 8,
    }
    cot = np.random.default_rng(9).normal(size=(21,)).astype(np.float32)
    objective = _objective(reduction, cot)

    def local(x, w, b, cw, y):
        out = _fused(kernel)(x, w, y, bias=b, class_weights=cw, axis_name="vocab", **options)
        return objective(out)

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(None, "vocab"), P("vocab"), P("vocab"), P()),
        out_specs=P(),
    )

    def single(x, w, b):
        out = _fused(kernel)(x, w, y, bias=b, class_weights=weights, **options)
        return objective(out)

    got_value, got_grads = jax.jit(
        jax.value_and_grad(lambda x, w, b: sharded(x, w, b, weights, y), argnums=(0, 1, 2))
    )(x, w, b)
    want_value, want_grads = jax.value_and_grad(single, argnums=(0, 1, 2))(x, w, b)
    _assert_close(got_value, want_value)
    for got, want in zip(got_grads, want_grads, strict=True):
        _assert_close(got, want)


def test_vocab_block_size_rule():
    # Multiples of 128 classes whose float32 [N, block] logits fit the accelerator's budget
    # (GPU 64 MiB, TPU 32 MiB), 128 to V.
    assert vocab_block_size(8192, 128256) == 2048
    assert vocab_block_size(8192, 128256, accelerator="tpu") == 1024
    assert vocab_block_size(8192, 16032, accelerator="tpu") == 1024  # a shard of 8 devices
    assert vocab_block_size(4096, 32000) == 4096
    assert vocab_block_size(4096, 32000, accelerator="tpu") == 2048
    assert vocab_block_size(10**6, 32000) == 128
    assert vocab_block_size(29, 37) == 37
    assert vocab_block_size(29, 37, requested=3, accelerator="tpu") == 3


def test_tpu_path_keeps_w_blocks_exact():
    """The TPU branch's loop-variant factor on float32 blocks of w (see
    _fused_linear_kernels._varying_in_loop) changes no value: the blocked kernel traced for
    TPU equals the one traced for GPU."""
    x, w, _, y = _inputs(0, 64, 8, 700)
    loss_grad = jax.value_and_grad(_fused("blocked"), argnums=(0, 1))
    results = []
    for platform in ("cuda", "tpu"):
        with simulated(platform):
            results.append(jax.tree.map(np.asarray, loss_grad(x, w, y)))
    jax.tree.map(np.testing.assert_array_equal, *results)


def _relative_error(got, want):
    """Largest |got - want| relative to max |want| (``want`` in float64)."""
    return np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))


def test_tpu_bfloat16_input_gradient_halves_are_the_float32_sum():
    """For bfloat16 ``x`` the TPU branch keeps the input gradient's float32 sum over the
    vocabulary blocks as two 16-bit halves (``_SplitFloat32Accumulator``: half the
    temporaries), the GPU branch as one float32 array: the same sums, bit for bit, so dx
    and dw are as close to the float64 reference as before, within bfloat16 rounding."""
    x, w, _, y = _inputs(seed=5, n=256, d=64, v=1000)
    x16, w16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    loss = functools.partial(_fused_linear.with_kernel("blocked", vocab_block=128), labels=y)
    grads = jax.grad(loss, argnums=(0, 1))
    results, programs = {}, {}
    for platform in ("cuda", "tpu"):  # 8 blocks, the last overlapping its predecessor
        with simulated(platform):
            programs[platform] = str(jax.make_jaxpr(grads)(x16, w16))
            results[platform] = jax.tree.map(np.asarray, grads(x16, w16))
    assert "bitcast_convert_type" in programs["tpu"]  # the halves are in play...
    assert "bitcast_convert_type" not in programs["cuda"]  # ...and only on TPU
    x32, w32 = np.asarray(x16, np.float32), np.asarray(w16, np.float32)
    want = reference(x32, w32, y, reduction="mean")[1:3]
    errors = {
        platform: [_relative_error(g, r) for g, r in zip(got, want, strict=True)]
        for platform, got in results.items()
    }
    print(
        f"relative (dx, dw) error vs float64: float32 sum {errors['cuda']}, halves {errors['tpu']}"
    )
    jax.tree.map(np.testing.assert_array_equal, results["tpu"], results["cuda"])
    assert max(errors["tpu"]) < 2**-7  # within bfloat16's rounding


@pytest.mark.slow
def test_tpu_bfloat16_input_gradient_halves_are_differentiable():
    """The halves are bit manipulations, which JAX differentiates to zero; their custom JVPs
    carry the tangent instead, so second derivatives through the TPU branch's backward rule
    (here ``d(dx)/dx``, which flows only through the halves) match the GPU branch's."""
    x, w, _, y = _inputs(seed=6, n=12, d=8, v=300)
    x16, w16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    loss = functools.partial(_fused_linear.with_kernel("blocked", vocab_block=128), labels=y)
    second = jax.jacrev(jax.grad(loss), argnums=0)
    results = {}
    for platform in ("cuda", "tpu"):  # 3 blocks
        with simulated(platform):
            results[platform] = np.asarray(second(x16, w16), np.float64)
    scale = np.max(np.abs(results["cuda"]))
    assert scale > 0
    np.testing.assert_allclose(results["tpu"], results["cuda"], rtol=0, atol=2**-7 * scale)


def _dw_error(kernel, x, w, y):
    """Largest |dw - dw_float64| relative to max |dw_float64|, for bfloat16 x and w."""
    x16, w16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    loss = functools.partial(_fused_linear.with_kernel(kernel), labels=y)
    dw = jax.jit(jax.grad(loss, argnums=1))(x16, w16)
    x32, w32 = np.asarray(x16, np.float32), np.asarray(w16, np.float32)
    want = reference(x32, w32, y, reduction="mean")[2]
    return np.max(np.abs(np.asarray(dw, np.float64) - want)) / np.max(np.abs(want))


@pytest.mark.slow
def test_blocked_kernel_bfloat16_weight_gradient_is_as_accurate_as_chunked():
    """The blocked kernel sums each dw column over all N tokens inside one GEMM (float32
    accumulation) and rounds once to bfloat16; the chunked one adds float32 chunk products.
    Both should be within bfloat16 rounding of the float64 reference, and equally close."""
    x, w, _, y = _inputs(seed=11, n=1024, d=64, v=3000)
    chunked = _dw_error("chunked", x, w, y)
    blocked = _dw_error("blocked", x, w, y)
    print(f"relative dw error: chunked {chunked:.2e}, blocked {blocked:.2e}")
    assert chunked < 2**-7 and blocked < 2**-7  # within bfloat16's rounding
    assert blocked <= 1.25 * chunked


def _gradient_program(kernel, n=512, d=256, v=4096, dtype=jnp.bfloat16, vocab_block=0, **options):
    loss = functools.partial(_fused_linear.with_kernel(kernel, vocab_block), **options)
    args = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    return str(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(*args))


def test_blocked_kernel_holds_no_float32_copy_of_w():
    """For bfloat16 w the chunked kernel accumulates dw in a float32 [D, V] array; the
    blocked one (GPU, TPU) writes each block's dw in bfloat16 and keeps float32 only for the
    [N, D] input gradient and [N, block] logits. (Read from the traced program: XLA:CPU turns
    bfloat16 GEMMs into float32 ones, so CPU's compiled memory cannot show it; the compiled
    H100 / TPU numbers are in docs/fused_linear.md.)"""
    assert "f32[256,4096]" in _gradient_program("chunked")
    blocked = _gradient_program("blocked", vocab_block=512)
    assert "f32[256,4096]" not in blocked and "f32[512,4096]" not in blocked
    assert "bf16[256,4096]" in blocked and "f32[512,256]" in blocked
