"""Smoke tests: the benchmark harnesses run end to end on tiny shapes, so they cannot rot."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

_BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(script: str):
    """Imports a benchmark script as its command line would (it puts the repo on sys.path)."""
    name = f"jxent_benchmarks_{pathlib.Path(script).stem}"
    spec = importlib.util.spec_from_file_location(name, _BENCHMARKS / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name.
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("run.py")


@pytest.fixture(scope="module")
def device_check():
    return _load("device_check.py")


def test_quick_run_writes_results(bench, tmp_path):
    argv = [
        "--quick",
        "--ops=logsumexp,ce_int,fused",  # one of each kind of case keeps this to seconds.
        "--shapes=8x16",
        "--fused-time-shape=16x8x32",
        "--fused-memory-shape=32x8x64",
        "--repeats=2",
        "--min-sample-ms=0",
        f"--out={tmp_path}",
    ]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.png").stat().st_size > 0
    env = result["environment"]
    for key in ("jax", "jaxlib", "devices", "cpu_model", "date", "command"):
        assert env[key]
    records = result["records"]
    ops = {r["op"] for r in records}
    assert ops == {"logsumexp", "ce_int", "fused"}
    timed = [r for r in records if r["mode"] == "fwd+bwd" and not r["note"]]
    assert timed and all(r["median_ms"] > 0 and r["temp_bytes"] is not None for r in timed)
    references = [r for r in timed if r["candidate"] == r["reference"]]
    assert references and all(r["time_ratio"] == pytest.approx(1.0) for r in references)
    donated = [r for r in records if r["mode"] == "donated" and r["candidate"] == "optax"]
    assert donated and all(isinstance(r["in_place"], bool) for r in donated)
    assert any(r["mode"] == "fwd+bwd (memory only)" for r in records)
    targets = result["targets"]
    assert {t["target"] for t in targets} >= {"parity", "float64-accuracy", "fused-memory"}
    for target in targets:
        assert target["status"] in ("PASS", "FAIL", "SKIP")
        assert target["detail"].split()[0] in ops


def test_float64_accuracy_check_is_sensitive(bench):
    import jax
    import optax

    from benchmarks.cases import case
    from benchmarks.measure import relative_error

    logits = 3.0 * jax.random.normal(jax.random.key(0), (4, 32))
    lse = lambda x: jax.nn.logsumexp(x, axis=-1)
    assert relative_error(case("logsumexp"), lse, (logits,)) < 1e-6
    wrong = lambda x: lse(x) * (1 + 1e-4)
    assert relative_error(case("logsumexp"), wrong, (logits,)) > 1e-5
    for op in ("softmax", "log_softmax"):
        fn = getattr(jax.nn, op)
        assert relative_error(case(op), lambda x, fn=fn: fn(x, axis=-1), (logits,)) < 1e-6
    labels = jax.numpy.arange(4) * 7
    ce = optax.softmax_cross_entropy_with_integer_labels
    assert relative_error(case("ce_int"), ce, (logits, labels)) < 1e-6
    assert relative_error(case("ce_int"), lambda x, y: ce(x, (y + 1) % 32), (logits, labels)) > 0.1


def test_fusion_profiler_lists_each_candidates_fusions(capsys):
    module = _load("profile_fusions.py")
    assert module.main(["ce_int", "8x16", "--calls=1"]) == 0
    out = capsys.readouterr().out
    for candidate in ("jxent", "optax", "naive"):
        assert f"{candidate}: " in out
    assert "fusion" in out


def test_device_check_smoke_writes_results(device_check, tmp_path):
    argv = ["--smoke", "--ops=ce_int,fused", f"--out={tmp_path}"]
    assert device_check.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.png").stat().st_size > 0
    env = result["environment"]
    assert env["jax"] and env["device_kind"] and env["accelerator"]["platform"]
    tests = result["tests"]
    assert tests["ok"] and tests["passed"] >= 1 and tests["failed"] == tests["errors"] == 0
    assert (tmp_path / tests["log"]).exists()
    itemsizes = {"float32": 4, "bfloat16": 2}
    copies = {c["dtype"]: c for c in result["copy"]}
    assert set(copies) == set(itemsizes)
    for dtype, copy in copies.items():  # smoke shape 8x32: read and write once
        assert copy["bytes_moved"] == 2 * 8 * 32 * itemsizes[dtype] and copy["bytes_per_s"] > 0
    records = result["records"]
    ce = [r for r in records if r["op"] == "ce_int"]
    assert {(r["dtype"], r["mode"], r["candidate"]) for r in ce} == {
        (d, m, c)
        for d in ("float32", "bfloat16")
        for m in ("fwd+bwd", "fwd")
        for c in ("jxent", "optax")
    }
    for r in ce:
        passes = 2 if r["mode"] == "fwd+bwd" else 1
        assert r["traffic_bytes"] == passes * 8 * 32 * itemsizes[r["dtype"]]
        copy = copies[r["dtype"]]["bytes_per_s"]
        assert r["bandwidth_fraction"] == pytest.approx(r["bytes_per_s"] / copy)
    (fused,) = [r for r in records if r["op"] == "fused" and r["candidate"] == "jxent"]
    assert fused["dtype"] == "bfloat16" and fused["temp_ratio"] is not None
    names = {t["target"] for t in result["targets"]}
    assert names == {"copy-bandwidth", "parity", "fused-memory", "fused-time"}
    assert result["skipped"] == []


def test_device_check_skips_what_does_not_fit_and_what_the_budget_leaves(
    device_check, tmp_path, monkeypatch
):
    def out_of_memory(shape, dtype, repeats):
        raise RuntimeError(f"RESOURCE_EXHAUSTED: Out of memory allocating {shape} {dtype}")

    monkeypatch.setattr(device_check, "copy_bandwidth", out_of_memory)
    argv = ["--smoke", "--skip-tests", "--ops=ce_int", "--dtypes=float32", f"--out={tmp_path}"]
    assert device_check.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    (skip,) = result["skipped"]
    assert skip["op"] == "ce_int" and "RESOURCE_EXHAUSTED" in skip["reason"]
    assert result["records"] == [] and result["tests"] is None

    argv = ["--smoke", "--skip-tests", "--budget-s=0", "--ops=ce_int,fused", f"--out={tmp_path}"]
    assert device_check.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["records"] == [] and len(result["skipped"]) == 3
    assert all("time budget" in s["reason"] for s in result["skipped"])
    assert (tmp_path / "results.png").exists()


def test_device_check_reads_serial_and_xdist_test_outcomes(device_check):
    log = """
