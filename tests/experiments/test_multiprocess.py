"""Multi-process jobs: real 2-process runs on localhost (gloo), one CPU device per process.

Each job runs the experiments' own command lines (``multiprocess_driver.py`` only swaps
in small offline data) with ``--distributed``, the second process started 2 s after the
first, as happens on any cluster. A job must use one run directory and equal, bit for bit, one
process with 2 CPU devices. A process killed mid-job must make the other stop with an error
within the heartbeat bound, and ``--resume`` with 2 processes must then complete the job,
equal to the uninterrupted run. A process that never joins must stop the other at the join
bound. The help texts state every default once.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
DRIVER = TESTS / "multiprocess_driver.py"
ROOT = TESTS.parents[1]
# The driver imports ``experiments.`` from the repository root (pytest's ``pythonpath`` setting
# puts the root on this process's path only).
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
STAGGER_S = 2.0
HEARTBEAT_S = 8
JOIN_S = 60

# The tests' tiny configs (test_mnist.TINY, test_brown.TINY_NPLM) as command-line
# flags. Brown: the NPLM, one epoch; the transformer's compilations alone took 3 times as long.
FLAGS = {
    "mnist": shlex.split(
        "--epochs 2 --batch-size 32 --hidden 32 --chunk-steps 4 --learning-rate 3e-3 "
        "--max-shift 1 --train-limit 384 --test-limit 200 --no-progress"
    ),
    "brown": shlex.split(
        "--model nplm --epochs 1 --batch-size 4 --context 16 --hidden 16 --embed-dim 8 "
        "--chunk-steps 17 --learning-rate 1e-2 --warmup-steps 5 --dropout 0.1 --no-progress"
    ),
}
EXPERIMENT = {"mnist": "mnist_mlp", "brown": "brown_lm"}
TIMINGS = {"images_per_second", "train_seconds", "words_per_second"}

pytestmark = pytest.mark.multiprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the module's processes: most compile the same."""
    cache = tmp_path_factory.mktemp("jax-cache")
    os.environ["JXENT_TEST_JAX_CACHE"] = str(cache)
    yield cache
    del os.environ["JXENT_TEST_JAX_CACHE"]


