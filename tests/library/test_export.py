"""``jax.export`` with symbolic batch and class dimensions, and per-backend lowering.

Exported programs must not depend on Python comparisons of symbolic dimensions; each lowering
platform gets its own code path (``lax.platform_dependent``), checked here on the lowered
StableHLO without any accelerator.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jxent
from jxent import _fused_linear, _reductions

# name -> fn(logits, labels, targets) -> scalar
LOSSES = {
    "logsumexp": lambda x, y, t: jnp.sum(jxent.logsumexp(x, axis=-1) * jnp.cos(x[:, 0])),
    "softmax": lambda x, y, t: jnp.sum(jxent.softmax(x) * t),
    "log_softmax": lambda x, y, t: jnp.sum(jxent.log_softmax(x) * t),
    "cross_entropy": lambda x, y, t: jxent.cross_entropy(x, y),
    "integer_ce_options": lambda x, y, t: jxent.cross_entropy(
        x, y, ignore_index=2, label_smoothing=0.1, z_loss=1e-3
    ),
    "dense_ce": lambda x, y, t: jxent.cross_entropy(x, t, label_smoothing=0.1),
    "nll": lambda x, y, t: jxent.nll_loss(jxent.log_softmax(x), y, reduction="mean"),
    "binary_ce": lambda x, y, t: jnp.sum(jxent.sigmoid_binary_cross_entropy(x, t)),
    "kl": lambda x, y, t: jnp.sum(jxent.kl_divergence(jxent.log_softmax(x), t)),
    "kl_log": lambda x, y, t: jnp.sum(jxent.kl_divergence_with_log_targets(x, jnp.log(t))),
}
# Two sizes per exported program: a short row and a long one that is blocked when concrete.
SIZES = [(3, 7), (2, 40000)]


def _inputs(batch, classes, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    logits = jax.random.normal(keys[0], (batch, classes)) * 2
    labels = jax.random.randint(keys[1], (batch,), 0, classes)
    targets = jax.nn.softmax(jax.random.normal(keys[2], (batch, classes)))
    return logits, labels, targets


def _round_trip(fn, *specs):
    exported = export.export(fn)(*specs)
    return export.deserialize(exported.serialize())


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSSES)
def test_export_symbolic_batch_and_classes(name):
    step = jax.jit(jax.value_and_grad(LOSSES[name]))
    b, v = export.symbolic_shape("b, v")
    restored = _round_trip(
        step,
        jax.ShapeDtypeStruct((b, v), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((b, v), jnp.float32),
    )
    for batch, classes in SIZES:
        args = _inputs(batch, classes)
        got_value, got_grad = restored.call(*args)
        want_value, want_grad = step(*args)
        np.testing.assert_allclose(got_value, want_value, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["auto", "blocked"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_export_fused_linear_cross_entropy(reduction, kernel):
    """``kernel="blocked"`` (GPU and TPU's vocabulary blocks, forced here on the CPU) with a
    symbolic ``V`` takes blocks of ``min(V, 1024)`` classes and a traced number of them."""

    def loss(x, w, y):
        out = _fused_linear.with_kernel(kernel)(x, w, y, label_smoothing=0.1, reduction=reduction)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype)))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    b, v = export.symbolic_shape("b, v")
    restored = _round_trip(
        step,
        jax.ShapeDtypeStruct((b, 8), jnp.float32),
        jax.ShapeDtypeStruct((8, v), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )
    for rows, classes in [(5, 16), (300, 40), (7, 2100)]:
        keys = jax.random.split(jax.random.key(rows), 3)
        x = jax.random.normal(keys[0], (rows, 8))
        w = jax.random.normal(keys[1], (8, classes)) * 0.5
        y = jax.random.randint(keys[2], (rows,), 0, classes)
        got_value, got_grads = restored.call(x, w, y)
        want_value, want_grads = step(x, w, y)
        np.testing.assert_allclose(got_value, want_value, rtol=2e-5)
        for got, want in zip(got_grads, want_grads, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_export_for_cpu_and_cuda_in_one_artifact():
    """One exported program carries both lowerings; the CPU one runs here."""
    step = jax.jit(jax.value_and_grad(LOSSES["cross_entropy"]))
    args = _inputs(4, 65536)
    exported = export.export(step, platforms=("cpu", "cuda"))(*args)
    assert exported.platforms == ("cpu", "cuda")
    got = export.deserialize(exported.serialize()).call(*args)
    np.testing.assert_allclose(got[0], step(*args)[0], rtol=1e-6)


# ----------------------------------------------------------------------------- per backend


def _lowered(name, classes, platform):
    step = jax.jit(jax.value_and_grad(LOSSES[name]))
    args = [
        jax.ShapeDtypeStruct((4, classes), jnp.float32),
        jax.ShapeDtypeStruct((4,), jnp.int32),
        jax.ShapeDtypeStruct((4, classes), jnp.float32),
    ]
    return step.trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("classes", [65536, 50257])
def test_long_rows_are_blocked_on_cpu_and_gpu_not_tpu(name, classes):
    """CPU reduces long rows in blocks behind an optimization barrier (also for vocabularies
    that are not a multiple of 8192: 50257 = 29 x 1733); CUDA too, in blocks of at most
    16384 (see docs/accelerator_kernels.md); TPU gets whole-row reductions, no barrier."""
    if name in ("binary_ce", "kl", "kl_log"):
        pytest.skip("no reduction over classes in its kernel")
    assert "optimization_barrier" in _lowered(name, classes, "cpu")
    if name not in ("logsumexp", "cross_entropy"):
        # (Their only class reduction is the online normaliser: blocked by a reshape, with
        # no barrier, since XLA does not merge a custom reduction's two levels.)
        assert "optimization_barrier" in _lowered(name, classes, "cuda")
    assert "optimization_barrier" not in _lowered(name, classes, "tpu")


@pytest.mark.parametrize("name", ["cross_entropy", "integer_ce_options"])
def test_integer_target_term_scatter_on_cpu_compare_elsewhere(name):
    assert "stablehlo.scatter" in _lowered(name, 1000, "cpu")
    for platform in ("cuda", "tpu"):
        assert "stablehlo.scatter" not in _lowered(name, 1000, platform)


def test_accelerators_recompute_exponentials_instead_of_saving_them():
    """On CPU the short-row CE saves exp(x - max) for its backward pass (one logits-sized
    exponential in all); on CUDA and TPU it keeps only the logits and the backward pass
    recomputes the exponentials (two), reading the logits once and writing the gradient once.
    """

    def exponentials(platform):
        text = _lowered("cross_entropy", 1000, platform)
        return sum(
            "stablehlo.exponential" in line and "4x1000" in line for line in text.splitlines()
        )

    assert exponentials("cpu") == 1
    assert exponentials("cuda") == exponentials("tpu") == 2


def test_block_size_rule():
    assert _reductions.block_size(32000) is None
    assert _reductions.block_size(65536) == 8192
    assert _reductions.block_size(128256) == 8016  # a divisor near 8192
    assert _reductions.block_size(50257) == 1733  # 29 blocks
    assert _reductions.block_size(100277) == 673
    assert _reductions.block_size(50261) is None  # a prime: no blocking
    assert _reductions.block_size(export.symbolic_shape("v")[0]) is None


@pytest.mark.parametrize("classes", [50257, 100277])
def test_blocks_that_are_not_near_8192_match_float64(classes):
    logits = np.random.default_rng(classes).normal(size=(3, classes)).astype(np.float32) * 4
    labels = np.array([0, classes - 1, classes // 2])
    x64 = logits.astype(np.float64)
    lse = np.log(np.sum(np.exp(x64 - x64.max(-1, keepdims=True)), -1)) + x64.max(-1)
    np.testing.assert_allclose(jxent.logsumexp(logits, axis=-1), lse, rtol=1e-6)
    loss, grad = jax.value_and_grad(jxent.cross_entropy)(logits, labels)
    np.testing.assert_allclose(loss, np.mean(lse - x64[np.arange(3), labels]), rtol=1e-6)
    p = np.exp(x64 - lse[:, None])
    p[np.arange(3), labels] -= 1
    np.testing.assert_allclose(grad, p / 3, atol=1e-8)


def test_fused_loss_kernel_per_platform():
    """One jitted function, a kernel per platform: CPU scans chunks of 32 tokens over all
    classes ([32, V] logits) and adds xᵀ dz into dw block by block (D > T, V > 8192: an
    inner loop); CUDA and TPU run the vocabulary-blocked kernel (at N = 64 one block covers
    the vocabulary: [64, V] logits) and never the CPU's chunk."""

    def loss(x, w, y):
        return jxent.fused_linear_cross_entropy(x, w, y, chunk_size=32)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    args = (
        jax.ShapeDtypeStruct((64, 512), jnp.float32),
        jax.ShapeDtypeStruct((512, 16384), jnp.float32),
        jax.ShapeDtypeStruct((64,), jnp.int32),
    )

    def lowered(platform):
        return step.trace(*args).lower(lowering_platforms=(platform,)).as_text()

    cpu = lowered("cpu")
    assert "tensor<32x16384xf32>" in cpu and "tensor<512x8192xf32>" in cpu  # chunk, dw block
    assert "tensor<64x16384xf32>" not in cpu
    for platform in ("cuda", "tpu"):
        text = lowered(platform)
        assert "tensor<64x16384xf32>" in text
        assert "tensor<32x16384xf32>" not in text and "tensor<512x8192xf32>" not in text
