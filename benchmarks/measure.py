"""Measuring one benchmark case: interleaved timing, compiled memory, accuracy and targets.

Shared by the CPU suite (``run.py``) and the accelerator check (``device_check.py``); what is
measured for which op comes from the registry in ``cases.py``.

Every candidate is compiled and warmed up first; then each repeat runs every candidate once, in
an order rotated from repeat to repeat (round-robin), so that slow phases of a noisy, shared
machine hit all candidates alike. Reported are medians over repeats and ratios against the
case's reference candidate measured in the same run.
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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.cases import MEMORY_ONLY, Case, LossFn, Shape

Array = jax.Array
ACCURACY_ROWS = 64  # rows compared against the float64 reference (keeps the check cheap).


@dataclasses.dataclass
class Record:
    op: str
    shape: list[int]
    mode: str
    candidate: str
    reference: str
    dtype: str = "float32"
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
    # The accelerator check: the fewest bytes the pass must move, the rate achieved at that
    # count, and that rate as a fraction of the device's copy bandwidth measured in the run.
    traffic_bytes: int | None = None
    bytes_per_s: float | None = None
    bandwidth_fraction: float | None = None
    # The accelerator check: what benchmarks/aot.py compiled for this device's kind without
    # one (docs/bench/aot.json), beside the measured numbers.
    predicted_temp_bytes: int | None = None
    predicted_bytes_accessed: float | None = None
    note: str = ""


# --------------------------------------------------------------------------------------------
# Compilation and memory
# --------------------------------------------------------------------------------------------


def jitted(loss: LossFn, mode: str, argnums: int | tuple[int, ...]) -> Any:
    if mode == "fwd":
        return jax.jit(loss)
    fn = jax.value_and_grad(loss, argnums=argnums)
    return jax.jit(fn, donate_argnums=0) if mode == "donated" else jax.jit(fn)


def compiled_memory(compiled: Any) -> dict[str, int | None]:
    stats = compiled.memory_analysis()
    if stats is None:  # Some backends do not report it.
        return dict.fromkeys(("temp_bytes", "argument_bytes", "output_bytes", "alias_bytes"))
    return {
        "temp_bytes": int(stats.temp_size_in_bytes),
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
    }


def copies_first_parameter(hlo_text: str) -> bool:
    """Whether an optimised HLO module's entry copies its first parameter (for a donated
    input: XLA could not order every read of it before the overwrite)."""
    entry = hlo_text[hlo_text.find("ENTRY") :]
    match = re.search(r"%(\S+) = \S+ parameter\(0\)", entry)
    return bool(match) and re.search(rf"copy\(%{re.escape(match.group(1))}\)", entry) is not None


def _copies_first_arg(compiled: Any) -> bool:
    try:
        text = compiled.as_text()
    except Exception:  # Not every backend can print its executable.
        return False
    return copies_first_parameter(text)


def _gradient_of_first_arg(out: Any) -> Array | None:
    if not isinstance(out, tuple) or len(out) != 2:
        return None
    grad = out[1]
    return grad[0] if isinstance(grad, tuple) else grad


def short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class Runner:
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
    runners: dict[str, Runner], repeats: int, min_sample_s: float, collect: bool = True
) -> dict[str, list[tuple[float, float]]]:
    """Round-robin timing: each repeat calls every candidate once, rotating the order.

    ``collect`` runs Python's garbage collector between samples, so that no collection lands
    in a timed one (host arrays hold their memory until then; device buffers go at once).
    """
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
            if collect:
                gc.collect()
    return times


def measure_mode(
    case: Case,
    shape: Shape,
    mode: str,
    losses: dict[str, LossFn],
    args: tuple[Array, ...],
    repeats: int,
    min_sample_s: float,
    collect: bool = True,
) -> list[Record]:
    """Compiles every candidate for ``mode``, then times them interleaved."""
    dtype = str(args[0].dtype)
    runners: dict[str, Runner] = {}
    copies_logits: dict[str, bool] = {}
    records: dict[str, Record] = {}
    for name, loss in losses.items():
        rec = Record(case.op, list(shape), mode, name, case.reference, dtype=dtype)
        records[name] = rec
        try:
            compiled = jitted(loss, mode, case.argnums).lower(*args).compile()
        except Exception as e:  # A broken candidate must not sink the whole run.
            rec.note = f"compile failed: {short_error(e)}"
            continue
        for key, value in compiled_memory(compiled).items():
            setattr(rec, key, value)
        runners[name] = Runner(compiled, args, donated=(mode == "donated"))
        copies_logits[name] = _copies_first_arg(compiled)
    try:
        times = time_candidates(runners, repeats, min_sample_s, collect)
    except Exception as e:
        for name in runners:
            records[name].note = f"run failed: {type(e).__name__}: {e}"[:300]
        times = {}
    for name, samples in times.items():
        rec = records[name]
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
    fill_ratios(records, case.reference)
    return list(records.values())


def measure_memory_only(
    case: Case, shape: Shape, losses: dict[str, LossFn], dtype: Any = jnp.float32
) -> list[Record]:
    """Compiled memory for fwd+bwd from abstract shapes; allocates no array."""
    abstract = jax.eval_shape(lambda: case.inputs(shape, dtype))
    records: dict[str, Record] = {}
    for name, loss in losses.items():
        rec = Record(
            case.op, list(shape), MEMORY_ONLY, name, case.reference, dtype=jnp.dtype(dtype).name
        )
        records[name] = rec
        try:
            compiled = jitted(loss, "fwd+bwd", case.argnums).lower(*abstract).compile()
        except Exception as e:
            rec.note = f"compile failed: {short_error(e)}"
            continue
        for key, value in compiled_memory(compiled).items():
            setattr(rec, key, value)
        del compiled
    fill_ratios(records, case.reference)
    return list(records.values())


def fill_ratios(records: dict[str, Record], reference: str) -> None:
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


def _float64_rows(a: Array, rows: int) -> np.ndarray:
    host = np.asarray(a[:rows])
    return host.astype(np.float64) if jnp.issubdtype(a.dtype, jnp.floating) else host


def relative_error(case: Case, fn: Any, inputs: Sequence[Array]) -> float:
    """Max error of ``fn``'s output over the first rows against the case's float64 reference.

    ``fn`` takes the op's own arguments (``inputs[:case.op_args]``) and runs on the whole
    batch, as timed. One value per row (logsumexp, a cross-entropy): the elementwise relative
    error. A row of values (softmax, log_softmax): the error relative to the row's largest
    |reference|, the row-normwise error (elementwise relative error means nothing for
    probabilities that underflow).
    """
    if case.float64 is None:
        raise ValueError(f"case {case.op!r} has no float64 reference")
    args = tuple(inputs[: case.op_args])
    out = np.asarray(jax.jit(fn)(*args)[:ACCURACY_ROWS], np.float64)
    ref = case.float64(*(_float64_rows(a, ACCURACY_ROWS) for a in args))
    if ref.ndim == 1:
        return float(np.max(np.abs(out - ref) / np.maximum(np.abs(ref), 1e-30)))
    scale = np.maximum(np.max(np.abs(ref), axis=-1, keepdims=True), 1e-30)
    return float(np.max(np.abs(out - ref) / scale))


def add_accuracy(
    records: list[Record], case: Case, inputs: Sequence[Array], names: Sequence[str]
) -> None:
    """Fills ``rel_error`` (and the reference's, ``ref_rel_error``) on the fwd+bwd records."""
    if case.float64 is None:
        return
    fns = case.candidates()
    errors: dict[str, float] = {}
    for name in names:
        try:
            errors[name] = relative_error(case, fns[name], inputs)
        except Exception as e:  # Reported on the record; the timing still stands.
            for rec in records:
                if rec.candidate == name:
                    rec.note = f"{rec.note} accuracy failed: {short_error(e)}".strip()
    for rec in records:
        if rec.mode == "fwd+bwd" and rec.candidate in errors:
            rec.rel_error = errors[rec.candidate]
            rec.ref_rel_error = errors.get(case.reference)


# --------------------------------------------------------------------------------------------
# Targets and the table
# --------------------------------------------------------------------------------------------


def parse_shapes(text: str, rank: int) -> list[tuple[int, ...]]:
    """Shapes from a command line's comma list: ``128x10,4096x1000`` (rank 2), ``NxDxV`` (3)."""
    shapes = []
    for item in text.split(","):
        try:
            dims = tuple(int(s) for s in item.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != rank:
            raise argparse.ArgumentTypeError(
                f"shape {item!r} in {text!r} should be {rank} integers joined by x, like "
                + "x".join(["4", "5", "6"][:rank])
            )
        shapes.append(dims)
    return shapes


def shape_label(shape: Sequence[int]) -> str:
    if len(shape) == 3:
        n, d, v = shape
        return f"N={n} D={d} V={v}"
    return "x".join(str(s) for s in shape)


def evaluate_targets(
    records: Sequence[Record], cases: Sequence[Case], device: bool = False
) -> list[dict[str, str]]:
    """{target, status: PASS/FAIL/SKIP, detail} for every target of a measured jxent record.

    ``device`` picks the cases' ``device_targets`` (and names the dtype in each line).
    """
    out: list[dict[str, str]] = []
    for case in cases:
        for target in case.device_targets if device else case.targets:
            for rec in records:
                if (rec.op, rec.mode, rec.candidate) != (case.op, target.mode, "jxent"):
                    continue
                if not target.shapes(tuple(rec.shape)):
                    continue
                status, value = target.check(getattr(rec, target.metric))
                what = target.label.format(reference=rec.reference)
                dtype = f" {rec.dtype}" if device else ""
                detail = f"{rec.op} {shape_label(rec.shape)}{dtype} {rec.mode} {what}: {value}"
                if rec.note and status == "SKIP":
                    detail += f" ({rec.note})"
                if target.metric == "time_ratio" and rec.time_ratio_quartiles:
                    q1, q3 = rec.time_ratio_quartiles
                    detail += f" [per-repeat ratios, quartiles {q1:.2f}-{q3:.2f}]"
                out.append({"target": target.name, "status": status, "detail": detail})
    return out


def _fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])  # keep the columns aligned where there is no value
    return "-".rjust(width) if value is None else format(value, spec)


