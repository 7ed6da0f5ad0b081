"""Benchmark suite for jxent: time and compiled memory against jax.nn / optax / naive baselines.

What is timed
-------------
* ``fwd+bwd``: ``jax.jit(jax.value_and_grad(loss))`` with the gradient taken with respect to the
  logits (for the fused linear case, with respect to ``x`` and ``w``).
* ``fwd``: ``jax.jit(loss)`` -- the loss value only, as in evaluation (cross-entropies only).
* ``donated``: ``fwd+bwd`` compiled with ``donate_argnums=0`` so XLA may write the logits gradient
  into the logits buffer; every call gets a fresh copy of the logits made outside the timed region.

The scalar loss for the elementwise ops is ``sum(f(x) * g)`` with a fixed random cotangent ``g``
(of shape ``[N]`` for ``logsumexp`` and ``[N, C]`` for ``softmax``/``log_softmax``), so
``fwd+bwd`` is exactly one forward pass plus one VJP. The cross-entropies are reduced with
``mean`` over the batch.

Every candidate is compiled and warmed up first; then each repeat runs every candidate once, in
an order rotated from repeat to repeat (round-robin), so that slow phases of a noisy, shared
machine hit all candidates alike. Reported are medians over repeats and ratios against the
reference candidate (``jax.nn`` or ``optax``) measured in the same run.

Memory comes from XLA: ``jitted.lower(*args).compile().memory_analysis()`` (``temp_size_in_bytes``
is the scratch memory the executable holds besides its arguments and outputs).

Whether a donated candidate writes the gradient in place is checked at run time: the
``unsafe_buffer_pointer()`` of the fresh logits buffer is compared with that of the returned
gradient (reported as ``in_place``); a candidate whose optimised HLO copies the logits first
does not count as in place (XLA does so when it cannot order every read of the logits before
the gradient overwrites them). XLA's ``alias_size_in_bytes`` is reported alongside.

Run ``python benchmarks/run.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Run from a checkout without installing: make the repository root importable.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

try:
    import optax
except ImportError:  # optax is a test/experiments dependency, not a core one.
    optax = None

Array = jax.Array
LossFn = Callable[..., Array]

DEFAULT_SHAPES = ((128, 10), (4096, 1000), (8192, 32000), (2048, 131072))
QUICK_SHAPES = ((128, 10), (1024, 1000))
# Fused linear + CE: (N, D, V). Timed at the first, memory-only at the second.
FUSED_TIME_SHAPE = (4096, 512, 32000)
FUSED_MEMORY_SHAPE = (8192, 1024, 128256)
QUICK_FUSED_TIME_SHAPE = (512, 128, 4096)

ELEMENTWISE_OPS = ("logsumexp", "softmax", "log_softmax")
CE_OPS = ("ce_int", "ce_dense")
ALL_OPS = (*ELEMENTWISE_OPS, *CE_OPS, "fused")

# jxent's public names are still settling; the first attribute found is used. Override with
# ``--jxent-name op=attribute``.
JXENT_ALIASES: dict[str, tuple[str, ...]] = {
    "logsumexp": ("logsumexp",),
    "softmax": ("softmax",),
    "log_softmax": ("log_softmax",),
    "ce_int": (
        "softmax_cross_entropy_with_integer_labels",
        "cross_entropy_with_integer_labels",
        "sparse_softmax_cross_entropy",
        "integer_cross_entropy",
    ),
    "ce_dense": ("softmax_cross_entropy", "cross_entropy_with_probs", "dense_cross_entropy"),
    "fused": ("fused_linear_cross_entropy",),
}

ISSUE_B_SHAPE = (2048, 131072)
ISSUE_A_SHAPES = ((4096, 1000), (8192, 32000))
ACCURACY_RTOL = 2e-6
ACCURACY_ROWS = 64  # rows compared against the float64 reference (keeps the check cheap).


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


def _resolve_jxent(op: str, overrides: dict[str, str]) -> tuple[Callable[..., Any] | None, str]:
    """Returns (function or None, note) for jxent's implementation of ``op``."""
    try:
        jxent = importlib.import_module("jxent")
    except ImportError as e:
        return None, f"jxent not importable ({e})"
    names = (overrides[op],) if op in overrides else JXENT_ALIASES[op]
    for name in names:
        fn = getattr(jxent, name, None)
        if fn is not None:
            return fn, f"jxent.{name}"
    return None, f"jxent has none of {', '.join(names)}"


