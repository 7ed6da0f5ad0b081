"""Every public function under every sharding mode JAX offers, on 8 CPU devices.

Meshes are built both ways: ``jax.make_mesh`` (``AxisType.Explicit``, JAX's default since 0.7:
shardings are part of the types) and ``AxisType.Auto`` (GSPMD propagation), with the logits
batch-sharded, class-sharded and 2-D sharded. Each case checks the value and gradient against
one device, the output shardings, and that the compiled program never all-gathers anything of
the logits' size.
"""

import re

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent
from jxent import _fused_linear

pytestmark = pytest.mark.sharding

B, C, D = 16, 64, 8
KEYS = jax.random.split(jax.random.key(7), 6)
LOGITS = jax.random.normal(KEYS[0], (B, C)) * 3
LABELS = jax.random.randint(KEYS[1], (B,), 0, C)
TARGETS = jax.nn.softmax(jax.random.normal(KEYS[2], (B, C)))
WEIGHTS = jax.random.uniform(KEYS[3], (C,), minval=0.5, maxval=2.0)
X = jax.random.normal(KEYS[4], (B, D))
W = jax.random.normal(KEYS[5], (D, C)) * 0.3

# name -> (fn(logits, labels, targets, class_weights) -> loss or per-example values,
#          whether the result is per example (sharded like the batch) or a scalar)
CASES = {
    "logsumexp": (lambda x, y, t, w: jxent.logsumexp(x, axis=-1), True),
    "softmax": (lambda x, y, t, w: jxent.softmax(x) * t, True),
    "log_softmax": (lambda x, y, t, w: jxent.log_softmax(x) * t, True),
    "cross_entropy": (lambda x, y, t, w: jxent.cross_entropy(x, y), False),
    "integer_ce_options": (
        lambda x, y, t, w: jxent.softmax_cross_entropy_with_integer_labels(
            x, y, class_weights=w, ignore_index=3, label_smoothing=0.1, z_loss=1e-3
        ),
        True,
    ),
    "dense_ce": (lambda x, y, t, w: jxent.cross_entropy(x, t), False),
    "dense_ce_options": (
        lambda x, y, t, w: jxent.softmax_cross_entropy(
            x, t, class_weights=w, label_smoothing=0.1, z_loss=1e-3
        ),
        True,
    ),
    "nll": (lambda x, y, t, w: jxent.nll_loss(x, y, class_weights=w, reduction="mean"), False),
    "binary_ce": (lambda x, y, t, w: jxent.sigmoid_binary_cross_entropy(x, t), True),
    "kl": (lambda x, y, t, w: jxent.kl_divergence(x, t), True),
    "kl_log": (lambda x, y, t, w: jxent.kl_divergence_with_log_targets(x, jnp.log(t)), True),
}

# layout -> (mesh shape, mesh axis names, the logits' PartitionSpec)
LAYOUTS = {
    "batch": ((8,), ("b",), P("b", None)),
    "classes": ((8,), ("v",), P(None, "v")),
    "2d": ((2, 4), ("b", "v"), P("b", "v")),
}
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def make_mesh(layout, axis_type):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (host) devices: see tests/conftest.py")
    shape, names, spec = LAYOUTS[layout]
    mesh = jax.make_mesh(shape, names, axis_types=(AXIS_TYPES[axis_type],) * len(shape))
    return mesh, spec


def largest_all_gather(compiled) -> int:
    """Elements of the largest all-gather result in a compiled program (0 if none)."""
    sizes = [0]
    for line in compiled.as_text().splitlines():
        if "all-gather" not in line or "=" not in line:
            continue
        result_type = line.split("=", 1)[1].split("all-gather")[0]
        for dims in re.findall(r"\[([\d,]*)\]", result_type):
            sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
    return max(sizes)


def _spec(array) -> tuple:
    spec = tuple(array.sharding.spec)
    return spec + (None,) * (array.ndim - len(spec))


def _total(fn):
    cot = jnp.cos(jnp.arange(B * C, dtype=jnp.float32)).reshape(B, C)

    def total(x, y, t, w):
        out = fn(x, y, t, w)
        return (
            jnp.sum(out * cot) if out.ndim == 2 else jnp.sum(out * cot[:, 0]) if out.ndim else out
        )

    return total


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CASES)
def test_value_and_gradient_equal_one_device(name, layout, axis_type):
    fn, per_example = CASES[name]
    mesh, spec = make_mesh(layout, axis_type)
    with jax.set_mesh(mesh):
        # Auxiliary inputs as a user would hold them: targets sharded like the logits,
        # labels like the batch, class weights replicated.
        x = jax.device_put(LOGITS, NamedSharding(mesh, spec))
        t = jax.device_put(TARGETS, NamedSharding(mesh, spec))
        y = jax.device_put(LABELS, NamedSharding(mesh, P(spec[0])))
        step = jax.jit(jax.value_and_grad(_total(fn)))
        compiled = step.lower(x, y, t, WEIGHTS).compile()
        value, grad = compiled(x, y, t, WEIGHTS)
        outputs = jax.jit(fn)(x, y, t, WEIGHTS)
    want_value, want_grad = jax.value_and_grad(_total(fn))(LOGITS, LABELS, TARGETS, WEIGHTS)
    np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    if not (name == "nll" and axis_type == "auto"):
        # (nll_loss's gradient, -w_y at each label, never reads the log-probabilities, so
        # GSPMD shards it like the labels: replicated when only the classes are sharded.)
        assert _spec(grad) == tuple(spec), "the logits' gradient is sharded like the logits"
    if per_example:
        assert _spec(outputs)[0] == spec[0], "per-example values are sharded like the batch"
    assert largest_all_gather(compiled) <= 2 * B, "nothing of the logits' size is gathered"


