"""Compiled, not run: every benchmark case compiled for CPU, H100 and TPU v5e without a device.

    make aot                                   # = python benchmarks/aot.py (in .venv-aot)
    python benchmarks/aot.py --quick           # small shapes, single devices, a minute or two
    python benchmarks/aot.py --targets h100,v5e --ops ce_int,fused --dtypes bfloat16

For each case of the registry (``benchmarks/cases.py``), each candidate (jxent and its
reference: optax, ``jax.nn``, or the plain gather for the NLL), each mode (``fwd``: the loss
only; ``fwd+bwd``: ``value_and_grad``; ``donated``: the same with the first input donated),
dtype and shape, and each target (the local CPU, one H100 SXM, one TPU v5e chip, 8 H100s and a
2x2 v5e slice with the inputs sharded over batch and vocabulary), it reads what XLA built:

* ``temp_bytes``: ``compiled.memory_analysis().temp_size_in_bytes``, per device;
* ``bytes_accessed`` (and ``flops``): XLA's cost analysis of the optimised module, per device;
  the TPU executable reports its own (with ``optimal_seconds``, its cost-model time); a GPU
  compile-only executable reports none, so XLA's ``HloCostAnalysis`` is run over its optimised
  HLO module through jaxlib's private ``hlo_module_cost_analysis`` (with the CPU client's
  shape sizes). Cost analysis counts a ``while`` (scan, fori_loop) body once, not once per
  trip: records with loops carry their trip counts in ``loops`` and are flagged;
* ``floor_bytes``: the fewest bytes the pass must move (the case's ``floor`` or ``traffic``:
  read the logits once and, with the gradient, write it once; see benchmarks/README.md),
  divided by the device count on a mesh, and ``bytes_accessed / floor_bytes``;
* ``kernels``: launches in the optimised HLO (fusions, custom calls such as GEMMs, unfused
  ops, collectives), counting a loop body once.

Nothing is run and nothing is timed. No autotuning happens without a device, so GEMM-heavy
numbers (the fused loss) are indicative. Writes ``aot.json``, ``aot.md`` and ``aot.png`` to
``--out`` (default docs/bench/).
"""

from __future__ import annotations

import os

# Before JAX starts: compile for accelerators on a CPU-only machine, without probing for a GPU
# or querying a TPU metadata server; libtpu's one-process lock would stop a second compiling
# process (a test run beside `make aot`), and no TPU is touched here.
for _key, _value in (
    ("JAX_PLATFORMS", "cpu"),
    ("TPU_SKIP_MDS_QUERY", "1"),
    ("TPU_WORKER_HOSTNAMES", "localhost"),
    ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
):
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

# Run from a checkout without installing: make the repository root importable.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks import cases  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    compiled_memory,
    copies_first_parameter,
    environment,
    jitted,
    parse_shapes,
    shape_label,
    short_error,
)

TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")
SHAPES = ((8192, 32000), (8192, 128256), (4096, 256000))
FUSED_SHAPES = ((8192, 4096, 128256), (8192, 8192, 256000))
QUICK_SHAPES = ((1024, 4096),)
QUICK_FUSED_SHAPES = ((1024, 512, 8192),)
DTYPES = ("float32", "bfloat16")
MODES = cases.MODES
AXES = ("batch", "vocab")
LOOP_NOTE = "loop body counted once (bytes, kernels)"
PLUGIN_PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "libtpu", "optax")


# --------------------------------------------------------------------------------------------
# Targets: what is compiled for
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    label: str
    platform: str  # cpu, cuda or tpu
    topology: str  # CUDA "1x1x8", TPU "v5e:2x2"; "" for the CPU
    mesh_shape: tuple[int, int]  # (batch, vocab) devices

    @property
    def devices(self) -> int:
        return math.prod(self.mesh_shape)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpu", "this machine's CPU", "cpu", "", (1, 1)),
        Target("h100", "H100 SXM", "cuda", "1x1x1", (1, 1)),
        Target("v5e", "TPU v5e", "tpu", "v5e:1x1", (1, 1)),
        Target("8xh100", "8x H100 SXM, batch 2 x vocab 4", "cuda", "1x1x8", (2, 4)),
        Target("v5e-2x2", "TPU v5e 2x2, batch 2 x vocab 2", "tpu", "v5e:2x2", (2, 2)),
    )
}
SINGLE_DEVICE_TARGETS = ("cpu", "h100", "v5e")


