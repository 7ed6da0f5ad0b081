"""Accelerator check for jxent: numerics tests, speed against optax / jax.nn, copy bandwidth.

    make device-check                      # = python benchmarks/device_check.py
    python benchmarks/device_check.py --smoke --out /tmp/dc   # CPU, tiny shapes, seconds

One run, meant to finish in under 8 minutes on one H100 (``--budget-s`` caps it):

1. the test suite's numerics subset (values and gradients against references) on the
   default backend, in a pytest subprocess (``--test-workers`` pytest-xdist workers);
2. for every case of the registry (``benchmarks/cases.py``), jxent against its reference
   (optax for the losses, ``jax.nn`` for the normalisers), fwd+bwd and loss only, in float32
   and bfloat16 at (8192, 32000), (8192, 128256), (4096, 256000) and (2048, 131072), and the
   fused linear cross-entropy at N=8192, D=4096, V=128256 in bfloat16 against optax on
   ``x @ w``; candidates interleaved as in the CPU suite (``benchmarks/measure.py``);
3. the device's copy bandwidth at each of those sizes (a donated ``x * one`` over the same
   bytes), and each case's achieved bytes/s, counting only the traffic it cannot avoid (the
   cases' ``traffic``: for the integer CE, read the logits once and, with the gradient, write
   it once), as a fraction of it;
4. beside each measured record, what ``benchmarks/aot.py`` compiled for this kind of device
   without one (``docs/bench/aot.json``: temp memory and bytes accessed, and those bytes over
   the measured time), so that the first run on a device checks the model;
5. ``results.json`` and ``results.png`` in ``--out``.

Without an accelerator it stops at once (exit 2) unless ``--smoke`` or ``--allow-cpu``. It
exits 1 when a numerics test fails (a timeout is reported, not failed), else 0; performance
targets are reported, not enforced.
A shape that does not fit (out of memory) or fails is recorded as skipped, with the reason;
when the time budget runs out, what is left is recorded as skipped and the results so far
are written.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

# Run from a checkout without installing: make the repository root importable.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks import cases  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    Record,
    environment,
    evaluate_targets,
    format_table,
    measure_mode,
    short_error,
)

SHAPES = ((8192, 32000), (8192, 128256), (4096, 256000), (2048, 131072))
DTYPES = ("float32", "bfloat16")
FUSED_SHAPE = (8192, 4096, 128256)
FUSED_DTYPES = ("bfloat16",)
SMOKE_SHAPES = ((8, 32),)
SMOKE_FUSED_SHAPE = (16, 8, 32)
DEVICE_MODES = ("fwd+bwd", "fwd")

# The numerics subset: the modules that check values and gradients against references, less
# the tests that are about XLA:CPU's buffers, multi-device meshes or lowering, not numbers.
NUMERICS_TESTS = (
    "tests/test_logsumexp.py",
    "tests/test_softmax.py",
    "tests/test_cross_entropy.py",
    "tests/test_kl.py",
    "tests/test_binary.py",
    "tests/test_fused_linear.py",
    "tests/test_degenerate.py",
    "tests/test_properties.py",
    "tests/test_label_semantics.py",
)
NOT_NUMERICS = "memory or scratch or parallel or shard or mesh or lower or hlo or export"
SMOKE_TESTS = ("tests/test_logsumexp.py",)
SMOKE_KEYWORDS = "test_half_precision_accumulates_in_float32"


# --------------------------------------------------------------------------------------------
# (a) Numerics tests, in a subprocess
# --------------------------------------------------------------------------------------------

_RESULT_AFTER_ID = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_RESULT_BEFORE_ID = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+::\S+)")


def _test_outcomes(log: str) -> dict[str, str]:
    """{test id: outcome} from ``pytest -v`` output, serial or pytest-xdist's."""
    outcomes: dict[str, str] = {}
    for line in log.splitlines():
        after = _RESULT_AFTER_ID.search(line)
        before = None if after else _RESULT_BEFORE_ID.search(line)
        if after:
            outcomes[after.group(1)] = after.group(2)
        elif before:
            outcomes[before.group(2)] = before.group(1)
    return outcomes