@pytest.mark.parametrize("name", ["cross_entropy", "dense_ce_options", "kl", "binary_ce"])
def test_explicit_mode_with_replicated_targets(name):
    """Labels, targets and masks that are not sharded like the logits are resharded (a local
    slice), instead of failing with JAX's ShardingTypeError."""
    fn, _ = CASES[name]
    mesh, spec = make_mesh("2d", "explicit")
    x = jax.device_put(LOGITS, NamedSharding(mesh, spec))  # no mesh context: as README does
    value, grad = jax.jit(jax.value_and_grad(_total(fn)))(x, LABELS, TARGETS, WEIGHTS)
    want_value, want_grad = jax.value_and_grad(_total(fn))(LOGITS, LABELS, TARGETS, WEIGHTS)
    np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert _spec(grad) == tuple(spec)


@pytest.mark.slow
def test_explicit_mode_class_axes_first_and_batch_of_rank_two():
    """Class axis not last, two batch axes, and a where mask, under 2-D explicit sharding."""
    logits = LOGITS.reshape(4, 4, C).transpose(2, 0, 1)  # [C, 4, 4]
    labels = LABELS.reshape(4, 4)
    where = jnp.arange(C)[:, None, None] % 5 != 0
    mesh, _ = make_mesh("2d", "explicit")
    x = jax.device_put(logits, NamedSharding(mesh, P("v", "b", None)))

    def loss(x):
        return jxent.cross_entropy(x, labels, axis=0, where=where, label_smoothing=0.2)

    value, grad = jax.jit(jax.value_and_grad(loss))(x)
    want_value, want_grad = jax.value_and_grad(loss)(logits)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert _spec(grad) == ("v", "b", None)


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kernel", ["auto", "blocked"])
def test_fused_linear_cross_entropy(layout, axis_type, reduction, kernel):
    """x sharded over the batch axis, w and bias over the vocabulary axis, as in training;
    through CPU's chunked kernel ("auto") and the vocabulary-blocked one of GPU and TPU
    (on Auto meshes over the vocabulary viewed as [8, C / 8]: 3 blocks of 3 classes a group,
    the last overlapping its predecessor)."""
    mesh, spec = make_mesh(layout, axis_type)
    batch_axis, vocab_axis = spec
    bias = jnp.linspace(-1.0, 1.0, C)
    fused = jxent.fused_linear_cross_entropy
    if kernel != "auto":
        fused = _fused_linear.with_kernel(kernel, vocab_block=3)

    def loss(x, w, b, y):
        out = fused(
            x,
            w,
            y,
            bias=b,
            class_weights=WEIGHTS,
            ignore_index=5,
            label_smoothing=0.1,
            reduction=reduction,
        )
        return jnp.sum(out * jnp.cos(jnp.arange(B))) if reduction == "none" else out

    with jax.set_mesh(mesh):
        x = jax.device_put(X, NamedSharding(mesh, P(batch_axis, None)))
        w = jax.device_put(W, NamedSharding(mesh, P(None, vocab_axis)))
        b = jax.device_put(bias, NamedSharding(mesh, P(vocab_axis)))
        y = jax.device_put(LABELS, NamedSharding(mesh, P(batch_axis)))
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        compiled = step.lower(x, w, b, y).compile()
        value, grads = compiled(x, w, b, y)
    want_value, want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(X, W, bias, LABELS)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert _spec(grads[0]) == (batch_axis, None)
    assert _spec(grads[1]) == (None, vocab_axis)
    assert _spec(grads[2]) == (vocab_axis,)
    assert largest_all_gather(compiled) <= max(2 * B, B * D)