def gpu_target_config(name: str = "h100_sxm") -> str:
    with open(os.path.join(TARGETS_DIR, f"{name}.txtpb")) as f:
        return f.read()


_MESHES: dict[str, Mesh] = {}


def mesh_for(target: Target) -> Mesh:
    """A (batch, vocab) mesh of the target's devices; built once per process."""
    if target.name in _MESHES:
        return _MESHES[target.name]
    from jax.experimental import topologies

    if target.platform == "cpu":
        devices = np.array(jax.devices("cpu")[: target.devices]).reshape(target.mesh_shape)
        mesh = Mesh(devices, AXES)
    else:
        if target.platform == "cuda":
            topo = topologies.get_topology_desc(
                platform="cuda", topology=target.topology, target_config=gpu_target_config()
            )
        else:
            chips = target.mesh_shape  # v5e: one host holds up to 2x2 chips
            topo = topologies.get_topology_desc(
                platform="tpu",
                topology_name=target.topology,
                chip_config_name="default",
                chips_per_host_bounds=(*chips, 1),
                num_slices=1,
            )
        if len(topo.devices) != target.devices:
            raise RuntimeError(
                f"topology {target.topology!r} for target {target.name!r} has "
                f"{len(topo.devices)} devices; expected {target.devices}"
            )
        mesh = topologies.make_mesh(topo, target.mesh_shape, AXES)
    _MESHES[target.name] = mesh
    return mesh


def _spec(case: cases.Case, index: int, ndim: int) -> P:
    """Batch over rows, vocabulary over classes; the fused loss's w [D, V] over vocabulary."""
    if case.shape_rank == 3:
        return (P("batch", None), P(None, "vocab"), P("batch"))[index]
    return P("batch", "vocab") if ndim == 2 else P("batch") if ndim == 1 else P()