def format_table(records: Sequence[Record], bandwidth: bool = False) -> str:
    """One line per record; ``bandwidth`` adds the dtype and the fraction of copy bandwidth."""
    extra_header = f" {'dtype':<8} {'of copy':>7}" if bandwidth else ""
    header = (
        f"{'shape':>17} {'op':<11} {'mode':<22} {'candidate':<14}{extra_header} {'ms':>9} "
        f"{'x ref':>6} {'cpu x':>6} {'temp MB':>9} {'x ref':>7} {'in-place':>8}  note"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        shape = "x".join(str(s) for s in r.shape)
        temp_mb = None if r.temp_bytes is None else r.temp_bytes / 2**20
        in_place = "" if r.in_place is None else ("yes" if r.in_place else "no")
        note = r.note
        if r.rel_error is not None:
            note = f"rel.err {r.rel_error:.1e} {note}".strip()
        extra = f" {r.dtype:<8} {_fmt(r.bandwidth_fraction, '7.2f')}" if bandwidth else ""
        lines.append(
            f"{shape:>17} {r.op:<11} {r.mode:<22} {r.candidate:<14}{extra} "
            f"{_fmt(r.median_ms, '9.3f')} {_fmt(r.time_ratio, '6.2f')} "
            f"{_fmt(r.cpu_time_ratio, '6.2f')} {_fmt(temp_mb, '9.2f')} "
            f"{_fmt(r.temp_ratio, '7.2f')} {in_place:>8}  {note}"
        )
    return "\n".join(lines)


def write_report(
    out: str,
    script: str,
    given: Sequence[str],
    records: Sequence[dict[str, Any]],
    markdown: Any,
) -> None:
    """``{out}/{script}.json`` (the environment, the command, the records) and
    ``{out}/{script}.md`` (``markdown(records, env, command)``) of a compile sweep run as
    ``python benchmarks/{script}.py *given``."""
    env = environment([f"benchmarks/{script}.py", *given])
    command = " ".join([f"python benchmarks/{script}.py", *given])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{script}.json"), "w") as f:
        json.dump({"environment": env, "command": command, "records": records}, f, indent=1)
    with open(os.path.join(out, f"{script}.md"), "w") as f:
        f.write(markdown(records, env, command))


def environment(argv: Sequence[str]) -> dict[str, Any]:
    """Where and with what a run was made: versions, devices, CPU model, load."""
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
        load: list[float] | None = list(os.getloadavg())
    except OSError:
        load = None
    optax = sys.modules.get("optax")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *argv]),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": importlib.import_module("jaxlib").__version__,
        "optax": getattr(optax, "__version__", None),
        "devices": [str(d) for d in jax.devices()],
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load,
    }
