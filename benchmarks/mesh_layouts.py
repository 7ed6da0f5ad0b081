"""The fused loss on a mesh, for the ways a trainer shards it: compiled per device (not run).

    python benchmarks/mesh_layouts.py                 # in .venv-aot (make mesh-layouts)
    python benchmarks/mesh_layouts.py --targets v5e-2x2 --dtypes bfloat16

``make aot`` compiles the mesh targets with one sharding: rows over ``batch``, ``w``'s
vocabulary over ``vocab``. A trainer may shard otherwise; this script compiles
``value_and_grad`` of ``fused_linear_cross_entropy`` for the three common layouts of the
same mesh:

* ``data``: the rows over every device, ``w`` replicated (data parallelism);
* ``2d``: the rows over ``batch``, ``w``'s vocabulary over ``vocab`` (``make aot``'s);
* ``vocab``: the rows replicated, ``w``'s vocabulary over every device (tensor parallelism);

each with ``w`` as ``[D, V]`` (``w_layout="dv"``) and as ``[V, D]`` (``"vd"``), on the mesh
with ``Auto`` axes (GSPMD propagates the shardings) and with ``Explicit`` axes, beside optax
on the materialised logits ``x @ w`` (``Auto``). It reports the temp memory per device and
the largest all-gather in the optimised HLO. Compiled, not run. Writes ``mesh_layouts.md``
and ``mesh_layouts.json`` to ``--out`` (default docs/bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

# Run from a checkout without installing: make the repository root importable.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

# benchmarks.aot sets the environment for compiling without a device before JAX starts.
from benchmarks import aot  # noqa: E402, I001
from benchmarks.measure import write_report  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jxent  # noqa: E402

MESH_TARGETS = ("8xh100", "v5e-2x2")
LAYOUTS = ("data", "2d", "vocab")
EVERY = aot.AXES  # both mesh axes: the rows (or classes) over every device
CANDIDATES = ("auto-dv", "auto-vd", "explicit-dv", "explicit-vd", "optax")
MIB = 2**20
_ALL_GATHER = re.compile(r"= (\w+)\[([\d,]*)\]\{[^}]*\} all-gather(?:-start)?\(")
_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "pred": 1}


def specs(layout: str) -> tuple[P, P, P]:
    """``x``'s, ``w``'s (as ``[D, V]``) and the labels' partition specs."""
    return {
        "data": (P(EVERY, None), P(None, None), P(EVERY)),
        "2d": (P("batch", None), P(None, "vocab"), P("batch")),
        "vocab": (P(None, None), P(None, EVERY), P(None)),
    }[layout]


def mesh_with_axes(target: aot.Target, axes: str) -> Mesh:
    """The target's (batch, vocab) mesh with ``Auto`` or ``Explicit`` axes."""
    auto = aot.mesh_for(target)
    if axes == "auto":
        return auto
    return Mesh(auto.devices, auto.axis_names, axis_types=(AxisType.Explicit,) * len(EVERY))


def abstract_inputs(
    mesh: Mesh, layout: str, shape: tuple[int, int, int], dtype: str, w_layout: str
):
    """``x``, ``w`` (as ``[D, V]`` or ``[V, D]``) and the labels, sharded by ``layout``."""
    n, d, v = shape
    x_spec, w_spec, y_spec = specs(layout)
    w_shape = (d, v)
    if w_layout == "vd":
        w_spec, w_shape = P(*reversed(tuple(w_spec))), (v, d)

    def spec(shape: tuple[int, ...], dt: str, p: P) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, p))

    return spec((n, d), dtype, x_spec), spec(w_shape, dtype, w_spec), spec((n,), "int32", y_spec)


def loss_of(candidate: str):
    """``(x, w, labels) -> loss`` of a candidate: jxent with its ``w`` layout, or optax."""
    if candidate == "optax":
        return lambda x, w, y: optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()
    w_layout = candidate.split("-")[1]
    return lambda x, w, y: jxent.fused_linear_cross_entropy(x, w, y, w_layout=w_layout)


def largest_all_gather(hlo_text: str) -> int:
    """Bytes of the largest all-gather result in an optimised HLO module (0 without one)."""
    sizes = [
        _BYTES.get(dt, 4) * int(np.prod([int(s) for s in dims.split(",") if s]))
        for dt, dims in _ALL_GATHER.findall(hlo_text)
    ]
    return max(sizes, default=0)


