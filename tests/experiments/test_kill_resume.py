"""A SIGKILL at any instant leaves a run that a resume completes, identically.

Real kills of a real training process (``kill_driver.py``, beside this file): the test watches
the run's progress lines and kills it at instants spread over the run (just after chunks,
during an epoch's evaluation, while a checkpoint is being written, ...), resumes it, kills it
again, and so on; the run finally completed must equal an uninterrupted one bit for bit, and
after every kill ``metrics.jsonl`` must be whole. A deterministic test covers the case the
random instants hit only sometimes: the epoch's record written, its checkpoint not (yet)
complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
DRIVER = TESTS / "kill_driver.py"
ROOT = TESTS.parents[1]
# The driver imports ``experiments.`` from the repository root (pytest's ``pythonpath`` setting
# puts the root on this process's path only).
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def launch(which: str, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(DRIVER), which, str(run_dir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": PYTHONPATH},
    )


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out


def kill_after(process: subprocess.Popen, chunks: int, extra_seconds: float) -> int:
    """Waits for ``chunks`` progress lines (or the end), sleeps a little, then SIGKILLs."""
    assert process.stdout is not None
    seen = 0
    while seen < chunks:
        line = process.stdout.readline()
        if not line or line.startswith("done"):
            break
        seen += line.startswith("chunk")
    time.sleep(extra_seconds)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return seen


def records_without_timings(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    timing = {"images_per_second", "train_seconds", "words_per_second"}
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


def final_params(run_dir: Path) -> list[np.ndarray]:
    with np.load(run_dir / "final_params.npz") as saved:
        return [saved[name] for name in saved.files]


@pytest.fixture(scope="module", params=["mnist", "brown"])
def reference(request, tmp_path_factory) -> tuple[str, Path]:
    """An uninterrupted run of each script's tiny config, in its own process."""
    run_dir = tmp_path_factory.mktemp(f"{request.param}-runs") / "reference"
    finish(launch(request.param, run_dir, "uninterrupted"))
    return request.param, run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert records_without_timings(run_dir) == records_without_timings(reference)
    for ours, theirs in zip(final_params(run_dir), final_params(reference), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    if (reference / "results.json").exists():
        ours = json.loads((run_dir / "results.json").read_text())["test_perplexity"]
        theirs = json.loads((reference / "results.json").read_text())["test_perplexity"]
        assert ours == theirs


def test_kills_at_many_instants_then_resume_equals_uninterrupted_run(reference):
    which, reference_dir = reference
    run_dir = reference_dir.parent / "killed"
    rng = random.Random(0)
    # Chunks per run: mnist 2 epochs x 3 chunks, brown 2 epochs x 2 chunks. Kill after the
    # k-th chunk line of each relaunch, then a random delay (0-0.5 s): instants land before
    # any checkpoint, inside chunks, in evaluations, around the metrics write and while the
    # asynchronous checkpoint is written.
    for chunks in (0, 2, 1, 3):
        kill_after(launch(which, run_dir), chunks, rng.uniform(0.0, 0.5))
        if (run_dir / "metrics.jsonl").exists():
            records_without_timings(run_dir)  # parses: never half a line
    finish(launch(which, run_dir))
    assert_same_run(run_dir, reference_dir)


def test_record_ahead_of_its_checkpoint_is_dropped_and_redone(reference):
    """The case that used to fail: killed after epoch 1's record was written but before its
    checkpoint landed, so the run has a record and no complete checkpoint at all."""
    which, reference_dir = reference
    run_dir = reference_dir.parent / "record-ahead"
    shutil.copytree(reference_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints")  # as if killed before orbax finalised the first
    (run_dir / "final_params.npz").unlink()
    (run_dir / "results.json").unlink(missing_ok=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(lines[0] + "\n")  # epoch 1's record only
    finish(launch(which, run_dir))
    assert_same_run(run_dir, reference_dir)


def test_checkpoint_position_is_a_snapshot_taken_at_save(tmp_path):
    """orbax writes the JSON in the background; a records list the caller appends to after
    ``save`` once reached epoch 1's checkpoint with epoch 2's record in it, and a resume from
    that checkpoint repeated the record (a CI failure of the random-kill test)."""
    import jax.numpy as jnp

    from experiments.common import runfiles

    checkpointer = runfiles.Checkpointer(tmp_path)
    records = [{"epoch": 1}]
    checkpointer.save(1, {"w": jnp.arange(4.0)}, {"epoch": 1, "records": records})
    records.append({"epoch": 2})  # the caller goes on while the save runs in the background
    checkpointer.close()
    _, position = runfiles.Checkpointer(tmp_path).restore({"w": jnp.zeros(4)})
    assert position == {"epoch": 1, "records": [{"epoch": 1}]}