def run_numerics_tests(
    paths: Sequence[str], keywords: str, workers: int, timeout_s: float, log_path: str
) -> dict[str, Any]:
    """Runs pytest on ``paths`` in a subprocess on the default backend; never raises."""
    command = [sys.executable, "-m", "pytest", "-v", "-k", keywords]
    command += ["-n", str(workers)] if workers > 1 else ["-p", "no:xdist"]
    command += list(paths)
    # The child must not grab most of the accelerator's memory at start-up (JAX's default),
    # nor its workers each other's.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    print(f"numerics tests (timeout {timeout_s:.0f} s): {' '.join(command[1:])}", flush=True)
    start = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log_file:
        # Its own session, so that a timeout ends the xdist workers too (they hold the device).
        child = subprocess.Popen(
            command,
            cwd=_REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode: int | None = child.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out, returncode = True, None
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    with open(log_path) as f:
        log = f.read()
    outcomes = _test_outcomes(log)
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("PASSED", "FAILED", "ERROR")}
    counts["SKIPPED"] = sum(v == "SKIPPED" for v in outcomes.values())
    summary = {
        "command": " ".join(command),
        "returncode": returncode,
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - start, 1),
        "passed": counts["PASSED"],
        "failed": counts["FAILED"],
        "errors": counts["ERROR"],
        "skipped": counts["SKIPPED"],
        "not_passed": sorted(k for k, v in outcomes.items() if v in ("FAILED", "ERROR")),
        "log": os.path.basename(log_path),
        "log_tail": log[-3000:],
    }
    # A pass needs exit status 0 and at least one passed test (a wrong -k selects none).
    summary["ok"] = returncode == 0 and counts["PASSED"] > 0
    verdict = "timed out" if timed_out else ("passed" if summary["ok"] else "FAILED")
    print(
        f"numerics tests {verdict} in {summary['seconds']} s: {counts['PASSED']} passed, "
        f"{counts['FAILED']} failed, {counts['ERROR']} errors, {counts['SKIPPED']} skipped",
        flush=True,
    )
    for test_id in summary["not_passed"]:
        print(f"  not passed: {test_id}", flush=True)
    if returncode not in (0, None) and not outcomes:
        print(log[-2000:], flush=True)
    return summary


# --------------------------------------------------------------------------------------------
# (c) Copy bandwidth
# --------------------------------------------------------------------------------------------


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


def _fill_bandwidth(records: list[Record], case: cases.Case, copy: dict[str, Any]) -> None:
    if case.traffic is None:
        return
    for rec in records:
        if rec.median_ms is None:
            continue
        rec.traffic_bytes = case.traffic(tuple(rec.shape), jnp.dtype(rec.dtype).itemsize, rec.mode)
        rec.bytes_per_s = rec.traffic_bytes / (rec.median_ms / 1e3)
        rec.bandwidth_fraction = rec.bytes_per_s / copy["bytes_per_s"]


# --------------------------------------------------------------------------------------------
# (b) The cases
# --------------------------------------------------------------------------------------------


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
        _fill_bandwidth(records, case, copies[(shape, dtype)])
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


# --------------------------------------------------------------------------------------------
# (d) The compiled prediction (benchmarks/aot.py), beside the measurement
# --------------------------------------------------------------------------------------------

AOT_JSON = os.path.join(_REPO_ROOT, "docs", "bench", "aot.json")
PredictionKey = tuple[str, tuple[int, ...], str, str, str]


