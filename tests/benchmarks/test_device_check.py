"""The accelerator check (device_check.py with device_runner, device_measure and
device_report) end to end on CPU with tiny shapes, so that it cannot rot; no accelerator."""

from __future__ import annotations

import json

import pytest

from benchmarks import device_measure, device_report, device_runner


@pytest.fixture(scope="module")
def device_check(load_script):
    return load_script("device_check.py")


def test_device_check_smoke_writes_results(device_check, fake_tests, tmp_path):
    # The tests: the smoke's marker expression and keyword over a generated tests root
    # (test_device_runner.py checks the selection itself).
    out = tmp_path / "out"
    argv = ["--smoke", "--ops=ce_int,fused", f"--out={out}", f"--tests-root={fake_tests}"]
    assert device_check.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert (out / "results.png").stat().st_size > 0
    env = result["environment"]
    assert env["jax"] and env["device_kind"] and env["accelerator"]["platform"]
    tests = result["tests"]
    assert tests["ok"] and tests["passed"] == 1 and tests["failed"] == tests["errors"] == 0
    assert tests["marker"] == device_runner.NUMERICS_MARKERS
    assert (out / tests["log"]).exists() and (out / tests["junit"]).exists()
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

    monkeypatch.setattr(device_measure, "copy_bandwidth", out_of_memory)
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


def test_a_test_timeout_is_reported_not_failed():
    ran = {"ok": False, "timed_out": True, "failed": 0, "errors": 0}
    assert not device_runner.tests_failed(ran)
    assert device_runner.tests_failed({**ran, "failed": 1})
    assert device_runner.tests_failed({**ran, "timed_out": False})
    assert not device_runner.tests_failed({**ran, "ok": True, "timed_out": False})


def test_a_failing_test_fails_the_check(device_check, fake_tests, tmp_path, monkeypatch):
    # The smoke run's keyword, pointed at a parametrised test of which one case fails.
    monkeypatch.setattr(device_runner, "SMOKE_KEYWORD", "passes_for_1_fails_for_2")
    argv = ["--smoke", "--ops=ce_int", "--dtypes=float32", f"--out={tmp_path}"]
    assert device_check.main([*argv, f"--tests-root={fake_tests}"]) == 1
    tests = json.loads((tmp_path / "results.json").read_text())["tests"]
    assert (tests["passed"], tests["failed"]) == (1, 1)
    assert tests["not_passed"] == ["test_fake_library::test_passes_for_1_fails_for_2[2]"]


def test_device_check_prints_the_compiled_prediction_beside_a_measurement(tmp_path):
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
    summary = device_report.predict([measured, other], env, str(aot_json))
    assert summary["target"] == "h100" and summary["records_with_prediction"] == 1
    assert measured.predicted_temp_bytes == 3 * 2**20 and other.predicted_temp_bytes is None
    text = device_report.format_predictions([measured, other], summary["target"])
    assert text == (
        "ce_int 8192x32000 bfloat16 fwd+bwd jxent: temp 1.0 MiB measured, 3.0 MiB compiled "
        "for h100; 2.000 GB accessed (compiled) in 1.000 ms measured = 2,000 GB/s"
    )
    assert device_report.aot_target_for("tpu", "TPU v5 lite") == "v5e"
    assert device_report.aot_target_for("cpu", "cpu") is None
    missing = device_report.predict([measured], env, str(tmp_path / "absent.json"))
    assert missing["records_with_prediction"] == 0 and "not found" in missing["note"]