@pytest.mark.skipif(
    jaxlib.version.__version_info__ < (0, 10, 2),
    reason="the blocked kernel is GPU/TPU's, forced on the CPU here; XLA:CPU of the JAX floor "
    "(0.8.2) rejects its 2-D-mesh program: 'UNIMPLEMENTED: unsupported operand type BF16 in op "
    "dot' (the lock's 0.10.2 compiles it)",
)
@pytest.mark.parametrize("layout", ["batch", "2d"])
def test_fused_blocked_kernel_in_bfloat16_sums_each_block_of_dw_over_the_rows_devices(layout):
    """Rows sharded over devices that share w: in half precision each block of w's gradient
    is summed over those devices (in float32) before it is rounded, so it matches one device
    rounded once (a float32 copy of the gradient is no longer kept for one psum at the end)."""
    mesh, spec = make_mesh(layout, "explicit")
    batch_axis, vocab_axis = spec
    fused = _fused_linear.with_kernel("blocked", vocab_block=3)
    x, w = X.astype(jnp.bfloat16), W.astype(jnp.bfloat16)
    step = jax.value_and_grad(lambda x, w, y: fused(x, w, y, label_smoothing=0.1), (0, 1))
    with jax.set_mesh(mesh):
        sharded = (
            jax.device_put(x, NamedSharding(mesh, P(batch_axis, None))),
            jax.device_put(w, NamedSharding(mesh, P(None, vocab_axis))),
            jax.device_put(LABELS, NamedSharding(mesh, P(batch_axis))),
        )
        value, (dx, dw) = jax.jit(step)(*sharded)
    want_value, (want_dx, want_dw) = jax.jit(step)(x, w, LABELS)
    assert dw.dtype == jnp.bfloat16 and _spec(dw) == (None, vocab_axis)
    np.testing.assert_allclose(value, want_value, rtol=1e-2)
    for got, want in ((dx, want_dx), (dw, want_dw)):
        # One rounding to bfloat16 on both sides: equal up to the sums' float32 order.
        np.testing.assert_allclose(
            np.float32(got), np.float32(want), rtol=2**-7, atol=2**-7 * np.abs(want).max()
        )


def test_fused_loss_refuses_a_sharded_contraction_axis():
    mesh, _ = make_mesh("classes", "explicit")
    w = jax.device_put(W, NamedSharding(mesh, P("v", None)))
    with pytest.raises(ValueError, match=r"w's first \(D\) axis is sharded over mesh axes 'v'"):
        jax.jit(jxent.fused_linear_cross_entropy)(X, w, LABELS)


def test_tuple_class_axes_sharded_on_a_minor_axis_is_a_clear_error():
    mesh, _ = make_mesh("classes", "explicit")
    x = jax.device_put(jnp.ones((4, 3, 16)), NamedSharding(mesh, P(None, None, "v")))
    labels = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match=r"class axes \(1, 2\) are sharded as \(None, 'v'\)"):
        jax.jit(lambda x: jxent.cross_entropy(x, labels, axis=(1, 2)))(x)
    # Listed major-first, the sharded axis flattens without a gather.
    got = jax.jit(lambda x: jxent.cross_entropy(x, labels, axis=(2, 1)))(x)
    np.testing.assert_allclose(got, jnp.log(48.0), rtol=1e-6)


def test_shard_map_with_axis_name_inside_explicit_mesh():
    """User-written vocabulary parallelism keeps working on a jax.make_mesh mesh."""
    mesh, _ = make_mesh("classes", "explicit")
    loss = jax.jit(
        jax.shard_map(
            lambda x, y, w: jxent.cross_entropy(x, y, class_weights=w, axis_name="v"),
            mesh=mesh,
            in_specs=(P(None, "v"), P(), P("v")),
            out_specs=P(),
        )
    )
    x = jax.device_put(LOGITS, NamedSharding(mesh, P(None, "v")))  # explicit meshes want
    w = jax.device_put(WEIGHTS, NamedSharding(mesh, P("v")))  # inputs sharded as in_specs
    np.testing.assert_allclose(
        loss(x, LABELS, w),
        jxent.cross_entropy(LOGITS, LABELS, class_weights=WEIGHTS),
        rtol=1e-6,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pos_weight_shape", [(C,), (B, 1)])
def test_binary_ce_pos_weight_made_inside_jit(layout, pos_weight_shape):
    """A pos_weight made inside the jitted function is replicated on an explicit mesh; its
    gradient, summed over the logits' sharded axes, is replicated to match."""
    mesh, spec = make_mesh(layout, "explicit")

    def grads(x, t):
        def loss(x, pw):
            return jnp.sum(jxent.sigmoid_binary_cross_entropy(x, t, pos_weight=pw))

        pw = jnp.linspace(0.5, 2.0, int(np.prod(pos_weight_shape))).reshape(pos_weight_shape)
        return jax.grad(loss, argnums=(0, 1))(x, pw)

    with jax.set_mesh(mesh):
        x = jax.device_put(LOGITS, NamedSharding(mesh, spec))
        t = jax.device_put(TARGETS, NamedSharding(mesh, spec))
        dx, dpw = jax.jit(grads)(x, t)
    want_dx, want_dpw = jax.jit(grads)(LOGITS, TARGETS)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dpw, want_dpw, rtol=1e-5, atol=1e-7)
