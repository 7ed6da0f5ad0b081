"""Accelerator check for jxent: numerics tests, speed against optax / jax.nn, copy bandwidth.

    make device-check                      # = python benchmarks/device_check.py
    python benchmarks/device_check.py --smoke --out /tmp/dc   # CPU, tiny shapes, seconds

One run, meant to finish in under 8 minutes on one H100 (``--budget-s`` caps it). This file is
the command line; the work is in three modules:

1. ``device_runner.py``: the library tests that check values and gradients against references,
   selected by pytest marker (``--tests-marker``, default ``library and numerics and not
   sharding and not slow``) under ``tests/``, run on the default backend in a pytest
   subprocess (``--test-workers`` pytest-xdist workers); outcomes read from its JUnit XML;
2. ``device_measure.py``: for every case of the registry (``benchmarks/cases.py``) whose
   suites include ``device``, jxent against its reference (optax for the losses, ``jax.nn``
   for the normalisers), fwd+bwd and loss only, in float32 and bfloat16 at (8192, 32000),
   (8192, 128256), (4096, 256000) and (2048, 131072), and the fused linear cross-entropy at
   N=8192, D=4096, V=128256 in bfloat16 against optax on ``x @ w``, candidates interleaved as
   in the CPU suite (``benchmarks/measure.py``); and the device's copy bandwidth at each of
   those sizes (a donated ``x * one`` over the same bytes), against which each case's achieved
   bytes/s is held, counting only the traffic it cannot avoid (the case's ``traffic``);
3. ``device_report.py``: beside each measured record, what ``benchmarks/aot.py`` compiled for
   this kind of device without one (``docs/bench/aot.json``: temp memory and bytes accessed,
   and those bytes over the measured time); the printed summary; ``results.json`` and
   ``results.png`` in ``--out``.

Without an accelerator it stops at once (exit 2) unless ``--smoke`` or ``--allow-cpu``. It
exits 1 when a test fails (a timeout is reported, not failed), else 0; performance targets
are reported, not enforced. A shape that does not fit (out of memory) or fails is recorded as
skipped, with the reason; when the time budget runs out, what is left is recorded as skipped
and the results so far are written.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

# Run from a checkout without installing: make the repository root importable.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks import cases, device_measure, device_report, device_runner  # noqa: E402
from benchmarks.measure import Record, environment, evaluate_targets  # noqa: E402


def _default_out() -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join(_REPO_ROOT, "benchmarks", "results", f"device-{stamp}")


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
    p.add_argument(
        "--tests-marker",
        default=device_runner.NUMERICS_MARKERS,
        help="pytest marker expression choosing the tests (default %(default)r)",
    )
    p.add_argument(
        "--tests-root", default=device_runner.TESTS_ROOT, help="where pytest collects them"
    )
    p.add_argument("--test-workers", type=int, default=6, help="pytest-xdist workers for the tests")
    p.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    p.add_argument("--allow-cpu", action="store_true", help="full shapes on a CPU backend")
    cases.add_ops_argument(p, "device")
    p.add_argument(
        "--dtypes", default=",".join(device_measure.DTYPES), help="comma list for the 2-D cases"
    )
    p.add_argument(
        "--candidates",
        default=None,
        help="default jxent (and each op's reference); add naive for the jax.nn-built CEs",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed samples (default 5)")
    p.add_argument("--min-sample-ms", type=float, default=None, help="default 20 (smoke 0)")
    p.add_argument(
        "--aot-json",
        default=device_report.AOT_JSON,
        help="compiled predictions (make aot) to print beside",
    )
    p.add_argument(
        "--aot-target",
        default=None,
        help="aot.py target to compare with (default: from the device kind: h100 or v5e)",
    )
    args = p.parse_args(argv)
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


def main(argv: Sequence[str] | None = None) -> int:
    start = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    deadline = start + args.budget_s

    env = environment([sys.argv[0], *argv])
    env["accelerator"] = device_report.accelerator_details()
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

    # The numerics tests, in a subprocess on the same device (it allocates as it goes;
    # this process keeps JAX's default preallocation for the benchmarks).
    tests: dict[str, Any] | None = None
    if not args.skip_tests:
        timeout = min(args.tests_budget_s, max(deadline - time.monotonic(), 1.0))
        tests = device_runner.run_tests(
            args.tests_marker,
            workers=1 if args.smoke else args.test_workers,
            timeout_s=timeout,
            out_dir=args.out,
            root=args.tests_root,
            keyword=device_runner.SMOKE_KEYWORD if args.smoke else None,
        )

    plan = device_measure.Plan(
        units=device_measure.plan_units(
            args.ops,
            device_measure.SMOKE_SHAPES if args.smoke else device_measure.SHAPES,
            args.dtypes,
            device_measure.SMOKE_FUSED_SHAPE if args.smoke else device_measure.FUSED_SHAPE,
            device_measure.FUSED_DTYPES,
        ),
        candidates=args.candidates,
        repeats=args.repeats,
        min_sample_s=args.min_sample_ms / 1e3,
        deadline=deadline,
    )
    measured = device_measure.measure_all(plan, start)
    records: list[Record] = measured["records"]
    chosen = [cases.case(op) for op in args.ops]
    prediction = device_report.predict(records, env, args.aot_json, args.aot_target)
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
    device_report.print_summary(result, records)
    png_path = os.path.join(args.out, "results.png")
    device_report.write_plot(records, png_path)
    result["seconds"] = round(time.monotonic() - start, 1)
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {json_path} and {png_path} after {result['seconds']} s")
    return 1 if tests is not None and device_runner.tests_failed(tests) else 0


if __name__ == "__main__":
    sys.exit(main())