def _naive_int_ce(logits: Array, labels: Array) -> Array:
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return -jnp.sum(one_hot * jax.nn.log_softmax(logits), axis=-1)


def _naive_dense_ce(logits: Array, targets: Array) -> Array:
    return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)


def build_candidates(
    op: str, overrides: dict[str, str]
) -> tuple[dict[str, LossFn], str, list[str]]:
    """Returns ({candidate: scalar loss}, reference candidate name, notes)."""
    notes: list[str] = []
    cands: dict[str, LossFn] = {}
    jx, where = _resolve_jxent(op, overrides)
    if jx is None:
        notes.append(f"SKIP {op}/jxent: {where}")
    if op in ELEMENTWISE_OPS:
        ref_fn = {
            "logsumexp": jax.nn.logsumexp,
            "softmax": jax.nn.softmax,
            "log_softmax": jax.nn.log_softmax,
        }[op]
        if jx is not None:
            cands["jxent"] = _cotangent_loss(jx)
        cands["jax.nn"] = _cotangent_loss(ref_fn)
        return cands, "jax.nn", notes
    if op in CE_OPS:
        if optax is None:
            notes.append(f"SKIP {op}/optax: optax not installed")
        if jx is not None:
            cands["jxent"] = lambda logits, t, jx=jx: jnp.mean(jx(logits, t))
        if optax is not None:
            ref = (
                optax.softmax_cross_entropy_with_integer_labels
                if op == "ce_int"
                else optax.softmax_cross_entropy
            )
            cands["optax"] = lambda logits, t, ref=ref: jnp.mean(ref(logits, t))
        naive = _naive_int_ce if op == "ce_int" else _naive_dense_ce
        cands["naive"] = lambda logits, t, naive=naive: jnp.mean(naive(logits, t))
        return cands, "optax", notes
    if op == "fused":
        if jx is not None:
            cands["jxent"] = lambda x, w, y, jx=jx: jx(x, w, y)
        if optax is not None:
            cands["optax-unfused"] = lambda x, w, y: jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(x @ w, y)
            )
        else:
            notes.append("SKIP fused/optax-unfused: optax not installed")
        return cands, "optax-unfused", notes
    raise ValueError(f"unknown op {op!r}; expected one of {ALL_OPS}")