def launch(which: str, cwd: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONPATH": PYTHONPATH}
    env.pop("XLA_FLAGS", None)  # one CPU device per process unless --devices asks for more
    return subprocess.Popen(
        [sys.executable, str(DRIVER), which, *flags],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def launch_job(which: str, cwd: Path, *flags: str) -> list[subprocess.Popen]:
    """Two processes of one job, the second started ``STAGGER_S`` after the first."""
    port = free_port()
    processes = []
    for process_id in (0, 1):
        if process_id:
            time.sleep(STAGGER_S)
        processes.append(
            launch(
                which,
                cwd,
                *FLAGS[which],
                *flags,
                "--devices=2",
                "--distributed",
                f"--coordinator=localhost:{port}",
                "--num-processes=2",
                f"--process-id={process_id}",
                f"--join-timeout={JOIN_S}",
                f"--heartbeat-timeout={HEARTBEAT_S}",
            )
        )
    return processes


def finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"process hung; its stderr ends:\n{err[-3000:]}") from None
    assert process.returncode == 0, err[-3000:]
    return out, err


def records_without_timings(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def final_params(run_dir: Path) -> list[np.ndarray]:
    with np.load(run_dir / "final_params.npz") as saved:
        return [saved[name] for name in saved.files]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    records = records_without_timings(run_dir)
    assert len(records) == json.loads((reference / "config.json").read_text())["epochs"]
    assert records == records_without_timings(reference)
    for ours, theirs in zip(final_params(run_dir), final_params(reference), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    if (reference / "results.json").exists():
        ours = json.loads((run_dir / "results.json").read_text())["test_perplexity"]
        theirs = json.loads((reference / "results.json").read_text())["test_perplexity"]
        assert ours == theirs


@pytest.fixture(scope="module", params=["mnist", "brown"])
def reference(request, tmp_path_factory) -> tuple[str, Path]:
    """The job in one process with 2 CPU devices."""
    which = request.param
    run_dir = tmp_path_factory.mktemp(f"{which}-multiprocess") / "one-process"
    finish(launch(which, run_dir.parent, *FLAGS[which], "--devices=2", f"--out-dir={run_dir}"))
    return which, run_dir


def test_two_processes_started_apart_share_one_run_dir_and_equal_one_process(reference):
    which, reference_dir = reference
    cwd = reference_dir.parent / "two-processes"
    cwd.mkdir()
    outputs = [finish(p) for p in launch_job(which, cwd)]
    # No --out-dir: each process's clock would name its own timestamped directory.
    run_dirs = list((cwd / "runs" / EXPERIMENT[which]).iterdir())
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert_same_run(run_dir, reference_dir)
    assert json.loads((run_dir / "config.json").read_text()) == json.loads(
        (reference_dir / "config.json").read_text()
    )
    assert (run_dir / "curves.png").exists()
    # Process 0 alone reports; both say where they joined.
    assert f"run directory: runs/{EXPERIMENT[which]}/{run_dir.name}" in outputs[0][0]
    assert "run directory" not in outputs[1][0]
    for index, (_, err) in enumerate(outputs):
        assert f"process {index} of 2 joined the job" in err


def test_a_killed_process_stops_the_other_in_bounded_time_and_resume_completes(reference):
    which, reference_dir = reference
    if which == "brown":
        pytest.skip("one kill test suffices; the MNIST job is the quicker one")
    cwd = reference_dir.parent / "killed"
    cwd.mkdir()
    run_dir = cwd / "run"
    first, second = launch_job(which, cwd, f"--out-dir={run_dir}")
    assert second.stdout is not None
    # Kill process 1 in epoch 2, after its first chunk: epoch 1's checkpoint may be complete.
    for line in second.stdout:
        if line.startswith("chunk 1 "):
            break
    second.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        _, err = first.communicate(timeout=HEARTBEAT_S + 60)
    except subprocess.TimeoutExpired:
        first.kill()
        raise AssertionError("the surviving process hung after the other was killed") from None
    stopped_after = time.monotonic() - killed_at
    second.wait()
    assert first.returncode != 0
    assert stopped_after < HEARTBEAT_S + 30, stopped_after
    # Ours (a failed collective) or jax's (a missed heartbeat), whichever comes first.
    assert "--resume" in err or "another task died" in err, err[-3000:]
    for process in launch_job(which, cwd, f"--resume={run_dir}"):
        finish(process)
    assert_same_run(run_dir, reference_dir)


def test_an_error_in_process_0s_decision_stops_every_process(reference):
    which, reference_dir = reference
    if which == "brown":
        pytest.skip("the decision is the same code for every script")
    run_dir = reference_dir.parent / "conflict"
    run_dir.mkdir()
    shutil.copy(reference_dir / "config.json", run_dir)
    for process in launch_job(which, run_dir, f"--resume={run_dir}", "--hidden=64"):
        _, err = process.communicate(timeout=300)
        assert process.returncode != 0
        assert "--hidden (64,) conflicts with the run's saved config" in err, err[-3000:]


def test_a_process_that_never_joins_stops_the_other_at_the_join_timeout(tmp_path):
    port = free_port()
    lonely = launch(
        "mnist",
        tmp_path,
        *FLAGS["mnist"],
        "--distributed",
        f"--coordinator=localhost:{port}",
        "--num-processes=2",
        "--process-id=0",
        "--join-timeout=3",
    )
    _, err = lonely.communicate(timeout=120)
    assert lonely.returncode != 0
    assert lonely.returncode == 3, err[-3000:]
    assert f"process 0 of 2 (--coordinator localhost:{port}): not all processes joined the job "
    "within --join-timeout 3 s" in " ".join(err.split()), err[-3000:]
    assert not (tmp_path / "runs").exists()  # nothing decided, nothing written


def test_help_states_each_default_once(capsys):
    from experiments.brown import main as brown_main
    from experiments.clusters import main as clusters_main
    from experiments.mnist import main as mnist_main

    parsers = {
        "mnist_mlp": mnist_main.make_parser("mlp"),
        "mnist_lenet5": mnist_main.make_parser("lenet5"),
        "brown_lm": brown_main.make_parser(),
    }
    for name, parser in parsers.items():
        for action in parser._actions:
            shown = parser._get_formatter()._expand_help(action) if action.help else ""
            assert shown.count("default") <= 1, (name, action.dest, shown)
    texts = {name: parser.format_help() for name, parser in parsers.items()}
    with pytest.raises(SystemExit):
        clusters_main.main(["--help"])
    texts["five_clusters"] = capsys.readouterr().out
    flat = {name: " ".join(text.split()) for name, text in texts.items()}
    for name, text in flat.items():
        assert "(default: None)" not in text, name
        assert "(default: False)" not in text, name
    assert "MNIST cache (default: $JXENT_DATA_DIR or ~/.cache/jxent/mnist) " in flat["mnist_mlp"]
    assert "(default: runs/mnist_mlp/<timestamp>) " in flat["mnist_mlp"]
    assert "pixels (0: off) (default: 2) " in flat["mnist_mlp"]  # other defaults still shown
    assert "--join-timeout SECONDS how long" in flat["mnist_lenet5"]
    assert "--epochs EPOCHS default: transformer 12, nplm 5 " in flat["brown_lm"]
    assert "--heartbeat-timeout SECONDS" in flat["brown_lm"]
    assert flat["five_clusters"].endswith(
        "--out-dir OUT_DIR default: runs/five_clusters/<timestamp>"
    )