def aot_target_for(platform: str, device_kind: str) -> str | None:
    """The aot.py target compiled for this kind of device, if any.

    Hopper GPUs (H100, H200: the same sm_90 compiler target; the H200 has more and faster
    memory, which changes neither temp nor bytes) map to ``h100``; a TPU v5 lite to ``v5e``.
    """
    kind = device_kind.lower()
    if platform in ("gpu", "cuda") and ("h100" in kind or "h200" in kind):
        return "h100"
    if platform == "tpu" and ("v5 lite" in kind or "v5e" in kind):
        return "v5e"
    return None


def load_predictions(path: str, target: str) -> dict[PredictionKey, dict[str, Any]]:
    """{(op, shape, dtype, mode, candidate): aot record} of ``target`` in an aot.json."""
    with open(path) as f:
        result = json.load(f)
    return {
        (r["op"], tuple(r["shape"]), r["dtype"], r["mode"], r["candidate"]): r
        for r in result["records"]
        if r["target"] == target and r.get("temp_bytes") is not None
    }


def add_predictions(
    records: Sequence[Record], predictions: dict[PredictionKey, dict[str, Any]]
) -> int:
    """Fills each record's compiled prediction; returns how many had one."""
    found = 0
    for rec in records:
        pred = predictions.get((rec.op, tuple(rec.shape), rec.dtype, rec.mode, rec.candidate))
        if pred is None:
            continue
        rec.predicted_temp_bytes = pred["temp_bytes"]
        rec.predicted_bytes_accessed = pred.get("bytes_accessed")
        found += 1
    return found


def format_predictions(records: Sequence[Record], target: str) -> str:
    """One line per record with a prediction: measured against compiled-for-``target``.

    The bytes the compiled module accesses, over the measured time, give the rate the device
    would have sustained if the cost model's byte count is right.
    """
    lines = []
    for r in records:
        if r.predicted_temp_bytes is None:
            continue
        measured_temp = "-" if r.temp_bytes is None else f"{r.temp_bytes / 2**20:,.1f}"
        line = (
            f"{r.op} {'x'.join(map(str, r.shape))} {r.dtype} {r.mode} {r.candidate}: "
            f"temp {measured_temp} MiB measured, {r.predicted_temp_bytes / 2**20:,.1f} MiB "
            f"compiled for {target}"
        )
        if r.predicted_bytes_accessed is not None:
            line += f"; {r.predicted_bytes_accessed / 1e9:.3f} GB accessed (compiled)"
            if r.median_ms:
                rate = r.predicted_bytes_accessed / (r.median_ms / 1e3)
                line += f" in {r.median_ms:.3f} ms measured = {rate / 1e9:,.0f} GB/s"
        lines.append(line)
    return "\n".join(lines)


def predict(
    records: Sequence[Record], env: dict[str, Any], path: str, target: str | None = None
) -> dict[str, Any]:
    """Adds the compiled predictions to ``records``; never raises (a missing file is noted).

    ``target`` defaults to the one compiled for this kind of device (``aot_target_for``).
    """
    target = target or aot_target_for(env["platform"], env["device_kind"])
    summary: dict[str, Any] = {"aot_json": path, "target": target, "records_with_prediction": 0}
    if target is None:
        summary["note"] = f"no aot.py target for {env['device_kind']!r} ({env['platform']})"
    elif not os.path.exists(path):
        summary["note"] = f"{path} not found (make aot writes it)"
    else:
        try:
            summary["records_with_prediction"] = add_predictions(
                records, load_predictions(path, target)
            )
        except (OSError, ValueError, KeyError) as e:
            summary["note"] = f"could not read {path}: {short_error(e)}"
    return summary


# --------------------------------------------------------------------------------------------
# (e) Output
# --------------------------------------------------------------------------------------------


