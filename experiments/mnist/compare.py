"""``mnist_mlp.py --compare``: jxent's loss against optax's on the identical MLP.

Both losses train the full recipe (accuracy), then their train steps are timed interleaved
chunk by chunk (images/s); the report goes to ``compare.json`` in the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.common import cli, devices, loop, runfiles
from experiments.common.signals import StopRequest
from experiments.data.mnist import MNIST
from experiments.mnist import input_pipeline, train
from experiments.mnist.configs import MLPConfig
from experiments.mnist.models import build_model


def compare_throughput(config: MLPConfig, data: MNIST, rounds: int) -> dict[str, Any]:
    """Images/s of jxent's and optax's loss on the identical model, measured interleaved.

    Each round runs one epoch per loss, chunk by chunk, alternating the losses chunk by chunk in
    A-B-B-A order, so drifts in machine load hit both equally. Round 0 compiles; not counted.
    """
    mesh = devices.make_mesh(config.devices)
    n_steps = input_pipeline.steps_per_epoch(len(data.train_images), config.batch_size)
    images = jnp.asarray(data.train_images.reshape(len(data.train_images), -1))
    labels = jnp.asarray(data.train_labels)
    order = jax.random.permutation(jax.random.key(config.seed), len(images))
    order = order[: n_steps * config.batch_size].reshape(n_steps, config.batch_size)
    chunks = loop.chunk_bounds(n_steps, config.chunk_steps)
    optimizer = train.build_optimizer(config, n_steps)
    runners = {}
    for loss in train.LOSSES:
        graphdef, params = nnx.split(build_model(config), nnx.Param)
        step_fn = train.make_train_chunk(
            graphdef,
            optimizer,
            train.make_loss(loss, config.label_smoothing),
            mesh,
            config.max_shift,
        )
        runners[loss] = [step_fn, params, optimizer.init(params)]
    seconds: dict[str, float] = {loss: 0.0 for loss in runners}
    per_chunk: dict[str, list[float]] = {loss: [] for loss in runners}
    key = jax.random.key(config.seed + 1)
    for round_index in range(rounds + 1):
        for chunk_index, (start, stop) in enumerate(chunks):
            order_of_losses = list(runners)
            if (round_index + chunk_index) % 2:
                order_of_losses.reverse()
            for loss in order_of_losses:
                step_fn, params, opt_state = runners[loss]
                t0 = time.perf_counter()
                params, opt_state, chunk_loss = step_fn(
                    params, opt_state, images, labels, order[start:stop], key, jnp.int32(start)
                )
                float(chunk_loss)  # wait for the chunk
                elapsed = time.perf_counter() - t0
                runners[loss][1:] = [params, opt_state]
                if round_index:
                    seconds[loss] += elapsed
                    per_chunk[loss].append(elapsed / ((stop - start) * config.batch_size))
    summary: dict[str, Any] = {
        loss: {
            "images_per_second": rounds * n_steps * config.batch_size / seconds[loss],
            "median_images_per_second": 1 / statistics.median(per_chunk[loss]),
            "chunks_timed": len(per_chunk[loss]),
        }
        for loss in runners
    }
    summary["jxent_over_optax"] = (
        summary["jxent"]["median_images_per_second"] / summary["optax"]["median_images_per_second"]
    )
    return summary


def compare(args: argparse.Namespace) -> int:
    """Trains with each loss into ``RUN_DIR/<loss>``, then times both; returns the exit status."""
    config = cli.config_from_args(MLPConfig, args)
    cli.start_jax(args, config.devices)
    run_dir = cli.new_run_dir_everywhere(config.experiment, args)
    stop = StopRequest()
    with stop.installed():
        data = input_pipeline.load_data(config)
        accuracy = {}
        for loss in train.LOSSES:
            loss_config = dataclasses.replace(config, loss=loss)
            t0 = time.perf_counter()
            result = train.train_and_evaluate(
                loss_config, run_dir / loss, data=data, progress=not args.no_progress, stop=stop
            )
            cli.print_summary(
                config.experiment, loss_config, result, run_dir / loss, time.perf_counter() - t0
            )
            if result.interrupted:
                return result.exit_code
            accuracy[loss] = result.records[-1]["test_accuracy"]
        print(f"timing both losses, interleaved chunk by chunk, {args.compare_rounds} epochs each")
        throughput = compare_throughput(config, data, args.compare_rounds)
    report = {"test_accuracy": accuracy, "throughput": throughput}
    if not cli.main_process():
        return 0
    runfiles.write_json_atomic(run_dir / "compare.json", report)
    print(
        f"\ncompare ({config.devices} device(s)):\n"
        + "\n".join(
            f"  {loss:6s} test acc {100 * accuracy[loss]:.2f}%   "
            f"{throughput[loss]['median_images_per_second']:,.0f} images/s (median of "
            f"{throughput[loss]['chunks_timed']} chunks; "
            f"{throughput[loss]['images_per_second']:,.0f} overall)"
            for loss in train.LOSSES
        )
        + f"\n  jxent / optax throughput: {throughput['jxent_over_optax']:.3f}\n"
        f"written to {run_dir / 'compare.json'}"
    )
    return 0
