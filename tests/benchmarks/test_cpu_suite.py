"""The CPU suite (run.py), its float64 accuracy check and the fusion profiler run end to end
on tiny shapes, so that they cannot rot."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("run.py")


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


def test_fusion_profiler_lists_each_candidates_fusions(load_script, capsys):
    module = load_script("profile_fusions.py")
    assert module.main(["ce_int", "8x16", "--calls=1"]) == 0
    out = capsys.readouterr().out
    for candidate in ("jxent", "optax", "naive"):
        assert f"{candidate}: " in out
    assert "fusion" in out