def abstract_inputs(
    case: cases.Case, shape: tuple[int, ...], dtype: str, mesh: Mesh
) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The case's inputs as shapes, each with a NamedSharding on ``mesh``.

    Every input must carry a sharding on the target's mesh: without one, ``lower`` silently
    compiles for the CPU.
    """
    shapes = jax.eval_shape(lambda: case.inputs(shape, jnp.dtype(dtype)))
    return tuple(
        jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=NamedSharding(mesh, _spec(case, i, len(a.shape)))
        )
        for i, a in enumerate(shapes)
    )


# --------------------------------------------------------------------------------------------
# Reading the optimised HLO
# --------------------------------------------------------------------------------------------

_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%\S+ = .*?\b([a-z][a-z0-9-]*)\(")
# Bookkeeping, not launches.
_NOT_KERNELS = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "conditional",
    "call",
    "after-all",
    "opt-barrier",
    "partition-id",
    "replica-id",
}


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def hlo_structure(text: str) -> dict[str, Any]:
    """Kernels (launches) and loops of an optimised HLO module.

    Walks the entry computation and what it runs as control flow (while bodies and
    conditions, calls, conditional branches), not the bodies of fusions or reducers. A loop
    body is counted once, as cost analysis does; ``loops`` lists each while's known trip
    count (None when XLA does not know it).
    """
    comps, entry = _computations(text)
    kernels, fusions, loops = 0, 0, []
    seen: set[str] = set()
    stack = [entry] if entry else []
    while stack:
        name = stack.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            op = match.group(1)
            if op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                loops.append(int(trips.group(1)) if trips else None)
                stack += re.findall(r"(?:body|condition)=%(\S+?)[,\s}]", line + " ")
            elif op in ("call", "conditional"):
                stack += re.findall(r"(?:to_apply|calls)=%(\S+?)[,\s}]", line + " ")
                stack += re.findall(r"%([\w.\-]+)", line.split("branch_computations=")[-1])
            if op in _NOT_KERNELS or op.endswith("-done"):
                continue
            kernels += 1
            fusions += op == "fusion"
    return {"kernels": kernels, "fusions": fusions, "loops": loops}


# --------------------------------------------------------------------------------------------
# Compiling one case
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AotRecord:
    target: str
    op: str
    shape: list[int]
    dtype: str
    mode: str
    candidate: str
    reference: str
    devices: int = 1
    temp_bytes: int | None = None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    bytes_accessed: float | None = None
    flops: float | None = None
    optimal_seconds: float | None = None
    cost_source: str = ""
    floor_bytes: int | None = None  # per device
    floor_ratio: float | None = None
    kernels: int | None = None
    fusions: int | None = None
    loops: list[int | None] = dataclasses.field(default_factory=list)
    copies_first_input: bool | None = None  # donated: the optimised HLO copies it first
    temp_ratio: float | None = None  # jxent / reference
    bytes_ratio: float | None = None
    compile_s: float | None = None
    note: str = ""


def _cpu_client() -> Any:
    return jax.devices("cpu")[0].client


def cost_of(compiled: Any) -> tuple[dict[str, float], str]:
    """(flops, bytes accessed, optimal_seconds where reported), and where they came from."""
    try:
        own = compiled.cost_analysis()
    except Exception:  # Unimplemented on some backends.
        own = None
    if isinstance(own, list):  # Older JAX: one dict per module.
        own = own[0] if own else None
    if own and "bytes accessed" in own:
        return dict(own), "executable"
    from jax._src.lib import _jax  # private: XLA's HloCostAnalysis over an HloModule

    module = compiled.runtime_executable().hlo_modules()[0]
    return dict(_jax.hlo_module_cost_analysis(_cpu_client(), module)), "hlo_module_cost_analysis"


# XLA refuses a module whose buffers exceed the target's memory (v5e: 16 GiB of HBM): a fact
# about the shape on that chip, reported as such and not as a failure of the harness.
DOES_NOT_FIT = "does not fit"


def _failure_kind(e: BaseException) -> str:
    message = str(e)
    if "RESOURCE_EXHAUSTED" in message and "exceeds available" in message:
        return DOES_NOT_FIT
    return "compile failed"


def compile_one(
    target: Target,
    case: cases.Case,
    shape: tuple[int, ...],
    dtype: str,
    mode: str,
    candidate: str,
    loss: cases.LossFn,
    dump_hlo: str | None = None,
) -> AotRecord:
    """One candidate compiled for ``target``; ``dump_hlo`` a folder for its optimised HLO."""
    rec = AotRecord(
        target.name, case.op, list(shape), dtype, mode, candidate, case.reference, target.devices
    )
    start = time.perf_counter()
    try:
        args = abstract_inputs(case, shape, dtype, mesh_for(target))
        compiled = jitted(loss, mode, case.argnums).lower(*args).compile()
    except Exception as e:  # Reported in the record; the other cases go on.
        rec.note = f"{_failure_kind(e)}: {short_error(e)}"
        return rec
    rec.compile_s = round(time.perf_counter() - start, 2)
    for key, value in compiled_memory(compiled).items():
        setattr(rec, key, value)
    try:
        cost, rec.cost_source = cost_of(compiled)
        rec.bytes_accessed = cost.get("bytes accessed")
        rec.flops = cost.get("flops")
        seconds = cost.get("optimal_seconds")
        # The TPU cost model says -1 where it has no estimate (seen with collectives).
        rec.optimal_seconds = seconds if seconds is None or seconds >= 0 else None
        if seconds is not None and seconds < 0:
            rec.note = (rec.note + " no cost-model time").strip()
    except Exception as e:
        rec.note = f"cost analysis failed: {short_error(e)}"
    text = compiled.as_text()
    if dump_hlo:
        write_hlo(dump_hlo, rec, text)
    structure = hlo_structure(text)
    rec.kernels, rec.fusions, rec.loops = (
        structure["kernels"],
        structure["fusions"],
        structure["loops"],
    )
    if rec.loops:
        rec.note = f"{rec.note} {LOOP_NOTE}".strip()
    if mode == "donated":
        rec.copies_first_input = copies_first_parameter(text)
    floor = case.floor_bytes(shape, jnp.dtype(dtype).itemsize, mode)
    if floor:
        rec.floor_bytes = floor // target.devices
        if rec.bytes_accessed is not None:
            rec.floor_ratio = rec.bytes_accessed / rec.floor_bytes
    return rec


def write_hlo(folder: str, rec: AotRecord, text: str) -> str:
    """Writes the optimised HLO to ``folder/<target>_<op>_<shape>_<dtype>_<mode>_<who>.hlo``."""
    os.makedirs(folder, exist_ok=True)
    shape = "x".join(map(str, rec.shape))
    mode = rec.mode.replace("+", "")
    name = f"{rec.target}_{rec.op}_{shape}_{rec.dtype}_{mode}_{rec.candidate}.hlo"
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def fill_ratios(records: Sequence[AotRecord]) -> None:
    """temp and bytes of each candidate against the reference compiled alongside it."""
    refs = {
        (r.target, r.op, tuple(r.shape), r.dtype, r.mode): r
        for r in records
        if r.candidate == r.reference
    }
    for r in records:
        ref = refs.get((r.target, r.op, tuple(r.shape), r.dtype, r.mode))
        if ref is None:
            continue
        if r.temp_bytes is not None and ref.temp_bytes is not None:
            r.temp_ratio = (
                r.temp_bytes / ref.temp_bytes
                if ref.temp_bytes
                else (1.0 if r.temp_bytes == 0 else math.inf)
            )
        if r.bytes_accessed is not None and ref.bytes_accessed:
            r.bytes_ratio = r.bytes_accessed / ref.bytes_accessed


@dataclasses.dataclass
class Plan:
    targets: list[str]
    ops: list[str]
    dtypes: list[str]
    modes: list[str]
    shapes: list[tuple[int, ...]]
    fused_shapes: list[tuple[int, ...]]
    candidates: list[str] | None = None
    multi_device_shapes: int = 1  # the first n shapes only on multi-device targets
    dump_hlo: str | None = None  # a folder for every compiled module's optimised HLO


def units(plan: Plan) -> list[tuple[Target, cases.Case, tuple[int, ...], str, str]]:
    out = []
    for name in plan.targets:
        target = TARGETS[name]
        for op in plan.ops:
            case = cases.case(op)
            shapes = plan.fused_shapes if case.shape_rank == 3 else plan.shapes
            if target.devices > 1:
                shapes = shapes[: plan.multi_device_shapes]
            for shape in shapes:
                for dtype in plan.dtypes:
                    for mode in plan.modes:
                        out.append((target, case, tuple(shape), dtype, mode))
    return out


def compile_plan(plan: Plan, log: Any = print) -> list[AotRecord]:
    records: list[AotRecord] = []
    todo = units(plan)
    start = time.perf_counter()
    for i, (target, case, shape, dtype, mode) in enumerate(todo):
        for candidate, loss in case.losses(plan.candidates).items():
            rec = compile_one(target, case, shape, dtype, mode, candidate, loss, plan.dump_hlo)
            records.append(rec)
        fill_ratios(records[-len(case.losses(plan.candidates)) :])
        if log is not None:
            log(
                f"[{time.perf_counter() - start:6.0f} s {i + 1}/{len(todo)}] "
                + format_records(records[-len(case.losses(plan.candidates)) :], header=False)
            )
        # One process compiles everything: drop the executables and JAX's caches as we go.
        jax.clear_caches()
        gc.collect()
    return records


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


def _num(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (
    "target",
    "op",
    "shape",
    "dtype",
    "mode",
    "candidate",
    "temp MiB",
    "x ref",
    "bytes GB",
    "x floor",
    "x ref",
    "kernels",
    "model ms",
    "note",
)


def _row(r: AotRecord) -> list[str]:
    note = r.note.replace(LOOP_NOTE, f"loops {r.loops}, body counted once") if r.loops else r.note
    if r.copies_first_input:
        note = f"{note}; copies the donated input".strip("; ")
    return [
        r.target,
        r.op,
        shape_label(r.shape),
        r.dtype,
        r.mode,
        r.candidate,
        _mib(r.temp_bytes),
        _num(r.temp_ratio),
        _num(None if r.bytes_accessed is None else r.bytes_accessed / 1e9, ".3f"),
        _num(r.floor_ratio),
        _num(r.bytes_ratio),
        _num(r.kernels, "d"),
        _num(None if r.optimal_seconds is None else 1e3 * r.optimal_seconds, ".3f"),
        note,
    ]


def format_records(records: Sequence[AotRecord], header: bool = True) -> str:
    rows = [_row(r) for r in records]
    lines = [" | ".join(COLUMNS)] if header else []
    lines += [" ".join(row) for row in rows]
    return "\n".join(lines)


def markdown_table(records: Sequence[AotRecord]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in records]
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return _num(None if seconds is None else 1e3 * seconds, ".3f")


def _failure(mine: AotRecord, ref: AotRecord) -> str:
    """Why a side has no numbers: XLA's reason, e.g. the temporaries exceed the HBM."""
    notes = []
    for who, r in (("jxent", mine), (ref.candidate, ref)):
        if r.note.startswith(("compile failed", DOES_NOT_FIT)):
            reason = r.note.split(": ", 2)[-1]
            notes.append(f"{who}: {reason[:140]}")
    return "; ".join(notes)


