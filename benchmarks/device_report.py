"""The accelerator check's report: the compiled prediction beside each measurement, the
accelerator's details, the printed summary and the plot.

The prediction is what ``benchmarks/aot.py`` compiled for this kind of device without one
(``docs/bench/aot.json``): temp memory, and the bytes the compiled module accesses over the
measured time, so that the first run on a device checks the model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

import jax

from benchmarks.measure import Record, format_table, short_error

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def accelerator_details() -> dict[str, Any]:
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


def print_summary(result: dict[str, Any], records: Sequence[Record]) -> None:
    """The table of every record, the device targets, what was skipped, the prediction."""
    prediction = result["prediction"]
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
