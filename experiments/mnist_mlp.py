"""MNIST with a Flax NNX MLP, optax AdamW and jxent's cross-entropy.

    python experiments/mnist_mlp.py                      # 784-512-512-10, dropout, ~98.9 %
    python experiments/mnist_mlp.py --hidden 1024        # the classic 784-1024-10
    python experiments/mnist_mlp.py --loss optax         # same model, optax's loss
    python experiments/mnist_mlp.py --compare            # both losses, accuracy and images/s
    python experiments/mnist_mlp.py --devices 8          # data parallel (8 CPU devices on CPU)
    python experiments/mnist_mlp.py --resume runs/mnist_mlp/<timestamp>

Leaves ``config.json``, ``metrics.jsonl``, ``curves.png``, ``confusion.png``, ``mistakes.png``
and ``checkpoints/`` in the run directory. Ctrl-C saves a checkpoint and exits with status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cli
import devices
import engine
import jax
import loop
import losses
import mnist_run
import optax
import runfiles
from data import mnist
from flax import nnx
from signals import StopRequest

EXPERIMENT = "mnist_mlp"


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of a run; saved as ``config.json`` and reloaded by ``--resume``."""

    epochs: int = 12
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    hidden: tuple[int, ...] = (512, 512)
    dropout: float = 0.2
    label_smoothing: float = 0.0
    max_shift: int = 2
    seed: int = 0
    loss: str = "jxent"
    devices: int = 1
    chunk_steps: int = 40
    data_dir: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None


class MLP(nnx.Module):
    """784 -> hidden... -> 10 with ReLU and dropout after every hidden layer."""

    def __init__(self, hidden: Sequence[int], dropout: float, *, rngs: nnx.Rngs):
        sizes = (28 * 28, *hidden)
        self.layers = nnx.List(
            [nnx.Linear(n_in, n_out, rngs=rngs) for n_in, n_out in itertools.pairwise(sizes)]
        )
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(sizes[-1], mnist.NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits for images ``(B, 28, 28)`` or ``(B, 784)``; dropout iff a key is given."""
        x = x.reshape(x.shape[0], -1)
        if dropout_key is None:
            keys: Sequence[jax.Array | None] = [None] * len(self.layers)
        else:
            keys = list(jax.random.split(dropout_key, len(self.layers)))
        for layer, key in zip(self.layers, keys, strict=True):
            x = self.dropout(jax.nn.relu(layer(x)), deterministic=key is None, rngs=key)
        return self.head(x)


@functools.cache
def _compiled_init(hidden: tuple[int, ...], dropout: float) -> Any:
    # One compiled initialiser per architecture: op-by-op init compiles dozens of tiny programs.
    return nnx.jit(lambda key: MLP(hidden, dropout, rngs=nnx.Rngs(params=key)))


def build_model(config: Config) -> MLP:
    """The MLP, initialised from ``config.seed`` alone."""
    return _compiled_init(config.hidden, config.dropout)(jax.random.key(config.seed))


def build_optimizer(config: Config, steps_per_epoch: int) -> Any:
    """AdamW with linear warmup then cosine decay to zero over the whole run."""

    total = config.epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=min(int(config.warmup_epochs * steps_per_epoch), total // 2),
        decay_steps=total,
        end_value=0.0,
    )
    return optax.adamw(schedule, weight_decay=config.weight_decay)


def train(config: Config, run_dir: Path, **kwargs: Any) -> engine.FitResult:
    """Trains, evaluates and writes every artefact of one run into ``run_dir``.

    ``kwargs``: ``resume``, ``data`` (replaces the MNIST loader), ``progress``, ``stop``,
    ``on_chunk`` and ``plots`` (see ``mnist_run.train``).
    """
    title = f"MLP {'-'.join(map(str, (784, *config.hidden, 10)))}, {config.loss} loss"
    return mnist_run.train(
        EXPERIMENT,
        config,
        run_dir,
        build_model=build_model,
        build_optimizer=build_optimizer,
        title=title,
        **kwargs,
    )


def compare_throughput(config: Config, data: mnist.MNIST, rounds: int) -> dict[str, Any]:
    """Images/s of jxent's and optax's loss on the identical model, measured interleaved.

    Each round runs one epoch per loss, chunk by chunk, alternating the losses chunk by chunk in
    A-B-B-A order, so drifts in machine load hit both equally. Round 0 compiles; not counted.
    """
    import jax.numpy as jnp

    mesh = devices.make_mesh(config.devices)
    n_steps = engine.steps_per_epoch(len(data.train_images), config.batch_size)
    images = jnp.asarray(data.train_images.reshape(len(data.train_images), -1))
    labels = jnp.asarray(data.train_labels)
    order = jax.random.permutation(jax.random.key(config.seed), len(images))
    order = order[: n_steps * config.batch_size].reshape(n_steps, config.batch_size)
    chunks = loop.chunk_bounds(n_steps, config.chunk_steps)
    optimizer = build_optimizer(config, n_steps)
    runners = {}
    for loss in losses.LOSSES:
        graphdef, params = nnx.split(build_model(config), nnx.Param)
        step_fn = engine.make_train_chunk(
            graphdef,
            optimizer,
            losses.make_loss(loss, config.label_smoothing),
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


def make_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(
        description="Train a Flax NNX MLP on MNIST with jxent's cross-entropy.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", "--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    parser.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=list(defaults.hidden),
        help="hidden layer sizes; `--hidden 1024` is the classic 784-1024-10",
    )
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    parser.add_argument(
        "--max-shift",
        type=int,
        default=defaults.max_shift,
        help="augment by random translations of up to this many pixels (0: off)",
    )
    cli.add_run_flags(parser, defaults, EXPERIMENT)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="train with jxent and with optax, then time both losses interleaved",
    )
    parser.add_argument(
        "--compare-rounds", type=int, default=10, help="interleaved epochs per loss for --compare"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if not args.compare:
        return cli.run_from_args(EXPERIMENT, Config, parser, argv, train)
    config = cli.config_from_args(Config, args)
    cli.start_jax(args, config.devices)
    run_dir = cli.new_run_dir_everywhere(EXPERIMENT, args)
    stop = StopRequest()
    with stop.installed():
        data = mnist.load_dataset(config.data_dir, config.train_limit, config.test_limit)
        accuracy = {}
        for loss in losses.LOSSES:
            loss_config = dataclasses.replace(config, loss=loss)
            t0 = time.perf_counter()
            result = train(
                loss_config, run_dir / loss, data=data, progress=not args.no_progress, stop=stop
            )
            cli.print_summary(
                EXPERIMENT, loss_config, result, run_dir / loss, time.perf_counter() - t0
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
            for loss in losses.LOSSES
        )
        + f"\n  jxent / optax throughput: {throughput['jxent_over_optax']:.3f}\n"
        f"written to {run_dir / 'compare.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