def _pair(mine: Any, ref: Any, fmt: Any) -> str:
    return f"{fmt(mine)} / {fmt(ref)}"


def summary_table(records: Sequence[AotRecord], mode: str = "fwd+bwd") -> str:
    """One line per (target, op, shape, dtype): jxent / reference side by side."""
    refs = {_key(r)[:5]: r for r in records if r.candidate == r.reference}
    lines = [
        "| target | op | shape | dtype | temp MiB | bytes / floor | kernels | TPU ms | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ref = refs.get(_key(r)[:5])
        if r.mode != mode or r.candidate != "jxent" or ref is None:
            continue
        loops = " (loop once)" if r.loops else ""
        lines.append(
            f"| {r.target} | {r.op} | {shape_label(r.shape)} | {r.dtype} | "
            f"{_pair(r.temp_bytes, ref.temp_bytes, _mib)} | "
            f"{_pair(r.floor_ratio, ref.floor_ratio, _num)}{loops} | "
            f"{_pair(r.kernels, ref.kernels, lambda v: _num(v, 'd'))} | "
            f"{_pair(r.optimal_seconds, ref.optimal_seconds, _ms)} | {_failure(r, ref)} |"
        )
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in PLUGIN_PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def write_markdown(result: dict[str, Any], records: Sequence[AotRecord], path: str) -> None:
    env = result["environment"]
    pkg = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    commands = "`; `".join(result.get("commands", [result["command"]]))
    text = f"""# Compiled, not run: jxent against its references on CPU, H100 and TPU v5e

Generated by `benchmarks/aot.py` ({env["date"]}; `{commands}`) on {env["cpu_model"]}
({env["cpu_count"]} CPUs), with {pkg}. **Compiled, not run**: every number below is what XLA
built for the target, read from the compiled executable; nothing ran on an accelerator.

- temp MiB: `memory_analysis().temp_size_in_bytes` per device; x ref: against the reference
  compiled for the same call (optax, `jax.nn`, or the plain gather for `nll`).
- bytes GB: cost analysis `bytes accessed` of the optimised module per device (H100: XLA's
  `HloCostAnalysis` over the optimised HLO; TPU: the executable's own); x floor: against the
  case's floor per device (read the logits, or the op's inputs, once and, with the gradient,
  write it once; the fused loss: read x, w once and write dx, dw once).
- kernels: launches in the optimised HLO (fusions, custom calls, unfused ops, collectives).
- model ms: the TPU cost model's `optimal_seconds`.
- A `while` loop (scan, fori_loop) body is counted **once** by cost analysis and in kernels;
  such rows list the loops' trip counts. No autotuning happens without a device: GEMM tiles
  are defaults, so the fused loss's numbers are indicative.

## `value_and_grad`: jxent / reference

{summary_table(records)}

## Every record

{markdown_table(records)}
"""
    with open(path, "w") as f:
        f.write(text)


def write_plot(records: Sequence[AotRecord], path: str, date: str) -> None:
    """Per target: temp and bytes/floor of jxent and the reference, fwd+bwd, at each op's
    first shape (the table has them all; every shape in one panel is unreadable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in records if r.mode == "fwd+bwd"]
    first_shape: dict[str, tuple[int, ...]] = {}
    for r in chosen:
        first_shape.setdefault(r.op, tuple(r.shape))
    chosen = [r for r in chosen if tuple(r.shape) == first_shape[r.op]]
    targets = list(dict.fromkeys(r.target for r in chosen)) or ["none"]
    fig, axes = plt.subplots(
        2, len(targets), figsize=(5.5 * len(targets), 8), squeeze=False, sharey="row"
    )
    panels = (("temp_bytes", "temp MiB (log)", 2**20), ("floor_ratio", "bytes accessed / floor", 1))
    for col, target in enumerate(targets):
        mine = [r for r in chosen if r.target == target]
        groups = list(dict.fromkeys((r.op, tuple(r.shape), r.dtype) for r in mine))
        for row, (metric, ylabel, scale) in enumerate(panels):
            ax = axes[row][col]
            for role, offset, color in (("jxent", -0.2, "C0"), ("reference", 0.2, "C1")):
                xs, ys = [], []
                for g, key in enumerate(groups):
                    for r in mine:
                        is_role = (
                            r.candidate == "jxent"
                            if role == "jxent"
                            else (r.candidate == r.reference)
                        )
                        value = getattr(r, metric)
                        if (r.op, tuple(r.shape), r.dtype) == key and is_role and value is not None:
                            xs.append(g + offset)
                            ys.append(max(value / scale, 1e-3))
                if xs:
                    ax.bar(xs, ys, width=0.4, color=color, label=role)
            ax.set_xticks(range(len(groups)))
            labels = [f"{op} {shape_label(s)} {d}" for op, s, d in groups]
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
            if row == 0:
                ax.set_yscale("log")
                ax.set_title(f"{target}: {TARGETS[target].label}" if target in TARGETS else "")
            else:
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_ylabel(ylabel)
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(
        f"jxent fwd+bwd, compiled, not run ({date}); lower is better; "
        "cost analysis counts a loop body once"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma list from {list(TARGETS)}")
    cases.add_ops_argument(p, "aot")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--modes", default=",".join(MODES), help="fwd+bwd, fwd, donated")
    p.add_argument("--shapes", default=None, help="NxC list (default 8192x32000 .. 4096x256000)")
    p.add_argument("--fused-shapes", default=None, help="NxDxV list for the fused loss")
    p.add_argument(
        "--candidates",
        default="jxent",
        help="comma list (the reference is always kept); e.g. jxent,naive",
    )
    p.add_argument(
        "--multi-device-shapes",
        type=int,
        default=1,
        help="how many of the shapes (the first) to compile on the multi-device targets",
    )
    p.add_argument("--quick", action="store_true", help="small shapes, single-device targets")
    p.add_argument("--out", default=os.path.join(_REPO_ROOT, "docs", "bench"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--dump-hlo",
        default=None,
        metavar="DIR",
        help="write each compiled module's optimised HLO to DIR (to read what a kernel became)",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite aot.md and aot.png from the aot.json in --out; compile nothing",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the records of an existing aot.json in --out that this run does not redo",
    )
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    if args.quick and "--targets" not in " ".join(argv or sys.argv):
        args.targets = list(SINGLE_DEVICE_TARGETS)
    bad = set(args.targets) - set(TARGETS)
    if bad:
        p.error(f"unknown targets {sorted(bad)} in --targets; expected a subset of {list(TARGETS)}")
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    bad = set(args.dtypes) - set(DTYPES)
    if bad:
        p.error(f"unknown dtypes {sorted(bad)} in --dtypes; expected a subset of {DTYPES}")
    args.modes = [m for m in args.modes.split(",") if m]
    bad = set(args.modes) - set(MODES)
    if bad:
        p.error(f"unknown modes {sorted(bad)} in --modes; expected a subset of {MODES}")
    args.shapes = (
        parse_shapes(args.shapes, 2)
        if args.shapes
        else list(QUICK_SHAPES if args.quick else SHAPES)
    )
    args.fused_shapes = (
        parse_shapes(args.fused_shapes, 3)
        if args.fused_shapes
        else list(QUICK_FUSED_SHAPES if args.quick else FUSED_SHAPES)
    )
    args.candidates = args.candidates.split(",")
    return args


def _key(r: AotRecord) -> tuple[Any, ...]:
    return (r.target, r.op, tuple(r.shape), r.dtype, r.mode, r.candidate)


def merged(
    path: str, records: Sequence[AotRecord], command: str, shapes: Sequence[tuple[int, ...]]
) -> tuple[list[AotRecord], list[str]]:
    """The records of an earlier aot.json that ``records`` do not redo, and ``records``, in
    a full run's order (:func:`_order`; ``shapes``: this run's, in the order listed).

    Partial runs (filters) accumulate into one table; each record keeps its own versions only
    through the commands list, so merge runs of one environment only.
    """
    with open(path) as f:
        old = json.load(f)
    new_keys = {_key(r) for r in records}
    kept = [AotRecord(**r) for r in old["records"]]
    kept = [r for r in kept if _key(r) not in new_keys]
    commands = old.get("commands", [old.get("command", "")])
    listed = [*shapes, *QUICK_SHAPES, *SHAPES, *QUICK_FUSED_SHAPES, *FUSED_SHAPES]
    order = functools.partial(_order, shapes=[tuple(s) for s in listed])
    return sorted([*kept, *records], key=order), [*commands, command]


def _order(r: AotRecord, shapes: list[tuple[int, ...]]) -> tuple[Any, ...]:
    """A full run's order: targets, ops, ``shapes``, dtypes and modes as listed."""
    shape = tuple(r.shape)
    return (
        _index(list(TARGETS), r.target),
        _index(list(cases.OPS), r.op),
        _index(shapes, shape),
        math.prod(r.shape),
        shape,
        _index(list(DTYPES), r.dtype),
        _index(list(MODES), r.mode),
        r.candidate != "jxent",
    )