tests/test_a.py::test_x[1] PASSED                                    [ 50%]
tests/test_a.py::TestB::test_y FAILED                                [100%]
[gw1] [ 33%] PASSED tests/test_c.py::test_z
[gw0] [ 66%] ERROR tests/test_c.py::test_w[bfloat16]
[gw0] [100%] SKIPPED tests/test_c.py::test_v
"""
    assert device_check._test_outcomes(log) == {
        "tests/test_a.py::test_x[1]": "PASSED",
        "tests/test_a.py::TestB::test_y": "FAILED",
        "tests/test_c.py::test_z": "PASSED",
        "tests/test_c.py::test_w[bfloat16]": "ERROR",
        "tests/test_c.py::test_v": "SKIPPED",
    }
    # A timeout is reported, not failed; a failing test or a broken run is.
    ran = {"ok": False, "timed_out": True, "failed": 0, "errors": 0}
    assert not device_check._tests_failed(ran)
    assert device_check._tests_failed({**ran, "failed": 1})
    assert device_check._tests_failed({**ran, "timed_out": False})
    assert not device_check._tests_failed({**ran, "ok": True, "timed_out": False})


def test_device_check_prints_the_compiled_prediction_beside_a_measurement(device_check, tmp_path):
    from benchmarks.measure import Record

    aot_json = tmp_path / "aot.json"
    compiled = {"op": "ce_int", "shape": [8192, 32000], "dtype": "bfloat16", "mode": "fwd+bwd"}
    aot_json.write_text(
        json.dumps(
            {
                "label": "compiled, not run",
                "records": [
                    {
                        **compiled,
                        "target": "h100",
                        "candidate": "jxent",
                        "temp_bytes": 3 * 2**20,
                        "bytes_accessed": 2.0e9,
                    },
                    {
                        **compiled,
                        "target": "v5e",
                        "candidate": "jxent",
                        "temp_bytes": 0,
                        "bytes_accessed": 1.0e9,
                    },
                ],
            }
        )
    )
    # A fake measurement on an H200: 2 GB in 1 ms is 2,000 GB/s.
    measured = Record(
        "ce_int",
        [8192, 32000],
        "fwd+bwd",
        "jxent",
        "optax",
        dtype="bfloat16",
        median_ms=1.0,
        temp_bytes=2**20,
    )
    other = Record(
        "ce_int", [4096, 256000], "fwd+bwd", "jxent", "optax", dtype="bfloat16", median_ms=1.0
    )
    env = {"platform": "gpu", "device_kind": "NVIDIA H200"}
    summary = device_check.predict([measured, other], env, str(aot_json))
    assert summary["target"] == "h100" and summary["records_with_prediction"] == 1
    assert measured.predicted_temp_bytes == 3 * 2**20 and other.predicted_temp_bytes is None
    text = device_check.format_predictions([measured, other], summary["target"])
    assert text == (
        "ce_int 8192x32000 bfloat16 fwd+bwd jxent: temp 1.0 MiB measured, 3.0 MiB compiled "
        "for h100; 2.000 GB accessed (compiled) in 1.000 ms measured = 2,000 GB/s"
    )
    assert device_check.aot_target_for("tpu", "TPU v5 lite") == "v5e"
    assert device_check.aot_target_for("cpu", "cpu") is None
    missing = device_check.predict([measured], env, str(tmp_path / "absent.json"))
    assert missing["records_with_prediction"] == 0 and "not found" in missing["note"]
