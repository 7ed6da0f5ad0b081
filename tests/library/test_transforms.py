"""jxent under JAX's transformations: jit, vmap, grad of grad, sharding and vocab parallelism."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent

B, C = 8, 16
KEYS = jax.random.split(jax.random.key(0), 4)
LOGITS = jax.random.normal(KEYS[0], (B, C)) * 2
INT_LABELS = jax.random.randint(KEYS[1], (B,), 0, C)
DENSE_LABELS = jax.nn.softmax(jax.random.normal(KEYS[2], (B, C)))
WEIGHTS = jax.random.uniform(KEYS[3], (C,), minval=0.5, maxval=2.0)
BINARY_LABELS = (DENSE_LABELS > 1 / C).astype(jnp.float32)

# Every public function as "logits -> per-example (or elementwise) values".
PER_EXAMPLE = {
    "logsumexp": lambda x: jxent.logsumexp(x, axis=-1),
    "softmax": jxent.softmax,
    "log_softmax": jxent.log_softmax,
    "integer_ce": lambda x: jxent.softmax_cross_entropy_with_integer_labels(
        x, INT_LABELS, class_weights=WEIGHTS, label_smoothing=0.1, z_loss=1e-3
    ),
    "dense_ce": lambda x: jxent.softmax_cross_entropy(
        x, DENSE_LABELS, class_weights=WEIGHTS, label_smoothing=0.1, z_loss=1e-3
    ),
    "nll": lambda x: jxent.nll_loss(x, INT_LABELS, class_weights=WEIGHTS),
    "cross_entropy": lambda x: jxent.cross_entropy(x, INT_LABELS, reduction="none"),
    "binary_ce": lambda x: jxent.sigmoid_binary_cross_entropy(x, BINARY_LABELS),
    "kl": lambda x: jxent.kl_divergence(x, DENSE_LABELS),
    "kl_log": lambda x: jxent.kl_divergence_with_log_targets(x, jnp.log(DENSE_LABELS)),
}


def scalar(fn):
    cot = jnp.cos(jnp.arange(B * C, dtype=jnp.float32)).reshape(B, C)
    return lambda x: jnp.sum(fn(x) * cot[:, : fn(x).shape[-1]] if fn(x).ndim == 2 else fn(x))


@pytest.mark.parametrize("name", PER_EXAMPLE)
class TestEveryFunction:
    def test_jit_equals_eager(self, name):
        fn = PER_EXAMPLE[name]
        with jax.disable_jit():
            eager = fn(LOGITS)
        np.testing.assert_allclose(jax.jit(fn)(LOGITS), eager, rtol=1e-6, atol=1e-6)

    def test_gradient_is_a_hand_written_custom_vjp(self, name):
        jaxpr = str(jax.make_jaxpr(PER_EXAMPLE[name])(LOGITS))
        assert "custom_vjp_call" in jaxpr

    def test_residuals_are_the_inputs_plus_small_arrays(self, name):
        """At most one new array of the logits' size is kept for the backward pass."""
        residuals = saved_residuals(scalar(PER_EXAMPLE[name]), LOGITS)
        big_new = [
            (aval, why)
            for aval, why in residuals
            if aval.size >= LOGITS.size
            and "from the argument" not in why
            and "from a constant" not in why  # the labels, closed over
        ]
        assert len(big_new) <= 1, big_new


class TestVmap:
    @pytest.mark.parametrize("name", ["logsumexp", "softmax", "log_softmax"])
    def test_normalisers_under_vmap_equal_the_batched_call(self, name):
        fn = PER_EXAMPLE[name]
        np.testing.assert_allclose(jax.vmap(fn)(LOGITS), fn(LOGITS), rtol=1e-6, atol=1e-6)

    def test_kl_divergences_under_vmap_equal_the_batched_call(self):
        lp, t = jax.nn.log_softmax(LOGITS), DENSE_LABELS
        for fn, target in [
            (jxent.kl_divergence, t),
            (jxent.kl_divergence_with_log_targets, jnp.log(t)),
        ]:
            np.testing.assert_allclose(jax.vmap(fn)(lp, target), fn(lp, target), rtol=1e-6)

    def test_per_example_gradients_of_integer_ce(self):
        def loss(x, y):
            return jxent.cross_entropy(x, y, label_smoothing=0.1, class_weights=WEIGHTS)

        per_example = jax.vmap(jax.grad(loss))(LOGITS, INT_LABELS)
        # Each example alone, with a 'mean' over one example: w_y·ℓ / w_y = ℓ.
        for i in range(B):
            np.testing.assert_allclose(
                per_example[i], jax.grad(loss)(LOGITS[i], INT_LABELS[i]), rtol=1e-5, atol=1e-8
            )
        p = jax.nn.softmax(LOGITS)
        unweighted = jax.vmap(jax.grad(lambda x, y: jxent.cross_entropy(x, y)))
        np.testing.assert_allclose(
            unweighted(LOGITS, INT_LABELS),
            p - jax.nn.one_hot(INT_LABELS, C),
            atol=1e-6,
        )

    def test_nested_vmap_equals_the_batched_call(self):
        x = LOGITS.reshape(2, 4, C)
        y = INT_LABELS.reshape(2, 4)
        dense = DENSE_LABELS.reshape(2, 4, C)
        ce = jxent.softmax_cross_entropy_with_integer_labels
        np.testing.assert_allclose(jax.vmap(jax.vmap(ce))(x, y), ce(x, y), rtol=1e-6)
        dce = jxent.softmax_cross_entropy
        np.testing.assert_allclose(jax.vmap(jax.vmap(dce))(x, dense), dce(x, dense), rtol=1e-6)
        bce = jxent.sigmoid_binary_cross_entropy
        yb = BINARY_LABELS.reshape(2, 4, C)
        np.testing.assert_allclose(jax.vmap(jax.vmap(bce))(x, yb), bce(x, yb), rtol=1e-6)

    def test_vmap_over_class_weights_and_labels(self):
        weights = jnp.stack([WEIGHTS, 2 * WEIGHTS])

        def loss(w):
            return jxent.cross_entropy(LOGITS, INT_LABELS, class_weights=w)

        np.testing.assert_allclose(jax.vmap(loss)(weights), [loss(w) for w in weights], rtol=1e-6)


