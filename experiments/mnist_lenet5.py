"""LeNet-5 on MNIST, as the Keras tutorial builds it, in Flax NNX with optax Adam and jxent.

The tutorial's model: conv 6@5x5 ReLU -> max-pool 2 -> conv 16@5x5 ReLU -> max-pool 2 ->
dense 120 ReLU -> dense 84 ReLU -> dense 10; Adam; sparse categorical cross-entropy; 5 epochs.
Keras defaults are kept where they matter: 'valid' convolutions, Glorot-uniform kernels and
zero biases, Adam(lr=1e-3, eps=1e-7), batch size 32. The one change to the recipe (the
"beaten" part): the learning rate decays to zero on a cosine over the 5 epochs
(``--schedule constant`` restores the tutorial's constant rate).

    python experiments/mnist_lenet5.py
    python experiments/mnist_lenet5.py --resume runs/mnist_lenet5/<timestamp>

Leaves the same run directory as mnist_mlp.py (config, metrics, curves, confusion, mistakes,
checkpoints).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cli
import engine
import jax
import mnist_run
import optax
from data import mnist
from flax import nnx

EXPERIMENT = "mnist_lenet5"


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of a run; saved as ``config.json`` and reloaded by ``--resume``."""

    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    seed: int = 0
    loss: str = "jxent"
    devices: int = 1
    chunk_steps: int = 125
    data_dir: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None


class LeNet5(nnx.Module):
    """The tutorial's LeNet-5 (Keras ``Sequential`` layer for layer)."""

    def __init__(self, *, rngs: nnx.Rngs):
        glorot = nnx.initializers.glorot_uniform()  # Keras' default kernel initialiser
        self.conv1 = nnx.Conv(1, 6, (5, 5), padding="VALID", kernel_init=glorot, rngs=rngs)
        self.conv2 = nnx.Conv(6, 16, (5, 5), padding="VALID", kernel_init=glorot, rngs=rngs)
        self.fc1 = nnx.Linear(16 * 4 * 4, 120, kernel_init=glorot, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, kernel_init=glorot, rngs=rngs)
        self.fc3 = nnx.Linear(84, mnist.NUM_CLASSES, kernel_init=glorot, rngs=rngs)

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits for images ``(B, 28, 28)`` or ``(B, 784)``; LeNet-5 has no dropout."""
        del dropout_key
        x = x.reshape(x.shape[0], 28, 28, 1)
        x = nnx.max_pool(jax.nn.relu(self.conv1(x)), (2, 2), strides=(2, 2))  # 24 -> 12
        x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))  # 8 -> 4
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.fc1(x))
        x = jax.nn.relu(self.fc2(x))
        return self.fc3(x)


@functools.cache
def _compiled_init() -> Any:
    # One compiled initialiser: op-by-op init compiles dozens of tiny programs.
    return nnx.jit(lambda key: LeNet5(rngs=nnx.Rngs(params=key)))


def build_model(config: Config) -> LeNet5:
    """LeNet-5 initialised from ``config.seed`` alone."""
    return _compiled_init()(jax.random.key(config.seed))


SCHEDULES = ("cosine", "constant")


def build_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """Keras' Adam (epsilon 1e-7); its learning rate constant (the tutorial) or cosine-decayed.

    Decaying the rate to zero over the run is the one change to the tutorial's recipe: it
    removes the epoch-to-epoch jitter of constant-rate Adam, so the last epoch is the best.
    """
    if config.schedule == "constant":
        learning_rate: Any = config.learning_rate
    elif config.schedule == "cosine":
        learning_rate = optax.cosine_decay_schedule(
            config.learning_rate, config.epochs * steps_per_epoch
        )
    else:
        raise ValueError(f"schedule {config.schedule!r} is not one of {SCHEDULES}")
    return optax.adam(learning_rate, eps=1e-7)


def train(config: Config, run_dir: Path, **kwargs: Any) -> engine.FitResult:
    """Trains, evaluates and writes every artefact of one run into ``run_dir``.

    ``kwargs``: ``resume``, ``data`` (replaces the MNIST loader), ``progress``, ``stop``,
    ``on_chunk`` and ``plots`` (see ``mnist_run.train``).
    """
    title = f"LeNet-5, {config.loss} loss"
    return mnist_run.train(
        EXPERIMENT,
        config,
        run_dir,
        build_model=build_model,
        build_optimizer=build_optimizer,
        title=title,
        **kwargs,
    )


def make_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(
        description="Train the Keras tutorial's LeNet-5 on MNIST with jxent's cross-entropy.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", "--lr", type=float, default=defaults.learning_rate)
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=defaults.schedule,
        help="learning-rate schedule; `constant` is the Keras tutorial's exact recipe",
    )
    cli.add_run_flags(parser, defaults, EXPERIMENT)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    return cli.run_from_args(EXPERIMENT, Config, make_parser(), argv, train)


if __name__ == "__main__":
    sys.exit(main())
