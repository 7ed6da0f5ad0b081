"""Command-line plumbing the experiments share: configs from flags, and ``--resume``.

``--resume RUN_DIR`` continues a run with the config saved in ``RUN_DIR/config.json``. Flags
given beside it must agree with that config, except ``--epochs``, which may grow to extend a
run (its learning-rate schedule is then planned over the new total), and the flags that only
affect how the run is displayed or where it runs. A flag that disagrees is an error naming it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import devices
import runfiles
from signals import StopRequest

# Flags that may differ on resume: they change nothing a run computes.
RESUME_FREE = frozenset({"data_dir"})


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    """The dataclass ``config_cls`` filled from the parsed flags of the same names."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)}
    return config_cls(**_tuples(values))


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def load_config(config_cls: type, run_dir: Path) -> Any | None:
    """The ``config_cls`` saved in ``run_dir/config.json``, or None if there is none."""
    path = run_dir / runfiles.CONFIG
    if not path.is_file():
        return None
    return config_cls(**_tuples(json.loads(path.read_text())))


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations of the flags actually given in ``argv`` (not left at their defaults)."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def resume_config(
    config_cls: type, saved: Any, args: argparse.Namespace, given: set[str], run_dir: Path
) -> Any:
    """The saved config, with ``--epochs`` extended if asked; raises on any conflicting flag."""
    wanted = config_from_args(config_cls, args)
    changes = {}
    for field in dataclasses.fields(config_cls):
        name = field.name
        if name not in given or name in RESUME_FREE:
            continue
        ours, theirs = getattr(wanted, name), getattr(saved, name)
        if ours == theirs:
            continue
        if name == "epochs" and ours > theirs:
            changes[name] = ours
            continue
        flag = "--" + name.replace("_", "-")
        hint = " (--epochs may only grow, to extend a run)" if name == "epochs" else ""
        raise SystemExit(
            f"--resume {run_dir}: {flag} {ours!r} conflicts with the run's saved config "
            f"({name} = {theirs!r} in {run_dir / runfiles.CONFIG}){hint}; drop the flag or "
            "start a new run"
        )
    return dataclasses.replace(saved, **changes)


def start_or_resume(
    experiment: str,
    config_cls: type,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    args: argparse.Namespace,
) -> tuple[Any, Path, bool]:
    """``(config, run_dir, resume)`` for a run, writing ``config.json`` first (atomically).

    A ``--resume`` of a directory without ``config.json`` (a run killed before it wrote one)
    starts that run afresh from the flags given.
    """
    if args.resume:
        run_dir = Path(args.resume)
        saved = load_config(config_cls, run_dir)
        if saved is not None:
            given = explicit_flags(parser, argv)
            config = resume_config(config_cls, saved, args, given, run_dir)
            if config != saved:
                runfiles.write_json_atomic(run_dir / runfiles.CONFIG, dataclasses.asdict(config))
            return config, run_dir, True
        if not run_dir.is_dir():
            raise SystemExit(f"--resume {run_dir}: no such run directory")
        print(f"--resume {run_dir}: no config.json there; starting the run from the beginning")
    else:
        run_dir = runfiles.new_run_dir(experiment, args.out_dir)
    config = config_from_args(config_cls, args)
    runfiles.write_json_atomic(run_dir / runfiles.CONFIG, dataclasses.asdict(config))
    return config, run_dir, bool(args.resume)


def add_run_flags(parser: argparse.ArgumentParser, defaults: Any, experiment: str) -> None:
    """Flags every MNIST experiment has: seed, loss, devices, data/out dirs, resume, limits."""
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--loss", choices=("jxent", "optax"), default=defaults.loss)
    parser.add_argument(
        "--devices", type=int, default=defaults.devices, help="data-parallel device count"
    )
    parser.add_argument(
        "--chunk-steps",
        type=int,
        default=defaults.chunk_steps,
        help="training steps per jitted scan (progress and interrupt granularity)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="MNIST cache (default: $JXENT_DATA_DIR or ~/.cache/jxent/mnist)",
    )
    parser.add_argument(
        "--out-dir", default=None, help=f"run directory (default: runs/{experiment}/<timestamp>)"
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR from its newest checkpoint, with its config.json; "
        "--epochs N extends it; other flags must match the config",
    )
    parser.add_argument(
        "--train-limit", type=int, default=None, help="use the first N train images"
    )
    parser.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    multi_host = parser.add_argument_group(
        "multi-host", "run the same command on every host; --devices counts all hosts' devices"
    )
    multi_host.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() first"
    )
    multi_host.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    multi_host.add_argument("--num-processes", type=int, default=None)
    multi_host.add_argument("--process-id", type=int, default=None)


def start_jax(args: argparse.Namespace, device_count: int) -> None:
    """Multi-host initialisation or the CPU device count, before JAX's first operation."""
    if args.distributed:
        devices.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    else:
        devices.set_cpu_device_count(device_count)


def print_summary(experiment: str, config: Any, result: Any, run_dir: Path, wall: float) -> None:
    """The final summary line: accuracy, median throughput, wall time, run directory."""
    if not result.records:
        return
    last = result.records[-1]
    rates = [r["images_per_second"] for r in result.records[1:]] or [
        result.records[0]["images_per_second"]
    ]
    print(
        f"\n{experiment}: test accuracy {100 * last['test_accuracy']:.2f}% "
        f"(test loss {last['test_loss']:.4f}) after {last['epoch']} epochs; "
        f"{statistics.median(rates):,.0f} images/s (median epoch, epoch 1 excluded: it "
        f"compiles); {wall:.1f} s wall; {config.loss} loss on {config.devices} device(s)\n"
        f"run directory: {run_dir}"
    )


def run_from_args(
    experiment: str,
    config_cls: type,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    train: Any,
) -> int:
    """Builds or reloads the config, installs the signal handlers, trains, summarises.

    ``train(config, run_dir, *, resume, progress, stop)`` must return an ``engine.FitResult``.
    """
    t_start = time.perf_counter()
    args = parser.parse_args(argv)
    config, run_dir, resume = start_or_resume(experiment, config_cls, parser, argv, args)
    start_jax(args, config.devices)
    stop = StopRequest()
    with stop.installed():
        result = train(config, run_dir, resume=resume, progress=not args.no_progress, stop=stop)
    print_summary(experiment, config, result, run_dir, time.perf_counter() - t_start)
    return result.exit_code
