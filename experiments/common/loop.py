"""The epoch loop both training engines run: chunks, progress, interrupts, checkpoints, records.

An engine says how a chunk of steps runs and what an epoch's record holds (``Hooks``); this loop
does the rest, the same way for every experiment:

* Resume: from the newest complete checkpoint (the state, and the position: epoch, step, the
  epoch's loss so far, the records), else from the start. ``metrics.jsonl`` is rewritten from
  the checkpoint's records, which drops any record a kill left ahead of it (see ``runfiles``).
* An epoch: a fresh order of examples from ``epoch_key(seed, epoch)``, its steps in jitted
  chunks (dropout keys derive from ``fold_in(epoch_key, 1)`` and the step), a tqdm bar, then the
  engine's record, a checkpoint, ``metrics.jsonl`` and a log line.
* Interrupts: checked between chunks; the state and the mid-epoch position are checkpointed, so
  that a resume replays exactly the chunks an uninterrupted run would have run.
* A time limit (``TimeLimit``): checked between chunks too. When the next chunk and the final
  evaluation would no longer fit, training stops there (the learning-rate schedule is simply
  cut off); a stop mid-epoch still evaluates (``end_epoch``) and records the partial epoch, its
  ``epoch`` a fraction (2.5: half of the third). The run is then finished: a resume with the
  same epochs trains no further; one with more epochs continues from the stop with a fresh
  time budget.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
from tqdm import tqdm

from experiments.common import runfiles
from experiments.common.signals import EXIT_INTERRUPTED, StopRequest


def epoch_key(seed: int, epoch: int) -> Any:
    """Key for one epoch; its children (order, per-step dropout) depend on nothing else."""
    return jax.random.fold_in(jax.random.key(seed), epoch)


def chunk_bounds(n_steps: int, chunk_steps: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n_steps)`` in chunks of at most ``chunk_steps``.

    Prefers equal chunks (a divisor of ``n_steps`` no smaller than half of ``chunk_steps``),
    because every distinct chunk length is one more compilation of the scan.
    """
    size = largest_divisor_at_most(n_steps, chunk_steps)
    if 2 * size < chunk_steps:
        size = chunk_steps
    return [(s, min(s + size, n_steps)) for s in range(0, n_steps, size)]


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """What the loop measured of one epoch's training, handed to ``Hooks.end_epoch``."""

    train_loss: float  # mean over the epoch's steps (a resumed epoch's included)
    trained_steps: int  # steps run in this process (fewer than the epoch's after a resume)
    train_seconds: float
    earlier: tuple[dict[str, Any], ...]  # the records of the epochs before this one
    # Means over the epoch's steps of the other per-step sums a chunk returns (see Hooks);
    # after a resume from a checkpoint written before an engine returned them, over the
    # steps run since.
    train_metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class Schedule(Protocol):
    """The fields of an engine's options that the loop reads."""

    @property
    def epochs(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def chunk_steps(self) -> int: ...  # steps per jitted scan: progress and interrupt granularity
    @property
    def progress(self) -> bool: ...


@dataclasses.dataclass(frozen=True)
class Hooks:
    """What differs between engines.

    ``order(epoch_key) -> (steps, batch)`` example indices of an epoch;
    ``run_chunk(state, order[start:stop], dropout_root, start) -> (state, loss_sum)`` (it may
    donate ``state``; ``loss_sum`` may be a dict of per-step sums with the loss's under
    ``"loss"``, the others' epoch means then reach ``end_epoch`` as ``stats.train_metrics``);
    ``end_epoch(state, stats) -> (state, metrics)`` evaluates and returns the
    engine's fields of the epoch's ``metrics.jsonl`` record (the loop adds ``epoch``,
    ``train_loss`` and ``train_seconds``); ``describe(record)`` is the log line after
    ``epoch N/E``; ``show_loss(mean)`` is the progress bar's postfix.
    """

    order: Callable[[Any], Any]
    run_chunk: Callable[[Any, Any, Any, int], tuple[Any, Any]]
    end_epoch: Callable[[Any, EpochStats], tuple[Any, dict[str, Any]]]
    describe: Callable[[dict[str, Any]], str]
    show_loss: Callable[[float], dict[str, str]]


@dataclasses.dataclass
class Outcome:
    """The state after the loop, every epoch's record, and whether an interrupt stopped it."""

    state: Any
    records: list[dict[str, Any]]
    interrupted: bool
    # Set when the time limit stopped training: {"epoch": epochs trained (a fraction after a
    # mid-epoch stop), "steps": steps trained in all, "epochs": the epochs planned, "seconds":
    # the time counted}.
    time_limit_stop: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.interrupted else 0


@dataclasses.dataclass(frozen=True)
class TimeLimit:
    """Stop training once ``seconds`` since ``started`` (a ``clock()`` value) would be exceeded.

    ``final_evaluations``: how many times ``end_epoch``'s duration the evaluation after the
    stop takes (2: validation, then the test set); before this process has timed an
    ``end_epoch``, ``evaluation_steps`` train steps' worth of time is reserved instead.
    """

    seconds: float
    started: float
    final_evaluations: float = 2.0
    evaluation_steps: float = 0.0


def clock() -> float:
    """The time limit's clock (a module function, so that tests can replace it)."""
    return time.perf_counter()


# Step functions by key (see ``compiled_once``): tests run many tiny trainings in one process.
_COMPILED: dict[Any, Any] = {}


def compiled_once(key: Any, build: Callable[[], Any]) -> Any:
    """``build()``, or what it returned for an equal ``key`` earlier in this process.

    ``key`` must determine everything ``build`` closes over (config, graph, data sizes);
    ``None`` builds afresh.
    """
    if key is None:
        return build()
    if key not in _COMPILED:
        _COMPILED[key] = build()
    return _COMPILED[key]


def log(message: str) -> None:
    """Prints above the progress bars, on the main process only (multi-host)."""
    if jax.process_index() == 0:
        tqdm.write(message)


def run(
    state: Any,
    *,
    hooks: Hooks,
    schedule: Schedule,
    n_steps: int,
    run_dir: Path,
    sharding: Any,
    resume: bool = False,
    stop: StopRequest | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    time_limit: TimeLimit | None = None,
) -> Outcome:
    """Trains ``state`` (a pytree of device arrays with ``sharding``) for ``schedule.epochs``
    epochs of ``n_steps`` steps, or until ``time_limit``.

    ``resume`` continues from the newest complete checkpoint under ``run_dir``; ``stop`` is the
    interruption flag, checked between chunks; ``on_chunk(epoch, step)`` is a test hook called
    after every chunk.
    """
    stop = stop if stop is not None else StopRequest()
    main_process = jax.process_index() == 0
    epochs = schedule.epochs
    chunks = chunk_bounds(n_steps, schedule.chunk_steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = runfiles.Checkpointer(run_dir / runfiles.CHECKPOINTS)
    position: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "loss_sum": 0.0,
        "metric_sums": {},  # absent from older checkpoints: the default then applies
        "records": [],
    }
    if resume:
        state, position = _restore(checkpointer, state, sharding, run_dir, position)
    records: list[dict[str, Any]] = list(position["records"])
    if main_process:
        runfiles.write_metrics(run_dir / runfiles.METRICS, records)
    earlier_stop = position.get("time_limit_stop")
    if earlier_stop is not None and earlier_stop["epochs"] >= epochs:
        # Stopped by its time limit: finished, unless --epochs has grown since.
        checkpointer.close()
        log(f"{run_dir} stopped at its time limit: {_describe_stop(earlier_stop)}")
        return Outcome(state, records, False, earlier_stop)
    budget = _Budget(time_limit, 0.0 if earlier_stop else float(position.get("elapsed", 0.0)))
    budget.chunk_steps = max(b - a for a, b in chunks)

    start_epoch, start_step = int(position["epoch"]), int(position["step"])
    interrupted = False
    limit_stop = None  # also when a finished run resumes with nothing left to train
    for epoch in range(start_epoch, epochs):
        key = epoch_key(schedule.seed, epoch)
        dropout_root = jax.random.fold_in(key, 1)  # disjoint from the order's fold_in(key, 0)
        order = hooks.order(key)
        first_step = start_step if epoch == start_epoch else 0
        # A mid-epoch resume carries the epoch's loss so far, so its record matches a clean run.
        loss_sum = float(position["loss_sum"]) if epoch == start_epoch else 0.0
        metric_sums = dict(position["metric_sums"]) if epoch == start_epoch else {}
        metric_steps = first_step if metric_sums else 0
        loss_steps, trained_steps = first_step, 0
        bar = tqdm(
            total=n_steps,
            initial=first_step,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="step",
            leave=False,
            disable=not (schedule.progress and main_process),
            dynamic_ncols=True,
        )
        t0 = time.perf_counter()
        limit_stop = None
        for start, stop_step in chunks:
            if stop_step <= first_step:
                continue
            chunk_t0 = clock()
            state, chunk_loss = hooks.run_chunk(state, order[start:stop_step], dropout_root, start)
            if isinstance(chunk_loss, dict):
                chunk_loss = dict(chunk_loss)
                for name, value in chunk_loss.items():
                    if name != "loss":
                        metric_sums[name] = metric_sums.get(name, 0.0) + float(value)
                metric_steps += stop_step - start
                chunk_loss = chunk_loss["loss"]
            loss_sum += float(chunk_loss)  # one host sync per chunk: cheap, keeps timing honest
            loss_steps += stop_step - start
            trained_steps += stop_step - start
            bar.update(stop_step - start)
            bar.set_postfix(hooks.show_loss(loss_sum / loss_steps), refresh=False)
            if on_chunk is not None:
                on_chunk(epoch, stop_step)
            budget.step_seconds = (clock() - chunk_t0) / (stop_step - start)
            if stop_step < n_steps and not stop and budget.exhausted():
                limit_stop = budget.stop(
                    epoch + stop_step / n_steps, epoch * n_steps + stop_step, epochs
                )
                break
            if stop and stop_step < n_steps:
                interrupted = True
                mid = {
                    "epoch": epoch,
                    "step": stop_step,
                    "loss_sum": loss_sum,
                    "metric_sums": metric_sums,
                    "records": records,
                    "elapsed": budget.elapsed(),
                }
                checkpointer.save(epoch * n_steps + stop_step, state, mid)
                break
        train_seconds = time.perf_counter() - t0
        bar.close()
        if interrupted:
            break
        train_loss = loss_sum / max(loss_steps, 1)
        means = {name: total / max(metric_steps, 1) for name, total in metric_sums.items()}
        stats = EpochStats(train_loss, trained_steps, train_seconds, tuple(records), means)
        eval_t0 = clock()
        state, metrics = hooks.end_epoch(state, stats)
        budget.eval_seconds = clock() - eval_t0
        done = limit_stop["epoch"] if limit_stop else epoch + 1
        record = {"epoch": done, "train_loss": train_loss, **metrics}
        record["train_seconds"] = train_seconds
        if limit_stop:
            record["steps"] = loss_steps  # of the epoch's n_steps: the limit cut it short
        records.append(record)
        # The checkpoint carries the records; metrics.jsonl may run ahead of a checkpoint that is
        # still being written, never behind it (a resume rewrites it from the checkpoint).
        if limit_stop:
            # Mid-epoch: the position of the stop, from which more --epochs would continue.
            end = {"epoch": epoch, "step": loss_steps, "loss_sum": loss_sum}
            end["metric_sums"] = metric_sums
        else:
            end = {"epoch": epoch + 1, "step": 0, "loss_sum": 0.0, "metric_sums": {}}
            if epoch + 1 < epochs and not stop and budget.exhausted():
                limit_stop = budget.stop(epoch + 1, (epoch + 1) * n_steps, epochs)
        end["records"] = records
        end["elapsed"] = budget.elapsed()
        if limit_stop:
            end["time_limit_stop"] = limit_stop
        checkpointer.save(end["epoch"] * n_steps + end["step"], state, end)
        if main_process:
            runfiles.write_metrics(run_dir / runfiles.METRICS, records)
        log(f"epoch {done:3g}/{epochs}  {hooks.describe(record)}")
        if limit_stop:
            log(f"time limit: {_describe_stop(limit_stop)}")
            break
        if stop:
            interrupted = epoch + 1 < epochs
            break
    checkpointer.close()
    if interrupted:
        print(
            f"interrupted by {stop.signal_name}: checkpoint saved under "
            f"{run_dir / runfiles.CHECKPOINTS}; continue with --resume {run_dir}",
            file=sys.stderr,
        )
    return Outcome(state, records, interrupted, limit_stop)


@dataclasses.dataclass
class _Budget:
    """The time limit's bookkeeping: ``elapsed`` counts from the limit's start, plus the time
    an interrupted run had spent before (``before``); this process's last chunk (its time per
    step; the first includes compilation, which errs early) and last ``end_epoch`` forecast
    the next chunk and the final evaluation."""

    limit: TimeLimit | None
    before: float
    step_seconds: float = 0.0
    chunk_steps: int = 1
    eval_seconds: float | None = None

    def elapsed(self) -> float:
        return self.before + (clock() - self.limit.started if self.limit else 0.0)

    def exhausted(self) -> bool:
        """Whether another chunk and the final evaluation would pass the limit."""
        if self.limit is None:
            return False
        if self.eval_seconds is None:
            evaluation = self.limit.evaluation_steps * self.step_seconds
        else:
            evaluation = self.limit.final_evaluations * self.eval_seconds
        chunk = self.chunk_steps * self.step_seconds
        return self.elapsed() + chunk + evaluation > self.limit.seconds

    def stop(self, epoch: float, steps: int, epochs: int) -> dict[str, Any]:
        return {"epoch": epoch, "steps": steps, "epochs": epochs, "seconds": self.elapsed()}


def _describe_stop(stop: dict[str, Any]) -> str:
    return (
        f"training stopped after {stop['steps']} steps ({stop['epoch']:.3g} of "
        f"{stop['epochs']} epochs), "
        f"{stop['seconds']:.0f} s into the run"
    )


def abstract_like(state: Any, sharding: Any) -> Any:
    """``state``'s shapes and dtypes placed on ``sharding``: what a checkpoint restores into."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)


def _restore(
    checkpointer: runfiles.Checkpointer,
    state: Any,
    sharding: Any,
    run_dir: Path,
    start: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    restored = checkpointer.restore(abstract_like(state, sharding))
    if restored is None:
        log(f"no complete checkpoint under {run_dir}: starting from the beginning")
        return state, start
    state, position = restored
    log(f"resumed from {run_dir} at epoch {position['epoch'] + 1}, step {position['step']}")
    return state, {**start, **position}
