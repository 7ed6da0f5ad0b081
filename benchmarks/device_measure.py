"""The accelerator check's measurements: each registry case timed on the device, and the
device's copy bandwidth that the cases' achieved bytes/s are held against.

What is measured for which op (candidates, inputs, modes, minimum traffic, targets) comes from
the registry, ``benchmarks/cases.py``; the timing itself is ``benchmarks/measure.py``'s, as in
the CPU suite. ``device_check.py`` builds a ``Plan`` and calls ``measure_all``.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import cases
from benchmarks.measure import Record, format_table, measure_mode, short_error

SHAPES = ((8192, 32000), (8192, 128256), (4096, 256000), (2048, 131072))
DTYPES = ("float32", "bfloat16")
FUSED_SHAPE = (8192, 4096, 128256)
FUSED_DTYPES = ("bfloat16",)
SMOKE_SHAPES = ((8, 32),)
SMOKE_FUSED_SHAPE = (16, 8, 32)
DEVICE_MODES = ("fwd+bwd", "fwd")


def copy_bandwidth(shape: tuple[int, ...], dtype: str, repeats: int) -> dict[str, Any]:
    """Bytes/s of a donated ``x * one`` over an array of ``shape``: one read and one write.

    ``one`` is an argument, not a constant, so XLA cannot fold the product away; the data are
    random (not zeros) so that no memory compression can flatter the number. Each call's
    output (which XLA writes over its donated input) is the next call's input.
    """
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
    one = jnp.ones((), dtype)
    step = jax.jit(lambda x, one: x * one, donate_argnums=0)
    x = jax.block_until_ready(step(x, one))  # compile and warm up
    start = time.perf_counter()
    x = jax.block_until_ready(step(x, one))
    once = time.perf_counter() - start
    calls = max(1, min(1000, int(0.02 / max(once, 1e-7))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            x = step(x, one)
        jax.block_until_ready(x)
        samples.append((time.perf_counter() - start) / calls)
    moved = 2 * math.prod(shape) * jnp.dtype(dtype).itemsize
    seconds = statistics.median(samples)
    del x
    return {
        "shape": list(shape),
        "dtype": dtype,
        "bytes_moved": moved,
        "median_ms": 1e3 * seconds,
        "bytes_per_s": moved / seconds,
        "calls_per_sample": calls,
        "samples": len(samples),
    }


def fill_bandwidth(records: list[Record], case: cases.Case, copy: dict[str, Any]) -> None:
    if case.traffic is None:
        return
    for rec in records:
        if rec.median_ms is None:
            continue
        rec.traffic_bytes = case.traffic(tuple(rec.shape), jnp.dtype(rec.dtype).itemsize, rec.mode)
        rec.bytes_per_s = rec.traffic_bytes / (rec.median_ms / 1e3)
        rec.bandwidth_fraction = rec.bytes_per_s / copy["bytes_per_s"]


@dataclasses.dataclass
class Plan:
    """What one run measures, in order, and how long it may take."""

    units: list[tuple[cases.Case, tuple[int, ...], str]]  # (case, shape, dtype)
    candidates: list[str] | None
    repeats: int
    min_sample_s: float
    deadline: float  # time.monotonic() after which nothing new is started


def _device_order(case: cases.Case) -> int:
    # The losses first (the bandwidth targets are about them), then the fused loss,
    # then the normalisers: if the budget runs short, the last are the ones left out.
    if any(t.metric == "bandwidth_fraction" for t in case.device_targets):
        return 0
    return 1 if case.shape_rank == 3 else 2


def plan_units(
    ops: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[str],
    fused_shape: tuple[int, ...],
    fused_dtypes: Sequence[str],
) -> list[tuple[cases.Case, tuple[int, ...], str]]:
    units = []
    for case in sorted((cases.case(op) for op in ops), key=_device_order):
        if case.shape_rank == 3:
            units += [(case, fused_shape, dtype) for dtype in fused_dtypes]
        else:
            units += [(case, shape, dtype) for shape in shapes for dtype in dtypes]
    return units


def _skip(case: cases.Case, shape: Sequence[int], dtype: str, reason: str) -> dict[str, Any]:
    print(f"  skipped {case.op} {'x'.join(map(str, shape))} {dtype}: {reason}", flush=True)
    return {"op": case.op, "shape": list(shape), "dtype": dtype, "reason": reason}


def measure_unit(
    case: cases.Case,
    shape: tuple[int, ...],
    dtype: str,
    plan: Plan,
    copies: dict[tuple[tuple[int, ...], str], dict[str, Any]],
    skipped: list[dict[str, Any]],
) -> list[Record]:
    """Every device mode of one case at one shape and dtype; failures become skip entries."""
    if case.traffic is not None and (shape, dtype) not in copies:
        try:
            copies[(shape, dtype)] = copy_bandwidth(shape, dtype, plan.repeats)
        except Exception as e:  # Out of memory, most likely: the whole size is skipped.
            skipped.append(_skip(case, shape, dtype, f"copy bandwidth: {short_error(e)}"))
            return []
        copy = copies[(shape, dtype)]
        print(
            f"  copy {'x'.join(map(str, shape))} {dtype}: {copy['median_ms']:.3f} ms, "
            f"{copy['bytes_per_s'] / 1e9:.0f} GB/s",
            flush=True,
        )
    try:
        inputs = jax.block_until_ready(case.inputs(shape, jnp.dtype(dtype)))
    except Exception as e:
        skipped.append(_skip(case, shape, dtype, f"inputs: {short_error(e)}"))
        return []
    losses = case.losses(plan.candidates)
    records: list[Record] = []
    for mode in (m for m in DEVICE_MODES if m in case.modes):
        new = measure_mode(
            case, shape, mode, losses, inputs, plan.repeats, plan.min_sample_s, collect=False
        )
        for rec in new:
            if rec.note.startswith(("compile failed", "run failed")):
                skipped.append(_skip(case, shape, dtype, f"{mode} {rec.candidate}: {rec.note}"))
        records += new
    del inputs
    if (shape, dtype) in copies:
        fill_bandwidth(records, case, copies[(shape, dtype)])
    gc.collect()
    return records


def measure_all(plan: Plan, start: float) -> dict[str, Any]:
    records: list[Record] = []
    skipped: list[dict[str, Any]] = []
    copies: dict[tuple[tuple[int, ...], str], dict[str, Any]] = {}
    for case, shape, dtype in plan.units:
        if time.monotonic() > plan.deadline:
            skipped.append(_skip(case, shape, dtype, "time budget (--budget-s) spent"))
            continue
        label = f"{case.op} {'x'.join(map(str, shape))} {dtype}"
        print(f"[{time.monotonic() - start:5.0f} s] {label}", flush=True)
        new = measure_unit(case, shape, dtype, plan, copies, skipped)
        if new:
            print(format_table(new, bandwidth=True).split("\n", 2)[-1], flush=True)
        records += new
    return {"records": records, "skipped": skipped, "copy": list(copies.values())}