class TestSecondOrder:
    def test_jacobian_of_the_ce_gradient_is_diag_p_minus_outer_p(self):
        x = LOGITS[0]
        p = jax.nn.softmax(x)
        want = jnp.diag(p) - jnp.outer(p, p)
        for labels in (INT_LABELS[0], DENSE_LABELS[0]):
            got = jax.jacrev(jax.grad(lambda z, y=labels: jxent.cross_entropy(z, y)))(x)
            np.testing.assert_allclose(got, want, atol=1e-6)

    def test_grad_of_grad_of_logsumexp(self):
        x = LOGITS[0]
        p = jax.nn.softmax(x)
        got = jax.grad(lambda z: jnp.sum(jax.grad(jxent.logsumexp)(z) ** 2))(x)
        # d/dx Σ p² = 2 (diag(p) - p pᵀ) p
        np.testing.assert_allclose(got, 2 * (jnp.diag(p) - jnp.outer(p, p)) @ p, atol=1e-6)


def _mesh(name):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (host) devices: see tests/conftest.py")
    return Mesh(np.array(jax.devices()[:8]), (name,))


@pytest.mark.sharding
class TestDataParallel:
    """Batch sharded over 8 devices with NamedSharding: same numbers as one device."""

    @pytest.mark.parametrize("labels", [INT_LABELS, DENSE_LABELS], ids=["integer", "dense"])
    def test_sharded_batch_equals_single_device(self, labels):
        mesh = _mesh("batch")
        x = jax.device_put(LOGITS, NamedSharding(mesh, P("batch")))
        y = jax.device_put(labels, NamedSharding(mesh, P("batch")))

        def loss(x, y):
            return jxent.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-4)

        step = jax.jit(jax.value_and_grad(loss))
        value, grad = step(x, y)
        want_value, want_grad = jax.value_and_grad(loss)(LOGITS, labels)
        np.testing.assert_allclose(value, want_value, rtol=1e-6)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
        assert grad.sharding.is_equivalent_to(x.sharding, 2)