def _accelerator_details() -> dict[str, Any]:
    device = jax.devices()[0]
    details: dict[str, Any] = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
    }
    if shutil.which("nvidia-smi"):
        query = "name,memory.total,driver_version,clocks.max.memory,clocks.max.sm"
        try:
            details["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            details["nvidia_smi"] = f"failed: {e}"
    return details


def write_plot(records: Sequence[Record], path: str) -> None:
    """Per dtype: fwd+bwd as a fraction of copy bandwidth, and time against the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("bandwidth_fraction", "fwd+bwd bytes/s ÷ copy bytes/s", 0.8),
        ("time_ratio", "fwd+bwd time ÷ reference", 1.0),
    )
    dtypes = list(dict.fromkeys(r.dtype for r in records)) or ["float32"]
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(16, 4.2 * len(dtypes)), squeeze=False)
    for row, dtype in enumerate(dtypes):
        for col, (metric, ylabel, goal) in enumerate(panels):
            ax = axes[row][col]
            chosen = [
                r
                for r in records
                if r.dtype == dtype and r.mode == "fwd+bwd" and getattr(r, metric) is not None
            ]
            groups = list(dict.fromkeys((r.op, tuple(r.shape)) for r in chosen))
            # One colour per role (jxent, the op's reference, any other baseline), since the
            # reference's name differs from op to op.
            for role, color in (("jxent", "C0"), ("reference", "C1"), ("other", "C7")):
                xs, ys = [], []
                for g, (op, shape) in enumerate(groups):
                    for r in chosen:
                        is_role = {
                            "jxent": r.candidate == "jxent",
                            "reference": r.candidate == r.reference,
                        }.get(role, r.candidate not in ("jxent", r.reference))
                        if (r.op, tuple(r.shape)) == (op, shape) and is_role:
                            xs.append(g + {"jxent": -0.25, "reference": 0.0}.get(role, 0.25))
                            ys.append(getattr(r, metric))
                if xs:
                    ax.bar(xs, ys, width=0.25, color=color, label=role)
            ax.set_xticks(range(len(groups)))
            labels = [f"{op} {'x'.join(map(str, s))}" for op, s in groups]
            ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=7)
            ax.axhline(goal, color="grey", lw=0.8, ls="--")
            ax.set_ylabel(ylabel)
            ax.set_title(dtype)
            ax.grid(True, axis="y", alpha=0.3)
            if groups:
                ax.legend(fontsize=7)
    fig.suptitle("jxent accelerator check (reference: optax for the losses, jax.nn otherwise)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _default_out() -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join(_REPO_ROOT, "benchmarks", "results", f"device-{stamp}")


_OPS_HELP = "; ".join(f"{c.op} = {c.summary}" for c in cases.CASES)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repeats (CPU, seconds)")
    p.add_argument(
        "--out", default=None, help="output dir (default benchmarks/results/device-<UTC time>)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="seconds after which nothing new starts; what is left is recorded as skipped",
    )
    p.add_argument(
        "--tests-budget-s", type=float, default=150.0, help="timeout of the numerics tests"
    )
    p.add_argument("--test-workers", type=int, default=6, help="pytest-xdist workers for the tests")
    p.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    p.add_argument("--allow-cpu", action="store_true", help="full shapes on a CPU backend")
    p.add_argument(
        "--ops", default=",".join(cases.ops_in("device")), help=f"comma list from: {_OPS_HELP}"
    )
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list for the 2-D cases")
    p.add_argument(
        "--candidates",
        default=None,
        help="default jxent (and each op's reference); add naive for the jax.nn-built CEs",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed samples (default 5)")
    p.add_argument("--min-sample-ms", type=float, default=None, help="default 20 (smoke 0)")
    p.add_argument(
        "--aot-json", default=AOT_JSON, help="compiled predictions (make aot) to print beside"
    )
    p.add_argument(
        "--aot-target",
        default=None,
        help="aot.py target to compare with (default: from the device kind: h100 or v5e)",
    )
    args = p.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    unknown = set(args.ops) - set(cases.OPS)
    if unknown:
        p.error(f"unknown ops {sorted(unknown)} in --ops; expected a subset of {cases.OPS}")
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    for dtype in args.dtypes:
        try:
            jnp.dtype(dtype)
        except TypeError:
            p.error(f"unknown dtype {dtype!r} in --dtypes; expected e.g. float32,bfloat16")
    # Default: jxent and the reference only (the naive baselines cost compile time here).
    args.candidates = (args.candidates or "jxent").split(",")
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 5
    if args.min_sample_ms is None:
        args.min_sample_ms = 0.0 if args.smoke else 20.0
    args.out = args.out or _default_out()
    return args


def _tests_failed(tests: dict[str, Any]) -> bool:
    """A failing or erroring test, or a run that broke without timing out (not a timeout)."""
    broke = not tests["ok"] and not tests["timed_out"]
    return bool(tests["failed"] or tests["errors"] or broke)


def main(argv: Sequence[str] | None = None) -> int:
    start = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    deadline = start + args.budget_s

    env = environment([sys.argv[0], *argv])
    env["accelerator"] = _accelerator_details()
    print(
        f"jax {env['jax']} jaxlib {env['jaxlib']} on {env['device_kind']} "
        f"({env['platform']}, {len(env['devices'])} devices)",
        flush=True,
    )
    if env["platform"] == "cpu" and not (args.smoke or args.allow_cpu):
        print(
            "JAX's default backend is cpu: this is no accelerator check (see "
            "benchmarks/README.md for installing JAX with CUDA); --smoke runs the tiny CPU "
            "version, --allow-cpu the full shapes anyway",
            file=sys.stderr,
        )
        return 2

    # (a) The numerics tests, in a subprocess on the same device (it allocates as it goes;
    # this process keeps JAX's default preallocation for the benchmarks).
    tests: dict[str, Any] | None = None
    if not args.skip_tests:
        paths, keywords = (SMOKE_TESTS, SMOKE_KEYWORDS)
        if not args.smoke:
            paths, keywords = NUMERICS_TESTS, f"not ({NOT_NUMERICS})"
        timeout = min(args.tests_budget_s, max(deadline - time.monotonic(), 1.0))
        workers = 1 if args.smoke else args.test_workers
        log_path = os.path.join(args.out, "tests.log")
        tests = run_numerics_tests(paths, keywords, workers, timeout, log_path)

    plan = Plan(
        units=plan_units(
            args.ops,
            SMOKE_SHAPES if args.smoke else SHAPES,
            args.dtypes,
            SMOKE_FUSED_SHAPE if args.smoke else FUSED_SHAPE,
            FUSED_DTYPES,
        ),
        candidates=args.candidates,
        repeats=args.repeats,
        min_sample_s=args.min_sample_ms / 1e3,
        deadline=deadline,
    )
    measured = measure_all(plan, start)
    records: list[Record] = measured["records"]
    chosen = [cases.case(op) for op in args.ops]
    prediction = predict(records, env, args.aot_json, args.aot_target)
    result = {
        "environment": env,
        "smoke": args.smoke,
        "budget_s": args.budget_s,
        "seconds": None,
        "tests": tests,
        "copy": measured["copy"],
        "records": [dataclasses.asdict(r) for r in records],
        "skipped": measured["skipped"],
        "targets": evaluate_targets(records, chosen, device=True),
        "prediction": prediction,
    }
    print()
    print(format_table(records, bandwidth=True))
    print()
    for target in result["targets"]:
        print(f"{target['status']}: [{target['target']}] {target['detail']}")
    for skip in result["skipped"]:
        print(f"SKIPPED: {skip['op']} {skip['shape']} {skip['dtype']}: {skip['reason']}")
    print()
    print(f"compiled prediction ({prediction['aot_json']}, target {prediction['target']}):")
    print(format_predictions(records, prediction["target"]) or f"  none: {prediction.get('note')}")
    png_path = os.path.join(args.out, "results.png")
    write_plot(records, png_path)
    result["seconds"] = round(time.monotonic() - start, 1)
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {json_path} and {png_path} after {result['seconds']} s")
    return 1 if tests is not None and _tests_failed(tests) else 0


if __name__ == "__main__":
    sys.exit(main())