def _cotangent_loss(fn: Callable[..., Array]) -> LossFn:
    def loss(x: Array, g: Array) -> Array:
        return jnp.sum(fn(x, axis=-1) * g)

    return loss


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_inputs(op: str, shape: tuple[int, ...], seed: int = 0) -> tuple[Array, ...]:
    """Random inputs for ``op``; the first argument is the one donated / differentiated."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    if op == "fused":
        n, d, v = shape
        x = jax.random.normal(k1, (n, d), jnp.float32)
        w = jax.random.normal(k2, (d, v), jnp.float32) / math.sqrt(d)
        y = jax.random.randint(k3, (n,), 0, v, jnp.int32)
        return x, w, y
    n, c = shape
    logits = 3.0 * jax.random.normal(k1, (n, c), jnp.float32)
    if op == "logsumexp":
        aux = jax.random.normal(k2, (n,), jnp.float32)
    elif op in ("softmax", "log_softmax"):
        aux = jax.random.normal(k2, (n, c), jnp.float32)
    elif op == "ce_int":
        aux = jax.random.randint(k2, (n,), 0, c, jnp.int32)
    else:
        aux = jax.nn.softmax(jax.random.normal(k2, (n, c), jnp.float32))
    return jax.block_until_ready((logits, aux))


def _abstract(args: Sequence[Any]) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)


def _abstract_fused(shape: tuple[int, int, int]) -> tuple[jax.ShapeDtypeStruct, ...]:
    n, d, v = shape
    return (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Record:
    op: str
    shape: list[int]
    mode: str
    candidate: str
    reference: str
    median_ms: float | None = None
    min_ms: float | None = None
    median_cpu_ms: float | None = None  # process CPU time: less sensitive to other load
    samples: int = 0
    calls_per_sample: int = 0
    temp_bytes: int | None = None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    in_place: bool | None = None
    time_ratio: float | None = None
    # Quartiles of the per-repeat ratios (each repeat times every candidate back to back):
    # how far the noise of this run moves the ratio.
    time_ratio_quartiles: list[float] | None = None
    wall_ms: list[float] | None = None  # every timed sample, in repeat order
    cpu_time_ratio: float | None = None
    temp_ratio: float | None = None
    rel_error: float | None = None
    ref_rel_error: float | None = None
    note: str = ""


def _jitted(loss: LossFn, mode: str, argnums: int | tuple[int, ...]) -> Any:
    if mode == "fwd":
        return jax.jit(loss)
    fn = jax.value_and_grad(loss, argnums=argnums)
    return jax.jit(fn, donate_argnums=0) if mode == "donated" else jax.jit(fn)


def _memory(compiled: Any) -> dict[str, int | None]:
    stats = compiled.memory_analysis()
    if stats is None:  # Some backends do not report it.
        return dict.fromkeys(("temp_bytes", "argument_bytes", "output_bytes", "alias_bytes"))
    return {
        "temp_bytes": int(stats.temp_size_in_bytes),
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
    }


def _copies_first_arg(compiled: Any) -> bool:
    """Whether the optimised HLO copies the first parameter (a logits-sized ``copy``)."""
    try:
        text = compiled.as_text()
    except Exception:  # Not every backend can print its executable.
        return False
    entry = text[text.find("ENTRY") :]
    match = re.search(r"%(\S+) = \S+ parameter\(0\)", entry)
    return bool(match) and re.search(rf"copy\(%{re.escape(match.group(1))}\)", entry) is not None


def _gradient_of_first_arg(out: Any) -> Array | None:
    if not isinstance(out, tuple) or len(out) != 2:
        return None
    grad = out[1]
    return grad[0] if isinstance(grad, tuple) else grad


class _Runner:
    """One compiled candidate, callable with fresh donated buffers when needed."""

    def __init__(self, compiled: Any, args: tuple[Array, ...], donated: bool):
        self.compiled = compiled
        self.args = args
        self.donated = donated
        self.in_place: bool | None = None
        self.calls = 1  # back-to-back calls per timed sample

    def _fresh_args(self, count: int) -> list[tuple[Array, ...]]:
        if not self.donated:
            return [self.args] * count
        return [
            (jax.block_until_ready(jnp.copy(self.args[0])), *self.args[1:]) for _ in range(count)
        ]

    def sample(self, calls: int) -> tuple[float, float]:
        """(wall, process CPU) seconds per call, averaged over ``calls`` back-to-back calls."""
        batches = self._fresh_args(calls)
        pointer = batches[-1][0].unsafe_buffer_pointer() if self.donated else None
        out = None
        cpu_start = time.process_time()
        start = time.perf_counter()
        for batch in batches:
            out = self.compiled(*batch)
        jax.block_until_ready(out)
        elapsed = (time.perf_counter() - start) / calls
        cpu = (time.process_time() - cpu_start) / calls
        if self.donated:
            grad = _gradient_of_first_arg(out)
            if grad is not None:
                self.in_place = grad.unsafe_buffer_pointer() == pointer
        del out, batches
        return elapsed, cpu


def time_candidates(
    runners: dict[str, _Runner], repeats: int, min_sample_s: float
) -> dict[str, list[tuple[float, float]]]:
    """Round-robin timing: each repeat calls every candidate once, rotating the order."""
    for runner in runners.values():  # Warm-up, and sizing of the inner loop.
        runner.sample(1)
        once, _ = runner.sample(1)
        runner.calls = max(1, min(1000, int(min_sample_s / max(once, 1e-7))))
    names = list(runners)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(runners[name].sample(runners[name].calls))
            gc.collect()
    return times


def measure_case(
    op: str,
    shape: tuple[int, ...],
    modes: Sequence[str],
    candidates: dict[str, LossFn],
    reference: str,
    args: tuple[Array, ...],
    repeats: int,
    min_sample_s: float,
) -> list[Record]:
    argnums: int | tuple[int, ...] = (0, 1) if op == "fused" else 0
    records: list[Record] = []
    for mode in modes:
        runners: dict[str, _Runner] = {}
        copies_logits: dict[str, bool] = {}
        mode_records: dict[str, Record] = {}
        for name, loss in candidates.items():
            rec = Record(op, list(shape), mode, name, reference)
            mode_records[name] = rec
            try:
                compiled = _jitted(loss, mode, argnums).lower(*args).compile()
            except Exception as e:  # A broken candidate must not sink the whole run.
                rec.note = f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            for key, value in _memory(compiled).items():
                setattr(rec, key, value)
            runners[name] = _Runner(compiled, args, donated=(mode == "donated"))
            copies_logits[name] = _copies_first_arg(compiled)
        try:
            times = time_candidates(runners, repeats, min_sample_s)
        except Exception as e:
            for name in runners:
                mode_records[name].note = f"run failed: {type(e).__name__}: {e}"[:300]
            times = {}
        for name, samples in times.items():
            rec = mode_records[name]
            wall = [t for t, _ in samples]
            rec.median_ms = 1e3 * statistics.median(wall)
            rec.wall_ms = [1e3 * t for t in wall]
            rec.min_ms = 1e3 * min(wall)
            rec.median_cpu_ms = 1e3 * statistics.median(cpu for _, cpu in samples)
            rec.samples = len(samples)
            rec.calls_per_sample = runners[name].calls
            rec.in_place = runners[name].in_place
            if rec.in_place and copies_logits[name]:
                # The gradient came back in the donated buffer, but XLA copied the logits to
                # scratch first (it could not order every read before the overwrite).
                rec.in_place = False
                rec.note = "gradient in the donated buffer only after a copy of the logits"
        del runners
        gc.collect()
        _fill_ratios(mode_records, reference)
        records.extend(mode_records.values())
    return records


def measure_memory_only(
    op: str,
    shape: tuple[int, ...],
    candidates: dict[str, LossFn],
    reference: str,
    abstract_args: tuple[jax.ShapeDtypeStruct, ...],
) -> list[Record]:
    """Compiled memory for fwd+bwd from abstract shapes; allocates no array."""
    argnums: int | tuple[int, ...] = (0, 1) if op == "fused" else 0
    mode_records: dict[str, Record] = {}
    for name, loss in candidates.items():
        rec = Record(op, list(shape), "fwd+bwd (memory only)", name, reference)
        mode_records[name] = rec
        try:
            compiled = _jitted(loss, "fwd+bwd", argnums).lower(*abstract_args).compile()
        except Exception as e:
            rec.note = f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        for key, value in _memory(compiled).items():
            setattr(rec, key, value)
        del compiled
    _fill_ratios(mode_records, reference)
    return list(mode_records.values())


def _fill_ratios(records: dict[str, Record], reference: str) -> None:
    ref = records.get(reference)
    for rec in records.values():
        if ref is None:
            continue
        if rec.median_ms is not None and ref.median_ms:
            rec.time_ratio = rec.median_ms / ref.median_ms
        if rec.wall_ms and ref.wall_ms and len(rec.wall_ms) == len(ref.wall_ms) >= 4:
            paired = [a / b for a, b in zip(rec.wall_ms, ref.wall_ms, strict=True)]
            q1, _, q3 = statistics.quantiles(paired, n=4)
            rec.time_ratio_quartiles = [q1, q3]
        if rec.median_cpu_ms is not None and ref.median_cpu_ms:
            rec.cpu_time_ratio = rec.median_cpu_ms / ref.median_cpu_ms
        if rec.temp_bytes is not None and ref.temp_bytes is not None:
            # A reference with no scratch at all: equal is 1.0, anything more is infinite.
            if ref.temp_bytes:
                rec.temp_ratio = rec.temp_bytes / ref.temp_bytes
            else:
                rec.temp_ratio = 1.0 if rec.temp_bytes == 0 else math.inf


# --------------------------------------------------------------------------------------------
# Accuracy against float64
# --------------------------------------------------------------------------------------------


def _float64_reference(op: str, rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    if op == "logsumexp":
        return lse[..., 0]
    if op == "softmax":
        return np.exp(x - lse)
    return x - lse


def relative_error(op: str, fn: Callable[..., Array], logits: Array) -> float:
    """Max error over the first rows, relative to the largest |reference| in the same row.

    For softmax this is the row-normwise (infinity-norm) error: elementwise relative error is
    meaningless for probabilities that underflow. For logsumexp it is the elementwise relative
    error; for log_softmax the error relative to the row's largest |log-probability|.
    """
    out = np.asarray(jax.jit(lambda x: fn(x, axis=-1))(logits)[:ACCURACY_ROWS], np.float64)
    ref = _float64_reference(op, np.asarray(logits[:ACCURACY_ROWS]))
    if op == "logsumexp":
        return float(np.max(np.abs(out - ref) / np.maximum(np.abs(ref), 1e-30)))
    scale = np.maximum(np.max(np.abs(ref), axis=-1, keepdims=True), 1e-30)
    return float(np.max(np.abs(out - ref) / scale))


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def _find(
    records: list[Record], op: str, shape: Sequence[int], mode: str, cand: str
) -> Record | None:
    for rec in records:
        same_case = rec.op == op and tuple(rec.shape) == tuple(shape) and rec.mode == mode
        if same_case and rec.candidate == cand:
            return rec
    return None


def _check(label: str, value: float | None, limit: float, cmp: str = "<=") -> tuple[str, str]:
    if value is None:
        return "SKIP", f"{label}: not measured"
    ok = value <= limit if cmp == "<=" else value >= limit
    return ("PASS" if ok else "FAIL"), f"{label}: {value:.3g} (target {cmp} {limit:g})"


def evaluate_targets(records: list[Record]) -> list[tuple[str, str, str]]:
    """Returns (issue, PASS/FAIL/SKIP, detail) for every target the run measured."""
    out: list[tuple[str, str, str]] = []

    def add(issue: str, rec: Record | None, what: str, attr: str, limit: float) -> None:
        if rec is None:
            return
        status, detail = _check(what, getattr(rec, attr), limit)
        if rec.note and status == "SKIP":
            detail += f" ({rec.note})"
        if attr == "time_ratio" and rec.time_ratio_quartiles:
            q1, q3 = rec.time_ratio_quartiles
            detail += f" [per-repeat ratios, quartiles {q1:.2f}-{q3:.2f}]"
        out.append((issue, status, detail))

    for op in CE_OPS:
        for shape in ISSUE_A_SHAPES:
            rec = _find(records, op, shape, "fwd+bwd", "jxent")
            tag = f"{op} {shape[0]}x{shape[1]} fwd+bwd"
            add("A", rec, f"{tag} time jxent/optax", "time_ratio", 1.0)
            add("A", rec, f"{tag} temp jxent/optax", "temp_ratio", 1.0)
        rec = _find(records, op, ISSUE_B_SHAPE, "fwd", "jxent")
        tag = f"{op} {ISSUE_B_SHAPE[0]}x{ISSUE_B_SHAPE[1]}"
        add("B", rec, f"{tag} fwd time jxent/optax (>=3x faster)", "time_ratio", 1 / 3)
        rec = _find(records, op, ISSUE_B_SHAPE, "fwd+bwd", "jxent")
        add("B", rec, f"{tag} fwd+bwd time jxent/optax", "time_ratio", 0.8)
        # The same target without the page faults of a fresh 1 GB gradient buffer.
        rec = _find(records, op, ISSUE_B_SHAPE, "donated", "jxent")
        add("B", rec, f"{tag} fwd+bwd (donated logits) time jxent/optax", "time_ratio", 0.8)
    for rec in records:
        if rec.mode == "donated" and rec.candidate == "jxent" and rec.median_ms is not None:
            tag = f"{rec.op} {rec.shape[0]}x{rec.shape[1]} donated"
            ok = bool(rec.in_place)
            detail = f"{tag}: gradient written into the donated logits, no copy: {ok}"
            out.append(("B", "PASS" if ok else "FAIL", detail))
    shapes = sorted({tuple(r.shape) for r in records if r.op != "fused"})
    for op in (*ELEMENTWISE_OPS, *CE_OPS):
        for shape in shapes:
            if shape == ISSUE_B_SHAPE:
                continue
            rec = _find(records, op, shape, "fwd+bwd", "jxent")
            tag = f"{op} {shape[0]}x{shape[1]} fwd+bwd"
            ref = "jax.nn" if op in ELEMENTWISE_OPS else "optax"
            add("B", rec, f"{tag} time jxent/{ref}", "time_ratio", 1.0)
            add("B", rec, f"{tag} temp jxent/{ref}", "temp_ratio", 1.0)
    for op in ("logsumexp", "softmax"):
        for shape in shapes:
            rec = _find(records, op, shape, "fwd+bwd", "jxent")
            add(
                "B",
                rec,
                f"{op} {shape[0]}x{shape[1]} rel. error vs float64",
                "rel_error",
                ACCURACY_RTOL,
            )
    for rec in records:
        if rec.op == "fused" and rec.candidate == "jxent":
            n, d, v = rec.shape
            tag = f"fused N={n} D={d} V={v}"
            if rec.mode == "fwd+bwd (memory only)":
                add("fused", rec, f"{tag} temp jxent/unfused", "temp_ratio", 1 / 16)
            elif rec.mode == "fwd+bwd":
                add("fused", rec, f"{tag} time jxent/unfused", "time_ratio", 1.0)
    return out


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(records: list[Record]) -> str:
    header = (
        f"{'shape':>17} {'op':<11} {'mode':<22} {'candidate':<14} {'ms':>9} {'x ref':>6} "
        f"{'cpu x':>6} "
        f"{'temp MB':>9} {'x ref':>7} {'in-place':>8}  note"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        shape = "x".join(str(s) for s in r.shape)
        temp_mb = None if r.temp_bytes is None else r.temp_bytes / 2**20
        in_place = "" if r.in_place is None else ("yes" if r.in_place else "no")
        note = r.note
        if r.rel_error is not None:
            note = f"rel.err {r.rel_error:.1e} {note}".strip()
        lines.append(
            f"{shape:>17} {r.op:<11} {r.mode:<22} {r.candidate:<14} {_fmt(r.median_ms, '9.3f')} "
            f"{_fmt(r.time_ratio, '6.2f')} {_fmt(r.cpu_time_ratio, '6.2f')} "
            f"{_fmt(temp_mb, '9.2f')} {_fmt(r.temp_ratio, '7.2f')} "
            f"{in_place:>8}  {note}"
        )
    return "\n".join(lines)


def environment(argv: Sequence[str]) -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *argv]),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": importlib.import_module("jaxlib").__version__,
        "optax": getattr(optax, "__version__", None),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load,
    }


def write_plot(records: list[Record], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in records if r.mode == "fwd+bwd"]
    ops = [op for op in ALL_OPS if any(r.op == op for r in records)]
    if not ops:
        return
    fig, axes = plt.subplots(2, len(ops), figsize=(3.4 * len(ops), 6.5), squeeze=False)
    for col, op in enumerate(ops):
        op_recs = [r for r in records if r.op == op and "fwd+bwd" in r.mode]
        shapes = sorted({tuple(r.shape) for r in op_recs}, key=lambda s: math.prod(s))
        labels = ["x".join(map(str, s)) for s in shapes]
        for cand in dict.fromkeys(r.candidate for r in op_recs):
            ratios = [
                next(
                    (
                        r.time_ratio
                        for r in timed
                        if r.op == op and tuple(r.shape) == s and r.candidate == cand
                    ),
                    None,
                )
                for s in shapes
            ]
            temps = [
                next(
                    (
                        r.temp_bytes / 2**20
                        for r in op_recs
                        if tuple(r.shape) == s and r.candidate == cand and r.temp_bytes is not None
                    ),
                    None,
                )
                for s in shapes
            ]
            xs = range(len(shapes))
            axes[0][col].plot(
                [x for x, v in zip(xs, ratios, strict=True) if v is not None],
                [v for v in ratios if v is not None],
                "o-",
                label=cand,
            )
            axes[1][col].plot(
                [x for x, v in zip(xs, temps, strict=True) if v is not None],
                [max(v, 1e-3) for v in temps if v is not None],
                "o-",
                label=cand,
            )
        for row in (0, 1):
            ax = axes[row][col]
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].axhline(1.0, color="grey", lw=0.8)
        axes[0][col].set_title(op)
        axes[0][col].legend(fontsize=7)
    axes[0][0].set_ylabel("fwd+bwd time / reference (median)")
    axes[1][0].set_ylabel("compiled temp memory (MB)")
    fig.suptitle("jxent benchmarks (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _parse_shapes(text: str, rank: int) -> list[tuple[int, ...]]:
    shapes = []
    for item in text.split(","):
        dims = tuple(int(s) for s in item.lower().split("x"))
        if len(dims) != rank:
            raise argparse.ArgumentTypeError(f"shape {item!r} should have {rank} dims like 4x5")
        shapes.append(dims)
    return shapes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=",".join(ALL_OPS), help=f"comma list from {ALL_OPS}")
    p.add_argument("--shapes", default=None, help="comma list of NxC, e.g. 128x10,4096x1000")
    p.add_argument("--modes", default="fwd+bwd,fwd,donated", help="fwd+bwd, fwd, donated")
    p.add_argument("--donate-ops", default=",".join(CE_OPS), help="ops that get the donated mode")
    p.add_argument("--candidates", default=None, help="comma list; default: all available")
    p.add_argument("--fused-time-shape", default=None, help="NxDxV timed for the fused case")
    p.add_argument(
        "--fused-memory-shape",
        default=None,
        help="NxDxV for memory-only analysis of the fused case ('none' to skip)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed samples per candidate")
    p.add_argument("--min-sample-ms", type=float, default=20.0, help="min time per sample")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (~1 min)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--jxent-name",
        action="append",
        default=[],
        metavar="OP=ATTR",
        help="use jxent.ATTR for OP (e.g. ce_int=cross_entropy)",
    )
    args = p.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    unknown = set(args.ops) - set(ALL_OPS)
    if unknown:
        p.error(f"unknown ops {sorted(unknown)}; expected a subset of {ALL_OPS}")
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.modes) - {"fwd+bwd", "fwd", "donated"}:
        p.error(f"unknown modes in {args.modes}; expected fwd+bwd, fwd, donated")
    args.donate_ops = set(args.donate_ops.split(","))
    args.candidates = None if args.candidates is None else set(args.candidates.split(","))
    if args.shapes is not None:
        args.shapes = _parse_shapes(args.shapes, 2)
    else:
        args.shapes = list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    default_time = QUICK_FUSED_TIME_SHAPE if args.quick else FUSED_TIME_SHAPE
    args.fused_time_shape = (
        _parse_shapes(args.fused_time_shape, 3)[0] if args.fused_time_shape else default_time
    )
    if args.fused_memory_shape == "none":
        args.fused_memory_shape = None
    elif args.fused_memory_shape:
        args.fused_memory_shape = _parse_shapes(args.fused_memory_shape, 3)[0]
    else:
        args.fused_memory_shape = None if args.quick else FUSED_MEMORY_SHAPE
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    args.overrides = dict(item.split("=", 1) for item in args.jxent_name)
    return args


def _modes_for(op: str, modes: Sequence[str], donate_ops: set[str]) -> list[str]:
    chosen = []
    for mode in modes:
        if mode == "fwd" and op not in CE_OPS:
            continue  # Forward-only is the evaluation path of losses.
        if mode == "donated" and (op not in donate_ops or op == "fused"):
            continue
        chosen.append(mode)
    return chosen


def run(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    records: list[Record] = []
    notes: list[str] = []
    min_sample_s = args.min_sample_ms / 1e3
    for op in args.ops:
        candidates, reference, op_notes = build_candidates(op, args.overrides)
        if args.candidates is not None:
            candidates = {k: v for k, v in candidates.items() if k in args.candidates}
        notes.extend(op_notes)
        for note in op_notes:
            print(note, flush=True)
        if not candidates:
            continue
        shapes: list[tuple[int, ...]] = [args.fused_time_shape] if op == "fused" else args.shapes
        for shape in shapes:
            label = "x".join(map(str, shape))
            print(f"... {op} {label}", flush=True)
            inputs = make_inputs(op, shape)
            modes = _modes_for(op, args.modes, args.donate_ops)
            new = measure_case(
                op, shape, modes, candidates, reference, inputs, args.repeats, min_sample_s
            )
            if op in ELEMENTWISE_OPS:
                _add_accuracy(new, op, candidates, inputs[0])
            records.extend(new)
            print(format_table(new).split("\n", 2)[-1], flush=True)
            del inputs
            jax.clear_caches()
            gc.collect()
        if op == "fused" and args.fused_memory_shape is not None:
            shape = args.fused_memory_shape
            print(f"... fused {'x'.join(map(str, shape))} (memory only)", flush=True)
            new = measure_memory_only(op, shape, candidates, reference, _abstract_fused(shape))
            records.extend(new)
            print(format_table(new).split("\n", 2)[-1], flush=True)
    return {
        "environment": env,
        "notes": notes,
        "records": [dataclasses.asdict(r) for r in records],
        "targets": [
            {"issue": i, "status": s, "detail": d} for i, s, d in evaluate_targets(records)
        ],
    }


def _add_accuracy(
    records: list[Record], op: str, candidates: dict[str, LossFn], logits: Array
) -> None:
    fns = {"jax.nn": getattr(jax.nn, op)}
    jx, _ = _resolve_jxent(op, {})
    if jx is not None and "jxent" in candidates:
        fns["jxent"] = jx
    errors = {name: relative_error(op, fn, logits) for name, fn in fns.items()}
    for rec in records:
        if rec.mode == "fwd+bwd" and rec.candidate in errors:
            rec.rel_error = errors[rec.candidate]
            rec.ref_rel_error = errors["jax.nn"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    env = environment([sys.argv[0], *argv])
    print(
        f"jax {env['jax']} jaxlib {env['jaxlib']} on {env['devices']} ({env['cpu_model']}, "
        f"{env['cpu_count']} cpus, load {env['load_average_at_start']})",
        flush=True,
    )
    result = run(args, env)
    records = [Record(**r) for r in result["records"]]
    print()
    print(format_table(records))
    print()
    for target in result["targets"]:
        print(f"{target['status']}: [issue {target['issue']}] {target['detail']}")
    for note in result["notes"]:
        print(note)
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {json_path}")
    if not args.no_plot:
        png_path = os.path.join(args.out, "results.png")
        write_plot(records, png_path)
        print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