def _index(listed: list[Any], value: Any) -> int:
    """``value``'s place in ``listed``; after all of them when it is not listed."""
    return listed.index(value) if value in listed else len(listed)


def render(json_path: str, no_plot: bool) -> int:
    with open(json_path) as f:
        result = json.load(f)
    records = [AotRecord(**r) for r in result["records"]]
    out = os.path.dirname(json_path)
    write_markdown(result, records, os.path.join(out, "aot.md"))
    if not no_plot:
        write_plot(records, os.path.join(out, "aot.png"), result["date"])
    print(f"wrote {out}/aot.md and aot.png from {json_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if jax.config.jax_platforms != "cpu":
        print(
            f"JAX_PLATFORMS is {jax.config.jax_platforms!r}; aot.py compiles for accelerators "
            "from the CPU and needs JAX_PLATFORMS=cpu set before JAX starts",
            file=sys.stderr,
        )
        return 2
    os.makedirs(args.out, exist_ok=True)
    if args.render_only:
        return render(os.path.join(args.out, "aot.json"), args.no_plot)
    env = environment([sys.argv[0], *argv])
    pkgs = versions()
    print(f"compiled, not run; {pkgs}; on {env['cpu_model']}", flush=True)
    plan = Plan(
        targets=args.targets,
        ops=args.ops,
        dtypes=args.dtypes,
        modes=args.modes,
        shapes=args.shapes,
        fused_shapes=args.fused_shapes,
        candidates=args.candidates,
        multi_device_shapes=args.multi_device_shapes,
        dump_hlo=args.dump_hlo,
    )
    start = time.perf_counter()
    records = compile_plan(plan)
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    result = {
        "label": "compiled, not run",
        "date": date,
        "command": "python benchmarks/aot.py " + " ".join(argv),
        "seconds": round(time.perf_counter() - start, 1),
        "environment": env,
        "versions": pkgs,
        "targets": {name: dataclasses.asdict(TARGETS[name]) for name in args.targets},
        "gpu_target_config": "benchmarks/targets/h100_sxm.txtpb",
        "records": [dataclasses.asdict(r) for r in records],
    }
    json_path = os.path.join(args.out, "aot.json")
    if args.merge and os.path.exists(json_path):
        shapes = [*args.shapes, *args.fused_shapes]
        records, result["commands"] = merged(json_path, records, result["command"], shapes)
        result["records"] = [dataclasses.asdict(r) for r in records]
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    write_markdown(result, records, os.path.join(args.out, "aot.md"))
    if not args.no_plot:
        write_plot(records, os.path.join(args.out, "aot.png"), date)
    failed = [r for r in records if r.note.startswith("compile failed")]
    too_big = sum(r.note.startswith(DOES_NOT_FIT) for r in records)
    print(
        f"wrote {json_path}, aot.md, aot.png in {result['seconds']} s; {len(failed)} failed, "
        f"{too_big} do not fit the target's memory"
    )
    for r in failed:
        print(f"FAILED: {r.target} {r.op} {shape_label(r.shape)} {r.dtype} {r.mode} {r.candidate}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