@pytest.mark.sharding
class TestVocabParallel:
    """Class axis sharded over 8 devices inside shard_map, combined with collectives."""

    def _sharded(self, fn, out_spec, *extra_specs):
        mesh = _mesh("vocab")
        return jax.jit(
            jax.shard_map(
                functools.partial(fn, axis_name="vocab"),
                mesh=mesh,
                in_specs=(P(None, "vocab"), *extra_specs),
                out_specs=out_spec,
            )
        )

    @pytest.mark.parametrize(
        ("fn", "out_spec"),
        [
            (lambda x, axis_name: jxent.logsumexp(x, axis=-1, axis_name=axis_name), P()),
            (jxent.softmax, P(None, "vocab")),
            (jxent.log_softmax, P(None, "vocab")),
        ],
        ids=["logsumexp", "softmax", "log_softmax"],
    )
    def test_normalisers_equal_single_device(self, fn, out_spec):
        sharded = self._sharded(fn, out_spec)
        np.testing.assert_allclose(sharded(LOGITS), fn(LOGITS, axis_name=None), rtol=1e-6)
        cot = jnp.sin(jnp.arange(B * C, dtype=jnp.float32)).reshape(B, C)

        def weighted(f):
            return lambda x: jnp.sum(f(x) * (cot if f(x).ndim == 2 else cot[:, 0]))

        np.testing.assert_allclose(
            jax.grad(weighted(sharded))(LOGITS),
            jax.grad(weighted(functools.partial(fn, axis_name=None)))(LOGITS),
            rtol=1e-5,
            atol=1e-7,
        )

    @pytest.mark.parametrize("reduction", ["none", "mean"])
    def test_integer_ce_equals_single_device(self, reduction):
        labels = INT_LABELS.at[3].set(-100)

        def loss(x, w, axis_name):
            return jxent.softmax_cross_entropy_with_integer_labels(
                x,
                labels,
                class_weights=w,
                ignore_index=-100,
                label_smoothing=0.1,
                z_loss=1e-3,
                reduction=reduction,
                axis_name=axis_name,
            )

        sharded = self._sharded(loss, P(), P("vocab"))
        single = functools.partial(loss, axis_name=None)
        np.testing.assert_allclose(sharded(LOGITS, WEIGHTS), single(LOGITS, WEIGHTS), rtol=1e-6)
        total = lambda f: lambda x, w: jnp.sum(f(x, w) * jnp.arange(1.0, 1.0 + f(x, w).size))
        got = jax.grad(total(sharded), (0, 1))(LOGITS, WEIGHTS)
        want = jax.grad(total(single), (0, 1))(LOGITS, WEIGHTS)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

    def test_dense_ce_equals_single_device(self):
        def loss(x, y, axis_name):
            return jxent.softmax_cross_entropy(
                x, y, label_smoothing=0.1, z_loss=1e-3, reduction="mean", axis_name=axis_name
            )

        sharded = self._sharded(loss, P(), P(None, "vocab"))
        single = functools.partial(loss, axis_name=None)
        np.testing.assert_allclose(
            sharded(LOGITS, DENSE_LABELS), single(LOGITS, DENSE_LABELS), rtol=1e-6
        )
        got = jax.grad(sharded, (0, 1))(LOGITS, DENSE_LABELS)
        want = jax.grad(single, (0, 1))(LOGITS, DENSE_LABELS)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def _mean_ce_case(kind, shape):
    """Random logits, integer or probability labels, and the mean jxent CE over them."""
    k1, k2 = jax.random.split(jax.random.key(1))
    logits = jax.random.normal(k1, shape)
    if kind == "integer":
        labels = jax.random.randint(k2, shape[:1], 0, shape[1])
        loss_fn = jxent.softmax_cross_entropy_with_integer_labels
    else:
        labels = jax.nn.softmax(jax.random.normal(k2, shape))
        loss_fn = jxent.softmax_cross_entropy
    return logits, labels, lambda x, y: jnp.mean(loss_fn(x, y))


@pytest.mark.compiled_memory
class TestGradientReusesTheLogitsBuffer:
    """With the logits donated, XLA can write the logits gradient over them. It does so
    without first copying the logits only if every read of them (the target-logit gather,
    the loss pass) is ordered before that write; jxent makes those orderings data
    dependencies. optax's integer CE gets a logits-sized copy.
    (The dense CE on short rows keeps its exponentials as scratch instead, by design: see
    ``exponentials_residual``.)"""

    @pytest.mark.parametrize(
        "kind, shape",
        [("integer", (64, 1000)), ("integer", (4, 65536)), ("dense", (4, 65536))],
        ids=["integer", "integer-long-rows", "dense-long-rows"],
    )
    def test_no_logits_sized_scratch_when_donated(self, kind, shape):
        logits, labels, loss = _mean_ce_case(kind, shape)
        step = jax.jit(jax.value_and_grad(loss), donate_argnums=0)
        compiled = step.lower(logits, labels).compile()
        memory = compiled.memory_analysis()
        assert memory.alias_size_in_bytes == logits.nbytes  # the gradient takes the buffer
        assert memory.temp_size_in_bytes < logits.nbytes // 2, memory
        expected = jax.jit(jax.value_and_grad(loss))(logits, labels)
        value, grad = compiled(jnp.copy(logits), labels)
        np.testing.assert_allclose(value, expected[0], rtol=1e-6)
        np.testing.assert_allclose(grad, expected[1], rtol=1e-6, atol=1e-9)


@pytest.mark.compiled_memory
class TestEvaluationMemory:
    """The loss alone (no gradient) holds no logits-sized scratch, short rows or blocked
    long rows. (Regression: a ``-log p`` sharing ``x - shift`` with the exponentials ran
    the 8192x32000 dense forward 20 % faster but made XLA:CPU materialise ``x - shift``
    below about 4M logits and for blocked long rows.)"""

    @pytest.mark.parametrize("shape", [(64, 1000), (4, 65536)], ids=["short", "long-rows"])
    @pytest.mark.parametrize("kind", ["integer", "dense"])
    def test_loss_only_scratch_is_o_batch(self, kind, shape):
        logits, labels, loss = _mean_ce_case(kind, shape)
        compiled = jax.jit(loss).lower(logits, labels).compile()
        assert compiled.memory_analysis().temp_size_in_bytes < logits.nbytes // 2