def measure(
    target: aot.Target, layout: str, shape: tuple[int, int, int], dtype: str, candidate: str
) -> dict[str, Any]:
    axes = "auto" if candidate == "optax" else candidate.split("-")[0]
    w_layout = "dv" if candidate == "optax" else candidate.split("-")[1]
    mesh = mesh_with_axes(target, axes)
    args = abstract_inputs(mesh, layout, shape, dtype, w_layout)
    step = jax.jit(jax.value_and_grad(loss_of(candidate), argnums=(0, 1)))
    rec: dict[str, Any] = {
        "target": target.name,
        "layout": layout,
        "shape": list(shape),
        "dtype": dtype,
        "candidate": candidate,
    }
    try:
        with jax.set_mesh(mesh):
            compiled = step.lower(*args).compile()
    except Exception as e:  # Reported in the record; the other layouts go on.
        rec["note"] = aot.short_error(e)
        return rec
    rec["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    rec["all_gather_bytes"] = largest_all_gather(compiled.as_text())
    return rec


def _cell(rec: dict[str, Any] | None) -> str:
    if rec is None or "temp_bytes" not in rec:
        return "failed" if rec else "-"
    cell = f"{rec['temp_bytes'] / MIB:,.1f}"
    if rec["all_gather_bytes"] >= MIB:
        cell += f" (gathers {rec['all_gather_bytes'] / MIB:,.0f})"
    return cell


def markdown(records: Sequence[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    by_key = {(r["target"], r["dtype"], r["layout"], r["candidate"]): r for r in records}
    rows = dict.fromkeys((r["target"], r["dtype"], r["layout"]) for r in records)
    n, d, v = records[0]["shape"] if records else (0, 0, 0)
    lines = [
        "# The fused loss on meshes, by layout: temp MiB per device, compiled (not run)",
        "",
        f"Generated by `{command}` ({env['date']}) on {env['cpu_model']} with jax "
        f"{jax.__version__}; see `benchmarks/mesh_layouts.py`. `value_and_grad` at N={n} "
        f"D={d} V={v}. Layouts: `data` = rows over every device, `w` replicated; `2d` = rows "
        "over `batch`, vocabulary over `vocab`; `vocab` = rows replicated, vocabulary over "
        'every device. `dv` / `vd`: `w` as `[D, V]` / `[V, D]` (`w_layout`). "gathers": the '
        "largest all-gather, MiB.",
        "",
        "| target | dtype | layout | Auto, dv | Auto, vd | Explicit, dv | Explicit, vd "
        "| optax on x @ w |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target, dtype, layout in rows:
        cells = [_cell(by_key.get((target, dtype, layout, c))) for c in CANDIDATES]
        lines.append(f"| {target} | {dtype} | {layout} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default=",".join(MESH_TARGETS))
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--shape", default="8192x4096x128256", help="N x D x V")
    p.add_argument("--out", default=os.path.join(_REPO_ROOT, "docs", "bench"))
    args = p.parse_args(argv)
    args.targets = args.targets.split(",")
    bad = [t for t in args.targets if t not in MESH_TARGETS]
    if bad:
        p.error(f"--targets {bad}: expected mesh targets {MESH_TARGETS}")
    args.layouts = args.layouts.split(",")
    bad = [x for x in args.layouts if x not in LAYOUTS]
    if bad:
        p.error(f"--layouts {bad}: expected some of {LAYOUTS}")
    args.dtypes = args.dtypes.split(",")
    try:
        (args.shape,) = aot.parse_shapes(args.shape, 3)
    except argparse.ArgumentTypeError as e:
        p.error(f"--shape: {e}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    records = []
    for target in args.targets:
        for dtype in args.dtypes:
            for layout in args.layouts:
                for candidate in CANDIDATES:
                    rec = measure(aot.TARGETS[target], layout, args.shape, dtype, candidate)
                    print(json.dumps(rec), flush=True)
                    records.append(rec)
    given = list(sys.argv[1:] if argv is None else argv)
    write_report(args.out, "mesh_layouts", given, records, markdown)
    return 0 if all("temp_bytes" in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
