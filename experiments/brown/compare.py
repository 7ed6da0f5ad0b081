"""``brown_lm.py --compare``: jxent's fused output layer against optax on the same model.

Trains with each loss in its own process (so each has its own peak RSS), then times the two
train steps interleaved and reads their compiled memory (XLA ``memory_analysis``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.brown import input_pipeline, train
from experiments.brown.configs import Config, describe
from experiments.brown.models import build_model
from experiments.common import devices, runfiles
from experiments.data import brown

# The entry script: each loss trains in a child process of the command users run.
SCRIPT = Path(__file__).resolve().parents[1] / "brown_lm.py"


def compiled_step_memory(config: Config, corpus: brown.Corpus, loss: str) -> dict[str, int]:
    """XLA's ``memory_analysis`` of one compiled train step (temp, argument, output bytes)."""
    config = dataclasses.replace(config, loss=loss)
    n_steps = input_pipeline.steps_per_epoch(corpus.train.stop, config.batch_size, config.context)
    graphdef, params = nnx.split(build_model(config, corpus.vocab_size), nnx.Param)
    optimizer = train.build_optimizer(config, n_steps)
    step = jax.jit(
        train.make_train_step(
            graphdef,
            optimizer,
            train.make_loss(loss, config.label_smoothing, config.z_loss, config.loss_chunk or None),
        ),
        donate_argnums=(0, 1),
    )
    windows = jax.ShapeDtypeStruct((config.batch_size, config.context + 1), jax.numpy.int32)
    analysis = step.lower(params, optimizer.init(params), windows, jax.random.key(0)).compile()
    memory = analysis.memory_analysis()
    return {
        "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
    }


def interleaved_step_times(
    config: Config, corpus: brown.Corpus, rounds: int, steps: int | None = None
) -> dict[str, Any]:
    """Seconds per train step of each loss, timed in alternating order (A-B, B-A, ...).

    Each round times one chunk of steps per loss; round 0 compiles and is not counted.
    """
    mesh = devices.make_mesh(config.devices)
    tokens = jnp.asarray(corpus.ids[corpus.train])
    permute = input_pipeline.make_permute(len(tokens), config.batch_size, config.context)
    order = permute(jax.random.key(config.seed))
    steps = min(steps or config.chunk_steps, order.shape[0])
    runners: dict[str, list[Any]] = {}
    for loss in train.LOSSES:
        cfg = dataclasses.replace(config, loss=loss)
        graphdef, params = nnx.split(build_model(cfg, corpus.vocab_size), nnx.Param)
        optimizer = train.build_optimizer(cfg, order.shape[0])
        chunk = train.make_train_chunk(
            graphdef,
            optimizer,
            train.make_loss(loss, chunk=cfg.loss_chunk or None),
            mesh,
            cfg.context,
        )
        runners[loss] = [chunk, params, optimizer.init(params)]
    times: dict[str, list[float]] = {loss: [] for loss in runners}
    key = jax.random.key(1)
    for index in range(rounds + 1):
        losses = list(runners) if index % 2 == 0 else list(reversed(runners))
        for loss in losses:
            chunk, params, opt_state = runners[loss]
            t0 = time.perf_counter()
            params, opt_state, total = chunk(
                params, opt_state, tokens, order[:steps], key, jnp.int32(0)
            )
            float(total["loss"])
            if index:
                times[loss].append((time.perf_counter() - t0) / steps)
            runners[loss][1:] = [params, opt_state]
    median = {loss: statistics.median(t) for loss, t in times.items()}
    return {
        "median_step_seconds": median,
        "jxent_over_optax": median["jxent"] / median["optax"],
        "rounds": rounds,
        "steps_per_round": steps,
    }


def compare(config: Config, args: argparse.Namespace, run_dir: Path) -> int:
    """Trains with each loss in its own process (for its peak RSS), then times and sizes the
    train steps of both in this one."""
    results = {}
    for loss in train.LOSSES:
        out = run_dir / loss
        command = [sys.executable, str(SCRIPT), "--out-dir", str(out), "--loss", loss]
        command += config_flags(config, skip={"loss"})
        if args.no_progress:
            command.append("--no-progress")
        print(f"compare: training with the {loss} loss -> {out}")
        status = subprocess.run(command, check=False).returncode
        if status:
            return status
        results[loss] = runfiles.read_json(out / "results.json")
    corpus = input_pipeline.load_corpus(config)
    print(f"compare: timing the train steps interleaved ({args.compare_rounds} rounds)")
    timing = interleaved_step_times(config, corpus, args.compare_rounds, args.compare_steps)
    memory = {loss: compiled_step_memory(config, corpus, loss) for loss in train.LOSSES}
    report = {
        "test_perplexity": {k: v["test_perplexity"] for k, v in results.items()},
        "peak_rss_bytes": {k: v["peak_rss_bytes"] for k, v in results.items()},
        "train_step_memory": memory,
        "step_time": timing,
    }
    runfiles.write_json_atomic(run_dir / "compare.json", report)
    print(f"\ncompare ({describe(config)}):")
    for loss in train.LOSSES:
        print(
            f"  {loss:6s} test ppl {results[loss]['test_perplexity']:8.2f}   step "
            f"{1e3 * timing['median_step_seconds'][loss]:7.1f} ms   train-step temp "
            f"{memory[loss]['temp_bytes'] / 2**20:8.1f} MiB   peak RSS "
            f"{results[loss]['peak_rss_bytes'] / 2**20:7.0f} MiB"
        )
    print(f"  jxent / optax step time: {timing['jxent_over_optax']:.3f}")
    print(f"written to {run_dir / 'compare.json'}")
    return 0


def config_flags(config: Config, skip: set[str]) -> list[str]:
    """``config`` as command-line flags (for the --compare child processes)."""
    flags = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in skip or value is None:
            continue
        flags += [f"--{field.name.replace('_', '-')}", str(value)]
    return flags
