"""Command-line plumbing the experiments share: configs from flags, ``--resume``, multi-process.

``--resume RUN_DIR`` continues a run with the config saved in ``RUN_DIR/config.json``. Flags
given beside it must agree with that config, except ``--epochs``, which may grow to extend a
run (its learning-rate schedule is then planned over the new total), and the flags that only
affect how the run is displayed or where it runs. A flag that disagrees is an error naming it.

Multi-process jobs (``--distributed``): the processes join first; then process 0 alone decides
the run directory and the config (a fresh timestamp, ``--out-dir`` or ``--resume``), writes
``config.json``, and sends its decision to every other process, so that all of them train the
same config into the same directory (see docs/multi_process.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from experiments.common import devices, runfiles
from experiments.common.signals import StopRequest

# Flags that may differ on resume: they change nothing a run computes.
RESUME_FREE = frozenset({"data_dir"})

# Multi-process bounds (seconds). Joining: jax's own default. A dead process: the others stop
# within this long of its last heartbeat; jax's default is 100 s, which only delays the error.
DEFAULT_JOIN_TIMEOUT = 300
DEFAULT_HEARTBEAT_TIMEOUT = 30


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default after its help, unless the help already states it or there is
    nothing to state (``None``, or ``False`` for a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    """The dataclass ``config_cls`` filled from the parsed flags of the same names."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)}
    return config_cls(**_tuples(values))


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def load_config(config_cls: type, run_dir: Path) -> Any | None:
    """The ``config_cls`` saved in ``run_dir/config.json``, or None if there is none.

    A field added after the run was saved takes the value the class's ``BEFORE_FIELD``
    mapping gives (what runs did before the field existed), else the class default."""
    path = run_dir / runfiles.CONFIG
    if not path.is_file():
        return None
    saved = {**getattr(config_cls, "BEFORE_FIELD", {}), **json.loads(path.read_text())}
    return config_cls(**_tuples(saved))


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


def start_or_resume_everywhere(
    experiment: str,
    config_cls: type,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    args: argparse.Namespace,
) -> tuple[Any, Path, bool]:
    """``start_or_resume`` after JAX has started: on process 0 alone, shared with every process.

    One process: the config (which holds the device count) decides how JAX starts, so it comes
    first. Several: they join first, then process 0 decides the run directory (its clock names
    a fresh one) and writes ``config.json``; the others take its decision, flags ignored.
    """
    if not args.distributed:
        config, run_dir, resume = start_or_resume(experiment, config_cls, parser, argv, args)
        start_jax(args, config.devices)
        return config, run_dir, resume
    start_jax(args, 0)

    def decide() -> dict[str, Any]:
        if not args.resume:
            check_job_devices(args.devices)  # before config.json is written
        config, run_dir, resume = start_or_resume(experiment, config_cls, parser, argv, args)
        check_job_devices(config.devices)
        return {"config": dataclasses.asdict(config), "run_dir": str(run_dir), "resume": resume}

    decision = devices.decided_by_process_0(decide)
    config = config_cls(**_tuples(decision["config"]))
    return config, Path(decision["run_dir"]), bool(decision["resume"])


def check_job_devices(count: int) -> None:
    """A multi-process job trains on all of its devices: a process without devices in the
    mesh could take no part in it."""
    if count != jax.device_count():
        raise SystemExit(
            f"--devices {count}: a job of {jax.process_count()} processes trains on all of its "
            f"{jax.device_count()} devices; pass --devices {jax.device_count()}"
        )


def new_run_dir_everywhere(experiment: str, args: argparse.Namespace) -> Path:
    """``runfiles.new_run_dir`` decided by process 0 (JAX must have started): one directory."""
    if not args.distributed:
        return runfiles.new_run_dir(experiment, args.out_dir)
    return Path(
        devices.decided_by_process_0(lambda: str(runfiles.new_run_dir(experiment, args.out_dir)))
    )


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
    add_multi_process_flags(parser)


def add_multi_process_flags(parser: argparse.ArgumentParser) -> None:
    """``--distributed`` and its companions (see docs/multi_process.md)."""
    multi_host = parser.add_argument_group(
        "multi-process",
        "run the same command in every process (one per host, or several on one machine); "
        "--devices counts all processes' devices; process 0 picks the run directory and "
        "writes the run's files",
    )
    multi_host.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() first"
    )
    multi_host.add_argument(
        "--coordinator", default=None, help="HOST:PORT where process 0 serves the job"
    )
    multi_host.add_argument("--num-processes", type=int, default=None)
    multi_host.add_argument("--process-id", type=int, default=None, help="0 .. num-processes-1")
    multi_host.add_argument(
        "--join-timeout",
        type=int,
        metavar="SECONDS",
        default=DEFAULT_JOIN_TIMEOUT,
        help="how long the processes wait for each other to start (and, at the end, to finish)",
    )
    multi_host.add_argument(
        "--heartbeat-timeout",
        type=int,
        metavar="SECONDS",
        default=DEFAULT_HEARTBEAT_TIMEOUT,
        help="a process silent this long counts as dead, and every other process then stops "
        "with an error",
    )


def start_jax(args: argparse.Namespace, device_count: int) -> None:
    """Multi-process initialisation or the CPU device count, before JAX's first operation."""
    if args.distributed:
        devices.initialize_distributed(
            args.coordinator,
            args.num_processes,
            args.process_id,
            join_timeout=args.join_timeout,
            heartbeat_timeout=args.heartbeat_timeout,
        )
    else:
        devices.set_cpu_device_count(device_count)


def explain_failure(args: argparse.Namespace, run_dir: Path) -> Callable[[BaseException], None]:
    """A handler that tells, on stderr, what a failed multi-process job means and how to go on.

    A process that dies breaks the collectives of the others (gloo reports it at once), or
    falls silent: jax then terminates every other process ``--heartbeat-timeout`` seconds later.
    """

    def explain(err: BaseException) -> None:
        if not args.distributed:
            return
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"\nprocess {jax.process_index()} of {jax.process_count()} (coordinator "
            f"{args.coordinator}): the job failed: {type(err).__name__}: {message}\n"
            "Most likely another process died or was killed (see its log); every process "
            f"stops within --heartbeat-timeout {args.heartbeat_timeout} s of such a death. "
            f"Continue the job by starting all {jax.process_count()} processes again with "
            f"--resume {run_dir}",
            file=sys.stderr,
            flush=True,
        )

    return explain


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

    ``train(config, run_dir, *, resume, progress, stop)`` must return a result with ``records``
    and ``exit_code`` (e.g. ``experiments.mnist.train.FitResult``).
    """
    t_start = time.perf_counter()
    args = parser.parse_args(argv)
    config, run_dir, resume = start_or_resume_everywhere(experiment, config_cls, parser, argv, args)
    stop = StopRequest()
    try:
        with stop.installed():
            result = train(config, run_dir, resume=resume, progress=not args.no_progress, stop=stop)
    except Exception as err:
        explain_failure(args, run_dir)(err)
        raise
    if main_process():
        print_summary(experiment, config, result, run_dir, time.perf_counter() - t_start)
    return result.exit_code


def main_process() -> bool:
    """Whether this is process 0 (the only one that prints summaries and writes run files)."""
    return jax.process_index() == 0
