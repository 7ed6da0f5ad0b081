"""The registry of benchmark cases, read by the CPU suite (run.py) and the accelerator check.

A case is everything the harnesses need to know about one op, in one entry of ``CASES``:

* ``candidates``: the implementations compared (jxent's and the baselines), as functions of
  the op's own arguments (``op_args`` leading inputs), built on first use;
* ``reference``: the candidate every ratio divides by;
* ``inputs``: random inputs for a shape and dtype; the first is the one differentiated and
  donated, the rest are the op's other arguments and, last, any cotangent;
* ``objective``: how a candidate becomes the scalar loss that is timed;
* ``modes``: which of ``fwd+bwd``, ``fwd`` (loss only) and ``donated`` make sense for it;
* ``float64``: a NumPy float64 reference of the op's output, for the accuracy column;
* ``traffic``: the fewest bytes a pass must move through memory (for achieved bandwidth);
* ``targets`` / ``device_targets``: what the CPU suite and the accelerator check require of
  jxent, each with a descriptive name;
* ``floor``: the fewest bytes for the compiled-for-accelerators report (``aot.py``) when it
  differs from ``traffic`` (the fused loss, whose traffic is not logits-sized);
* ``suites``: which harnesses run the case (``cpu`` = run.py, ``device`` = device_check.py,
  ``aot`` = aot.py); the binary CE, the KLs and the NLL are compiled by ``aot.py`` only so
  far.

Adding an op is adding one ``Case`` to ``CASES``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jxent

Array = jax.Array
Shape = tuple[int, ...]
LossFn = Callable[..., Array]

MODES = ("fwd+bwd", "fwd", "donated")
MEMORY_ONLY = "fwd+bwd (memory only)"
# The CPU suite's long-row shape, where the cross-entropies have their own, stricter targets.
LONG_ROW_SHAPE = (2048, 131072)
ACCURACY_RTOL = 2e-6


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def any_shape(shape: Shape) -> bool:
    del shape
    return True


def long_rows(shape: Shape) -> bool:
    return tuple(shape) == LONG_ROW_SHAPE


def not_long_rows(shape: Shape) -> bool:
    return tuple(shape) != LONG_ROW_SHAPE


@dataclasses.dataclass(frozen=True)
class Target:
    """One requirement on jxent's record of one mode: ``metric`` within ``limit``.

    ``metric`` names a field of the measured record (``time_ratio``, ``temp_ratio``,
    ``rel_error``, ``bandwidth_fraction``, or the boolean ``in_place``); ``label`` describes it
    in the printed line (``{reference}`` is filled in). A boolean ``limit`` asks for that value.
    """

    name: str
    mode: str
    metric: str
    limit: float | bool
    label: str
    shapes: Callable[[Shape], bool] = any_shape
    at_least: bool = False

    def check(self, value: Any) -> tuple[str, str]:
        """(PASS/FAIL/SKIP, the value against the limit)."""
        if value is None:
            return "SKIP", "not measured"
        if isinstance(self.limit, bool):
            return ("PASS" if bool(value) is self.limit else "FAIL"), str(bool(value))
        ok = value >= self.limit if self.at_least else value <= self.limit
        cmp = ">=" if self.at_least else "<="
        return ("PASS" if ok else "FAIL"), f"{value:.3g} (target {cmp} {self.limit:g})"


def _parity(mode: str, shapes: Callable[[Shape], bool] = any_shape) -> tuple[Target, ...]:
    """No slower and no more scratch than the reference."""
    return (
        Target("parity", mode, "time_ratio", 1.0, "time jxent/{reference}", shapes),
        Target("parity", mode, "temp_ratio", 1.0, "temp jxent/{reference}", shapes),
    )


def _time_parity(*modes: str) -> tuple[Target, ...]:
    return tuple(Target("parity", m, "time_ratio", 1.0, "time jxent/{reference}") for m in modes)


_ACCURACY = Target(
    "float64-accuracy", "fwd+bwd", "rel_error", ACCURACY_RTOL, "rel. error vs float64"
)
_CE_CPU_TARGETS = (
    *_parity("fwd+bwd", not_long_rows),
    Target(
        "long-rows-speed",
        "fwd",
        "time_ratio",
        1 / 3,
        "time jxent/{reference} (>=3x faster)",
        long_rows,
    ),
    Target("long-rows-speed", "fwd+bwd", "time_ratio", 0.8, "time jxent/{reference}", long_rows),
    Target(
        "long-rows-speed",
        "donated",
        "time_ratio",
        0.8,
        "time jxent/{reference} (donated logits)",
        long_rows,
    ),
    Target(
        "gradient-in-place",
        "donated",
        "in_place",
        True,
        "gradient written into the donated logits, no copy",
    ),
)
# The accelerator check: fwd+bwd at >= 80 % of the device's copy bandwidth, and no op slower
# than its reference (fwd+bwd and loss only).
_CE_DEVICE_TARGETS = (
    Target(
        "copy-bandwidth",
        "fwd+bwd",
        "bandwidth_fraction",
        0.8,
        "bytes/s jxent / copy bytes/s",
        at_least=True,
    ),
    *_time_parity("fwd+bwd", "fwd"),
)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _keys(seed: int) -> tuple[Array, Array, Array]:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return k1, k2, k3


def _logits(key: Array, shape: Shape, dtype: Any) -> Array:
    return (3.0 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def logits_and_row_cotangent(shape: Shape, dtype: Any, seed: int = 0) -> tuple[Array, ...]:
    k1, k2, _ = _keys(seed)
    return _logits(k1, shape, dtype), jax.random.normal(k2, shape[:1], jnp.float32).astype(dtype)


def logits_and_cotangent(shape: Shape, dtype: Any, seed: int = 0) -> tuple[Array, ...]:
    k1, k2, _ = _keys(seed)
    return _logits(k1, shape, dtype), jax.random.normal(k2, shape, jnp.float32).astype(dtype)


def logits_and_labels(shape: Shape, dtype: Any, seed: int = 0) -> tuple[Array, ...]:
    k1, k2, _ = _keys(seed)
    labels = jax.random.randint(k2, shape[:1], 0, shape[1], jnp.int32)
    return _logits(k1, shape, dtype), labels


def logits_and_probabilities(shape: Shape, dtype: Any, seed: int = 0) -> tuple[Array, ...]:
    k1, k2, _ = _keys(seed)
    targets = jax.nn.softmax(jax.random.normal(k2, shape, jnp.float32)).astype(dtype)
    return _logits(k1, shape, dtype), targets


def logits_and_binary_labels(shape: Shape, dtype: Any, seed: int = 0) -> tuple[Array, ...]:
    k1, k2, _ = _keys(seed)
    labels = jax.random.bernoulli(k2, 0.1, shape).astype(dtype)
    return _logits(k1, shape, dtype), labels


def log_probabilities_and_probabilities(
    shape: Shape, dtype: Any, seed: int = 0
) -> tuple[Array, ...]:
    k1, k2, _ = _keys(seed)
    log_p = jax.nn.log_softmax(_logits(k1, shape, jnp.float32)).astype(dtype)
    targets = jax.nn.softmax(jax.random.normal(k2, shape, jnp.float32)).astype(dtype)
    return log_p, targets


def log_probabilities_pair(shape: Shape, dtype: Any, seed: int = 0) -> tuple[Array, ...]:
    """Log-predictions and log-targets, both normalised rows."""
    k1, k2, _ = _keys(seed)
    log_p = jax.nn.log_softmax(_logits(k1, shape, jnp.float32)).astype(dtype)
    log_t = jax.nn.log_softmax(jax.random.normal(k2, shape, jnp.float32)).astype(dtype)
    return log_p, log_t


def log_probabilities_and_labels(shape: Shape, dtype: Any, seed: int = 0) -> tuple[Array, ...]:
    k1, k2, _ = _keys(seed)
    log_p = jax.nn.log_softmax(_logits(k1, shape, jnp.float32)).astype(dtype)
    return log_p, jax.random.randint(k2, shape[:1], 0, shape[1], jnp.int32)


def features_weights_labels(shape: Shape, dtype: Any, seed: int = 0) -> tuple[Array, ...]:
    n, d, v = shape
    k1, k2, k3 = _keys(seed)
    x = jax.random.normal(k1, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(k2, (d, v), jnp.float32) / math.sqrt(d)).astype(dtype)
    return x, w, jax.random.randint(k3, (n,), 0, v, jnp.int32)


# --------------------------------------------------------------------------------------------
# Scalar objectives (what is timed)
# --------------------------------------------------------------------------------------------


def cotangent_objective(fn: Callable[..., Array]) -> LossFn:
    """``sum(f(x) * g)``: fwd+bwd is exactly one forward pass and one VJP with cotangent g."""

    def loss(x: Array, g: Array) -> Array:
        return jnp.sum(fn(x) * g)

    return loss


def mean_objective(fn: Callable[..., Array]) -> LossFn:
    def loss(*args: Array) -> Array:
        return jnp.mean(fn(*args))

    return loss


# --------------------------------------------------------------------------------------------
# Float64 references (NumPy)
# --------------------------------------------------------------------------------------------


def _lse64(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def logsumexp64(x: np.ndarray) -> np.ndarray:
    return _lse64(x)[..., 0]


def softmax64(x: np.ndarray) -> np.ndarray:
    return np.exp(x - _lse64(x))


def log_softmax64(x: np.ndarray) -> np.ndarray:
    return x - _lse64(x)


def integer_ce64(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    lp = log_softmax64(x)
    return -np.take_along_axis(lp, labels.astype(np.int64)[:, None], axis=-1)[:, 0]


def dense_ce64(x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return -np.sum(targets * log_softmax64(x), axis=-1)


# --------------------------------------------------------------------------------------------
# Minimum memory traffic
# --------------------------------------------------------------------------------------------


def logits_passes(loss_only: int, with_gradient: int) -> Callable[[Shape, int, str], int]:
    """Bytes = logits-sized arrays that must be read or written at least once, times the size.

    ``loss_only`` counts them for the loss alone, ``with_gradient`` for fwd+bwd (the gradient
    written once more). The cross-entropy with integer labels reads the logits once (1) and
    also writes their gradient once (2): 2·N·C·itemsize for fwd+bwd.
    """

    def traffic(shape: Shape, itemsize: int, mode: str) -> int:
        arrays = loss_only if mode == "fwd" else with_gradient
        return arrays * math.prod(shape) * itemsize

    return traffic


def label_gather_traffic(shape: Shape, itemsize: int, mode: str) -> int:
    """NLL of integer labels: the loss reads one value and one int32 label per row; with the
    gradient (one-hot, logits-sized) written once more."""
    n, c = shape
    per_row = n * (itemsize + 4)
    return per_row if mode == "fwd" else per_row + n * c * itemsize


def fused_traffic(shape: Shape, itemsize: int, mode: str) -> int:
    """Fused linear CE at (N, D, V): read x [N, D], w [D, V] and the labels once; with the
    gradient, write dx and dw once more. The [N, V] logits need never reach memory."""
    n, d, v = shape
    inputs = (n * d + d * v) * itemsize + n * 4
    return inputs if mode == "fwd" else inputs + (n * d + d * v) * itemsize


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    summary: str  # the loss that is timed, for --help
    candidates: Callable[[], dict[str, Callable[..., Array]]]
    reference: str
    inputs: Callable[..., tuple[Array, ...]]  # (shape, dtype, seed) -> arrays
    objective: Callable[[Callable[..., Array]], LossFn]
    op_args: int  # leading inputs the op itself takes (the rest feed the objective)
    shape_rank: int = 2
    modes: tuple[str, ...] = ("fwd+bwd",)
    argnums: int | tuple[int, ...] = 0
    float64: Callable[..., np.ndarray] | None = None
    traffic: Callable[[Shape, int, str], int] | None = None
    targets: tuple[Target, ...] = ()
    device_targets: tuple[Target, ...] = ()
    floor: Callable[[Shape, int, str], int] | None = None
    suites: tuple[str, ...] = ("cpu", "device", "aot")

    def floor_bytes(self, shape: Shape, itemsize: int, mode: str) -> int | None:
        """The fewest bytes a pass of ``mode`` must move (``floor``, else ``traffic``)."""
        fn = self.floor or self.traffic
        return None if fn is None else fn(shape, itemsize, "fwd" if mode == "fwd" else mode)

    def losses(self, names: Sequence[str] | None = None) -> dict[str, LossFn]:
        """{candidate: scalar loss}, restricted to ``names`` (and the reference) if given."""
        fns = self.candidates()
        return {
            name: self.objective(fn)
            for name, fn in fns.items()
            if names is None or name in names or name == self.reference
        }


def _normaliser(
    op: str, summary: str, float64: Callable[..., np.ndarray], accuracy_target: bool
) -> Case:
    def candidates() -> dict[str, Callable[..., Array]]:
        mine, ref = getattr(jxent, op), getattr(jax.nn, op)
        return {
            "jxent": lambda x: mine(x, axis=-1),
            "jax.nn": lambda x: ref(x, axis=-1),
        }

    row_output = op == "logsumexp"
    return Case(
        op=op,
        summary=summary,
        candidates=candidates,
        reference="jax.nn",
        inputs=logits_and_row_cotangent if row_output else logits_and_cotangent,
        objective=cotangent_objective,
        op_args=1,
        # Read x (and the cotangent g when it is logits-sized), write the gradient.
        float64=float64,
        traffic=logits_passes(1 if row_output else 2, 2 if row_output else 3),
        targets=(*_parity("fwd+bwd", not_long_rows), *((_ACCURACY,) if accuracy_target else ())),
        device_targets=_time_parity("fwd+bwd"),
    )


def _integer_ce_candidates() -> dict[str, Callable[..., Array]]:
    def naive(logits: Array, labels: Array) -> Array:
        one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        return -jnp.sum(one_hot * jax.nn.log_softmax(logits), axis=-1)

    return {
        "jxent": jxent.softmax_cross_entropy_with_integer_labels,
        "optax": optax.softmax_cross_entropy_with_integer_labels,
        "naive": naive,
    }


def _dense_ce_candidates() -> dict[str, Callable[..., Array]]:
    def naive(logits: Array, targets: Array) -> Array:
        return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)

    return {
        "jxent": jxent.softmax_cross_entropy,
        "optax": optax.softmax_cross_entropy,
        "naive": naive,
    }


def _fused_candidates() -> dict[str, Callable[..., Array]]:
    def unfused(x: Array, w: Array, labels: Array) -> Array:
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ w, labels))

    return {"jxent": jxent.fused_linear_cross_entropy, "optax-unfused": unfused}


def _logging_aux(fn: Callable[..., Any]) -> Callable[..., Array]:
    """``fn(..., return_aux=True)`` as a trainer that logs every auxiliary output uses it: the
    loss, with each output kept alive (``+ 0·stop_gradient(...)``, which XLA does not fold),
    and no gradient through them."""

    def loss(*args: Array) -> Array:
        value, aux = fn(*args, return_aux=True)
        logged = sum(
            jnp.sum(jnp.asarray(field, jnp.float32))
            for field in (aux.lse, aux.z_loss, aux.entropy, aux.argmax, aux.correct)
        )
        return value + 0.0 * jax.lax.stop_gradient(logged)

    return loss


def _integer_ce_aux_candidates() -> dict[str, Callable[..., Array]]:
    # The targets read the candidate named "jxent": here, the loss with its aux outputs.
    plain = jxent.softmax_cross_entropy_with_integer_labels
    return {"jxent": _logging_aux(plain), "loss-only": plain}


def _fused_aux_candidates() -> dict[str, Callable[..., Array]]:
    plain = jxent.fused_linear_cross_entropy
    return {"jxent": _logging_aux(plain), "loss-only": plain}


_AUX_TARGETS = (
    Target("aux-overhead", "fwd+bwd", "time_ratio", 1.05, "time with aux / without"),
    Target("aux-overhead", "fwd+bwd", "temp_ratio", 1.05, "temp with aux / without"),
)


def _binary_ce_candidates() -> dict[str, Callable[..., Array]]:
    return {
        "jxent": jxent.sigmoid_binary_cross_entropy,
        "optax": optax.sigmoid_binary_cross_entropy,
    }


def _kl_candidates() -> dict[str, Callable[..., Array]]:
    return {"jxent": jxent.kl_divergence, "optax": optax.kl_divergence}


def _kl_log_candidates() -> dict[str, Callable[..., Array]]:
    # optax exports it from optax.losses only (0.2.8).
    return {
        "jxent": jxent.kl_divergence_with_log_targets,
        "optax": optax.losses.kl_divergence_with_log_targets,
    }


def _nll_candidates() -> dict[str, Callable[..., Array]]:
    # optax has no NLL of log-probabilities; the reference is the plain gather.
    def gather(log_probs: Array, labels: Array) -> Array:
        return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]

    return {"jxent": jxent.nll_loss, "gather": gather}


def _loss(**fields: Any) -> Case:
    """A loss of two arguments (predictions, then targets or labels), timed as its batch
    mean, in every mode."""
    return Case(objective=mean_objective, op_args=2, modes=MODES, **fields)


def binary_ce64(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0) - x * labels + np.log1p(np.exp(-np.abs(x)))


def kl64(log_p: np.ndarray, targets: np.ndarray) -> np.ndarray:
    safe = np.where(targets > 0, targets, 1.0)
    return np.sum(np.where(targets > 0, targets * (np.log(safe) - log_p), 0.0), axis=-1)


def kl_log64(log_p: np.ndarray, log_t: np.ndarray) -> np.ndarray:
    return np.sum(np.exp(log_t) * (log_t - log_p), axis=-1)


def nll64(log_p: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return -np.take_along_axis(log_p, labels.astype(np.int64)[:, None], axis=-1)[:, 0]


CASES: tuple[Case, ...] = (
    _normaliser(
        "logsumexp",
        "sum(logsumexp(x) * g), g a fixed random [N] cotangent",
        logsumexp64,
        accuracy_target=True,
    ),
    _normaliser(
        "softmax",
        "sum(softmax(x) * g), g a fixed random [N, C] cotangent",
        softmax64,
        accuracy_target=True,
    ),
    _normaliser(
        "log_softmax",
        "sum(log_softmax(x) * g), g a fixed random [N, C] cotangent",
        log_softmax64,
        accuracy_target=False,  # (its error is in the table; the target was set on the two above)
    ),
    _loss(
        op="ce_int",
        summary="mean(CE(logits, integer labels))",
        candidates=_integer_ce_candidates,
        reference="optax",
        inputs=logits_and_labels,
        float64=integer_ce64,
        traffic=logits_passes(1, 2),
        targets=_CE_CPU_TARGETS,
        device_targets=_CE_DEVICE_TARGETS,
    ),
    _loss(
        op="ce_dense",
        summary="mean(CE(logits, probabilities))",
        candidates=_dense_ce_candidates,
        reference="optax",
        inputs=logits_and_probabilities,
        float64=dense_ce64,
        # The targets are logits-sized too: read logits and targets, write the gradient.
        traffic=logits_passes(2, 3),
        targets=_CE_CPU_TARGETS,
        device_targets=_CE_DEVICE_TARGETS,
    ),
    Case(
        op="fused",
        summary="mean(CE(x @ w, integer labels)), gradient for x and w",
        candidates=_fused_candidates,
        reference="optax-unfused",
        inputs=features_weights_labels,
        objective=lambda fn: fn,  # already the mean loss
        op_args=3,
        shape_rank=3,
        argnums=(0, 1),
        floor=fused_traffic,
        targets=(
            Target("fused-memory", MEMORY_ONLY, "temp_ratio", 1 / 16, "temp jxent/unfused"),
            Target("fused-time", "fwd+bwd", "time_ratio", 1.0, "time jxent/unfused"),
        ),
        device_targets=(
            Target("fused-memory", "fwd+bwd", "temp_ratio", 1 / 16, "temp jxent/unfused"),
            Target("fused-time", "fwd+bwd", "time_ratio", 1.0, "time jxent/unfused"),
        ),
    ),
    # The auxiliary outputs (return_aux=True) against the loss alone: CPU suite only.
    Case(
        op="ce_int_aux",
        summary="mean(CE(logits, integer labels)) logging every auxiliary output",
        candidates=_integer_ce_aux_candidates,
        reference="loss-only",
        inputs=logits_and_labels,
        objective=mean_objective,
        op_args=2,
        traffic=logits_passes(1, 2),
        targets=_AUX_TARGETS,
        suites=("cpu",),
    ),
    Case(
        op="fused_aux",
        summary="mean(CE(x @ w, integer labels)) logging every auxiliary output",
        candidates=_fused_aux_candidates,
        reference="loss-only",
        inputs=features_weights_labels,
        objective=lambda fn: fn,
        op_args=3,
        shape_rank=3,
        argnums=(0, 1),
        floor=fused_traffic,
        targets=_AUX_TARGETS,
        suites=("cpu",),
    ),
    # Compiled for accelerators only so far (aot.py): no CPU or device targets yet.
    _loss(
        op="bce",
        summary="mean(sigmoid binary CE(logits, {0, 1} labels of the logits' shape))",
        candidates=_binary_ce_candidates,
        reference="optax",
        inputs=logits_and_binary_labels,
        float64=binary_ce64,
        traffic=logits_passes(2, 3),  # read logits and labels, write the gradient
        suites=("aot",),
    ),
    _loss(
        op="kl",
        summary="mean(KL(targets || exp(log_predictions)))",
        candidates=_kl_candidates,
        reference="optax",
        inputs=log_probabilities_and_probabilities,
        float64=kl64,
        traffic=logits_passes(2, 3),  # read both distributions, write the gradient
        suites=("aot",),
    ),
    _loss(
        op="kl_log",
        summary="mean(KL(exp(log_targets) || exp(log_predictions)))",
        candidates=_kl_log_candidates,
        reference="optax",
        inputs=log_probabilities_pair,
        float64=kl_log64,
        traffic=logits_passes(2, 3),  # read both distributions, write the gradient
        suites=("aot",),
    ),
    _loss(
        op="nll",
        summary="mean(NLL(log-probabilities, integer labels))",
        candidates=_nll_candidates,
        reference="gather",
        inputs=log_probabilities_and_labels,
        float64=nll64,
        traffic=label_gather_traffic,
        suites=("aot",),
    ),
)

BY_OP: dict[str, Case] = {case.op: case for case in CASES}
OPS: tuple[str, ...] = tuple(BY_OP)


def ops_in(suite: str) -> tuple[str, ...]:
    """The ops a harness runs by default (``cpu``, ``device`` or ``aot``)."""
    return tuple(c.op for c in CASES if suite in c.suites)


def parse_ops(text: str) -> list[str]:
    """The ops of a comma list such as ``--ops ce_int,fused``; unknown ones raise."""
    ops = [op for op in text.split(",") if op]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown ops {unknown} in {text!r}; expected a subset of {OPS}"
        )
    return ops


def add_ops_argument(parser: argparse.ArgumentParser, suite: str) -> None:
    """``--ops``: a comma list of the registry's ops, by default those ``suite`` runs."""
    parser.add_argument(
        "--ops",
        type=parse_ops,
        default=",".join(ops_in(suite)),
        help="comma list from: " + "; ".join(f"{c.op} = {c.summary}" for c in CASES),
    )


def case(op: str) -> Case:
    try:
        return BY_OP[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}") from None
