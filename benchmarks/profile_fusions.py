"""Where the time goes: per-fusion CPU time of one benchmark case, from a JAX profiler trace.

    python benchmarks/profile_fusions.py ce_int 2048x131072
    python benchmarks/profile_fusions.py ce_dense 4096x1000 --mode fwd --calls 20

Uses the same candidates and inputs as ``benchmarks/run.py`` (the registry in ``cases.py``),
records ``--calls`` calls of each candidate's compiled ``fwd+bwd`` (or ``fwd``) with
``jax.profiler.trace`` and prints, per candidate, the mean milliseconds per call spent in
each XLA fusion (the thunk names of XLA:CPU, e.g. ``ynn_fusion.1`` or
``subtract_exponential_fusion``). Pair it with the compiled HLO
(``jax.jit(f).lower(...).compile().as_text()``) to see what each fusion computes. A fusion
that writes a fresh large output pays its page faults (about 0.35 s per GB on the 2-core dev
VM); compare with ``--mode donated`` runs of ``run.py`` to tell them apart.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import cases
from benchmarks.measure import jitted


def fusion_times(trace_dir: str, calls: int) -> dict[str, float]:
    """Mean milliseconds per call of each XLA fusion / op event in a perfetto trace."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        name = event.get("name", "")
        is_xla_op = "fusion" in name or name.startswith(("wrapped_", "copy", "reduce"))
        if event.get("ph") == "X" and is_xla_op and not name.startswith("end:"):
            totals[name] += event.get("dur", 0) / 1e3 / calls
    return dict(totals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("op", choices=[c.op for c in cases.CASES if c.shape_rank == 2])
    parser.add_argument("shape", help="NxC, e.g. 4096x1000")
    parser.add_argument("--mode", choices=("fwd+bwd", "fwd"), default="fwd+bwd")
    parser.add_argument("--calls", type=int, default=5, help="calls recorded per candidate")
    parser.add_argument("--top", type=int, default=8, help="fusions listed per candidate")
    args = parser.parse_args(argv)

    shape = tuple(int(n) for n in args.shape.lower().split("x"))
    case = cases.case(args.op)
    if args.mode not in case.modes:
        parser.error(f"--mode {args.mode} is not measured for {args.op}; it has {case.modes}")
    inputs = case.inputs(shape, jnp.float32)
    for name, loss in case.losses().items():
        fn = jitted(loss, args.mode, case.argnums)
        jax.block_until_ready(fn(*inputs))  # compile and warm up outside the trace
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(args.calls):
                    jax.block_until_ready(fn(*inputs))
            times = fusion_times(trace_dir, args.calls)
        print(f"{name}: {sum(times.values()):.2f} ms per call in XLA ops")
        for op_name, ms in sorted(times.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"    {ms:10.3f} ms  {op_name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
