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

What each op is (candidates, inputs, modes, float64 reference, targets) comes from the registry
in ``benchmarks/cases.py``; the measuring itself is ``benchmarks/measure.py``. Run
``python benchmarks/run.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
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
    add_accuracy,
    environment,
    evaluate_targets,
    format_table,
    measure_memory_only,
    measure_mode,
    parse_shapes,
)

DEFAULT_SHAPES = ((128, 10), (4096, 1000), (8192, 32000), cases.LONG_ROW_SHAPE)
QUICK_SHAPES = ((128, 10), (1024, 1000))
# Fused linear + CE: (N, D, V). Timed at the first, memory-only at the second.
FUSED_TIME_SHAPE = (4096, 512, 32000)
FUSED_MEMORY_SHAPE = (8192, 1024, 128256)
QUICK_FUSED_TIME_SHAPE = (512, 128, 4096)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def write_plot(records: list[Record], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in records if r.mode == "fwd+bwd"]
    ops = [op for op in cases.OPS if any(r.op == op for r in records)]
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    donatable = [c.op for c in cases.CASES if "donated" in c.modes]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cases.add_ops_argument(p, "cpu")
    p.add_argument("--shapes", default=None, help="comma list of NxC, e.g. 128x10,4096x1000")
    p.add_argument("--modes", default="fwd+bwd,fwd,donated", help="fwd+bwd, fwd, donated")
    p.add_argument("--donate-ops", default=",".join(donatable), help="ops timed donated")
    p.add_argument("--candidates", default=None, help="comma list (the reference is always kept)")
    p.add_argument("--fused-time-shape", default=None, help="NxDxV timed for the fused case")
    p.add_argument(
        "--fused-memory-shape",
        default=None,
        help="NxDxV for memory-only analysis of the fused case ('none' to skip)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed samples per candidate")
    p.add_argument("--min-sample-ms", type=float, default=20.0, help="min time per sample")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (~1 min)")
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results"),
        help="directory for results.json and results.png (default benchmarks/results)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip results.png")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.modes) - set(cases.MODES):
        p.error(f"unknown modes in {args.modes}; expected a subset of {cases.MODES}")
    args.donate_ops = set(args.donate_ops.split(","))
    args.candidates = None if args.candidates is None else args.candidates.split(",")
    if args.shapes is not None:
        args.shapes = parse_shapes(args.shapes, 2)
    else:
        args.shapes = list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    default_time = QUICK_FUSED_TIME_SHAPE if args.quick else FUSED_TIME_SHAPE
    args.fused_time_shape = (
        parse_shapes(args.fused_time_shape, 3)[0] if args.fused_time_shape else default_time
    )
    if args.fused_memory_shape == "none":
        args.fused_memory_shape = None
    elif args.fused_memory_shape:
        args.fused_memory_shape = parse_shapes(args.fused_memory_shape, 3)[0]
    else:
        args.fused_memory_shape = None if args.quick else FUSED_MEMORY_SHAPE
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    return args


def _timed_shapes(case: cases.Case, args: argparse.Namespace) -> list[tuple[int, ...]]:
    return list(args.shapes) if case.shape_rank == 2 else [args.fused_time_shape]


def _memory_only_shape(case: cases.Case, args: argparse.Namespace) -> tuple[int, ...] | None:
    return args.fused_memory_shape if case.shape_rank == 3 else None


def _modes_for(case: cases.Case, args: argparse.Namespace) -> list[str]:
    donate = case.op in args.donate_ops
    return [m for m in args.modes if m in case.modes and (m != "donated" or donate)]


def run(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    records: list[Record] = []
    min_sample_s = args.min_sample_ms / 1e3
    chosen = [cases.case(op) for op in args.ops]
    for case in chosen:
        losses = case.losses(args.candidates)
        for shape in _timed_shapes(case, args):
            print(f"... {case.op} {'x'.join(map(str, shape))}", flush=True)
            inputs = jax.block_until_ready(case.inputs(shape, jnp.float32))
            new: list[Record] = []
            for mode in _modes_for(case, args):
                new += measure_mode(case, shape, mode, losses, inputs, args.repeats, min_sample_s)
            add_accuracy(new, case, inputs, list(losses))
            records.extend(new)
            print(format_table(new).split("\n", 2)[-1], flush=True)
            del inputs
            jax.clear_caches()
            gc.collect()
        memory_shape = _memory_only_shape(case, args)
        if memory_shape is not None:
            print(f"... {case.op} {'x'.join(map(str, memory_shape))} (memory only)", flush=True)
            new = measure_memory_only(case, memory_shape, losses)
            records.extend(new)
            print(format_table(new).split("\n", 2)[-1], flush=True)
    return {
        "environment": env,
        "records": [dataclasses.asdict(r) for r in records],
        "targets": evaluate_targets(records, chosen),
    }


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
        print(f"{target['status']}: [{target['target']}] {target['detail']}")
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
