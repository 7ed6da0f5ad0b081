"""Fast checks of the MNIST example (experiments/mnist/): smoke runs, resume, determinism, data
parallelism, the command line.

Tiny models on a few hundred images (real MNIST when cached, synthetic otherwise); no network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.common import cli, runfiles, signals
from experiments.data import mnist as mnist_data
from experiments.mnist import main
from experiments.mnist.configs import LeNet5Config, MLPConfig
from experiments.mnist.train import FitResult, train_and_evaluate

ROOT = Path(__file__).resolve().parents[2]
# A child interpreter imports ``experiments.`` from the repository root (pytest's ``pythonpath``
# setting puts the root on this process's path only).
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
RUN_FILES = ("config.json", "metrics.jsonl", "curves.png", "confusion.png", "mistakes.png")
TINY = MLPConfig(
    epochs=2, batch_size=32, hidden=(32,), chunk_steps=4, learning_rate=3e-3, max_shift=1
)


def small_data(n_train: int = 384, n_test: int = 200) -> mnist_data.MNIST:
    """The first images of real MNIST if it is cached (never downloaded here), else synthetic."""
    try:
        mnist = mnist_data.load_mnist(sources=[], log=lambda message: None)
    except mnist_data.MnistDataError:
        return mnist_data.synthetic_dataset(n_train, n_test)
    return mnist_data.MNIST(
        mnist.train_images[:n_train],
        mnist.train_labels[:n_train].astype(np.int32),
        mnist.test_images[:n_test],
        mnist.test_labels[:n_test].astype(np.int32),
        source="mnist",
    )


@pytest.fixture(scope="module")
def data() -> mnist_data.MNIST:
    return small_data()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> tuple[Path, FitResult]:
    """One uninterrupted tiny run (with plots) that several tests compare against."""
    run_dir = tmp_path_factory.mktemp("reference")
    return run_dir, train_and_evaluate(TINY, run_dir, data=data, progress=False)


def assert_trees_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in ("images_per_second", "train_seconds")}
            for r in records]  # fmt: skip


def test_mlp_smoke_run_learns_and_leaves_every_artefact(reference):
    run_dir, result = reference
    assert result.exit_code == 0 and not result.interrupted
    first, last = result.records[0], result.records[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["test_loss"] < np.log(10)  # better than chance
    for name in RUN_FILES:
        assert (run_dir / name).stat().st_size > 0, name
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["hidden"] == [32]
    assert any((run_dir / "checkpoints").iterdir())


def test_same_seed_gives_identical_metrics_and_params(tmp_path, data, reference):
    again = train_and_evaluate(TINY, tmp_path, data=data, progress=False, plots=False)
    assert without_timings(again.records) == without_timings(reference[1].records)
    assert_trees_equal(again.params, reference[1].params)


# 384 images in batches of 32 are 12 steps per epoch, run in chunks of 4.
@pytest.mark.parametrize("interrupt_at", [(1, 4), (0, 12)], ids=["mid-epoch", "epoch-end"])
def test_resume_after_signal_matches_uninterrupted_run_bit_for_bit(
    tmp_path, data, reference, interrupt_at
):
    def interrupt(epoch: int, step: int) -> None:
        if (epoch, step) == interrupt_at:
            signal.raise_signal(signal.SIGINT)  # a real SIGINT, as Ctrl-C delivers it

    stop = signals.StopRequest()
    with stop.installed():
        first = train_and_evaluate(
            TINY, tmp_path, data=data, progress=False, stop=stop, on_chunk=interrupt, plots=False
        )
    assert first.interrupted and first.exit_code == signals.EXIT_INTERRUPTED
    assert len(first.records) == interrupt_at[0] + (interrupt_at[1] == 12)

    resumed = train_and_evaluate(TINY, tmp_path, data=data, progress=False, resume=True)
    assert not resumed.interrupted
    assert_trees_equal(resumed.params, reference[1].params)
    assert without_timings(runfiles.read_metrics(tmp_path / "metrics.jsonl")) == without_timings(
        reference[1].records
    )
    for name in RUN_FILES:
        assert (tmp_path / name).exists(), name


def test_optax_loss_trains_the_identical_model(tmp_path, data, reference):
    theirs = train_and_evaluate(
        dataclasses.replace(TINY, loss="optax"), tmp_path, data=data, progress=False, plots=False
    )
    for ours, their in zip(reference[1].records, theirs.records, strict=True):
        np.testing.assert_allclose(ours["train_loss"], their["train_loss"], rtol=1e-3)
        np.testing.assert_allclose(ours["test_loss"], their["test_loss"], rtol=1e-3)


def data_parallel_runs(tmp_path: Path) -> dict:
    """Final records and params of the same tiny run on 1 and on 4 devices."""
    data = small_data(256, 100)
    out = {}
    for devices in (1, 4):
        config = dataclasses.replace(TINY, devices=devices, epochs=1)
        result = train_and_evaluate(
            config, tmp_path / str(devices), data=data, progress=False, plots=False
        )
        out[str(devices)] = dict(
            records=result.records,
            params=[np.asarray(x).tolist() for x in jax.tree.leaves(result.params)],
        )
    return out


def test_data_parallel_on_four_cpu_devices_matches_one_device(tmp_path):
    if len(jax.devices()) >= 4:  # tests/conftest.py asks JAX for 8 CPU devices
        out = data_parallel_runs(tmp_path)
    else:
        # jax_num_cpu_devices only works before JAX starts its backend: a fresh interpreter,
        # run in this folder (``-c`` imports test_mnist from the working directory).
        script = textwrap.dedent(f"""
            import json
            import jax
            jax.config.update("jax_num_cpu_devices", 4)
            from test_mnist import data_parallel_runs
            from pathlib import Path
            print(json.dumps(data_parallel_runs(Path({str(tmp_path)!r}))))
        """)
        completed = subprocess.run(
            [sys.executable, "-c", script],
            cwd=Path(__file__).parent,
            env={**os.environ, "PYTHONPATH": PYTHONPATH},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        out = json.loads(completed.stdout.strip().splitlines()[-1])
    one, four = out["1"], out["4"]
    for r1, r4 in zip(one["records"], four["records"], strict=True):
        np.testing.assert_allclose(r1["train_loss"], r4["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(r1["test_loss"], r4["test_loss"], rtol=1e-4)
        assert abs(r1["test_accuracy"] - r4["test_accuracy"]) <= 0.01
    for p1, p4 in zip(one["params"], four["params"], strict=True):
        np.testing.assert_allclose(p1, p4, rtol=1e-3, atol=1e-5)


def test_lenet5_smoke_run(tmp_path, data):
    config = LeNet5Config(epochs=2, batch_size=32, chunk_steps=6)
    data = dataclasses.replace(data, train_images=data.train_images[:192])
    data = dataclasses.replace(data, train_labels=data.train_labels[:192])
    result = train_and_evaluate(config, tmp_path, data=data, progress=False)
    assert result.records[1]["train_loss"] < result.records[0]["train_loss"]
    for name in RUN_FILES:
        assert (tmp_path / name).exists(), name


def test_mlp_command_line_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as info:
        main.main(["--help"], model="mlp")
    assert info.value.code == 0
    assert "--label-smoothing" in capsys.readouterr().out


def test_resume_flags_must_match_the_saved_config_except_a_longer_epochs(tmp_path):
    parser = main.make_parser("mlp")
    run_dir = tmp_path / "run"

    def start(*argv: str):
        argv_list = list(argv)
        return cli.start_or_resume(
            "mnist_mlp", MLPConfig, parser, argv_list, parser.parse_args(argv_list)
        )

    config, _, resume = start("--out-dir", str(run_dir), "--hidden", "64", "--epochs", "2")
    assert not resume and json.loads((run_dir / "config.json").read_text())["hidden"] == [64]
    # Same values, or flags that were not given, are fine.
    assert start("--resume", str(run_dir), "--hidden", "64")[0] == config
    with pytest.raises(SystemExit, match=r"--hidden \(32,\) conflicts .*hidden = \(64,\)"):
        start("--resume", str(run_dir), "--hidden", "32")
    with pytest.raises(SystemExit, match=r"--learning-rate 0\.1 conflicts"):
        start("--resume", str(run_dir), "--lr", "0.1")
    with pytest.raises(SystemExit, match="--epochs may only grow"):
        start("--resume", str(run_dir), "--epochs", "1")
    extended, _, resume = start("--resume", str(run_dir), "--epochs", "5")
    assert resume and extended == dataclasses.replace(config, epochs=5)
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 5
