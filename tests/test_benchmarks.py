"""Smoke test: the benchmark harness runs end to end on tiny shapes, so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

_RUN_PY = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("jxent_benchmarks_run", _RUN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name.
    spec.loader.exec_module(module)
    return module


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
    for target in result["targets"]:
        assert target["status"] in ("PASS", "FAIL", "SKIP")


def test_float64_accuracy_check_is_sensitive(bench):
    import jax
    import jax.numpy as jnp

    logits = 3.0 * jax.random.normal(jax.random.key(0), (4, 32))
    assert bench.relative_error("logsumexp", jax.nn.logsumexp, logits) < 1e-6
    wrong = lambda x, axis: jax.nn.logsumexp(x, axis=axis) * (1 + 1e-4)
    assert bench.relative_error("logsumexp", wrong, logits) > 1e-5
    assert bench.relative_error("softmax", jax.nn.softmax, logits) < 1e-6
    assert bench.relative_error("log_softmax", jax.nn.log_softmax, jnp.asarray(logits)) < 1e-6


def test_fusion_profiler_lists_each_candidates_fusions(capsys):
    script = _RUN_PY.with_name("profile_fusions.py")
    spec = importlib.util.spec_from_file_location("jxent_benchmarks_profile", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["ce_int", "8x16", "--calls=1"]) == 0
    out = capsys.readouterr().out
    for candidate in ("jxent", "optax", "naive"):
        assert f"{candidate}: " in out
    assert "fusion" in out
