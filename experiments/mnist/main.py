"""The command lines of the MNIST example: ``mnist_mlp.py`` and ``mnist_lenet5.py``.

    python experiments/mnist_mlp.py                      # 784-512-512-10, dropout, ~98.9 %
    python experiments/mnist_mlp.py --hidden 1024        # the classic 784-1024-10
    python experiments/mnist_mlp.py --loss optax         # same model, optax's loss
    python experiments/mnist_mlp.py --compare            # both losses, accuracy and images/s
    python experiments/mnist_mlp.py --devices 8          # data parallel (8 CPU devices on CPU)
    python experiments/mnist_mlp.py --resume runs/mnist_mlp/<timestamp>
    python experiments/mnist_lenet5.py                   # the Keras tutorial's LeNet-5
    python experiments/mnist_lenet5.py --resume runs/mnist_lenet5/<timestamp>

Leaves ``config.json``, ``metrics.jsonl``, ``curves.png``, ``confusion.png``, ``mistakes.png``
and ``checkpoints/`` in the run directory. Ctrl-C saves a checkpoint and exits with status 130.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from experiments.common import cli
from experiments.mnist import compare, train
from experiments.mnist.configs import SCHEDULES, LeNet5Config, MLPConfig

MODELS = {"mlp": MLPConfig, "lenet5": LeNet5Config}


def make_parser(model: str = "mlp") -> argparse.ArgumentParser:
    """The flags of ``mnist_<model>.py``, their defaults those of the model's config."""
    if model == "mlp":
        return mlp_parser()
    if model == "lenet5":
        return lenet5_parser()
    raise ValueError(f"model {model!r} is not one of {tuple(MODELS)}")


def mlp_parser() -> argparse.ArgumentParser:
    defaults = MLPConfig()
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
    cli.add_run_flags(parser, defaults, defaults.experiment)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="train with jxent and with optax, then time both losses interleaved",
    )
    parser.add_argument(
        "--compare-rounds", type=int, default=10, help="interleaved epochs per loss for --compare"
    )
    return parser


def lenet5_parser() -> argparse.ArgumentParser:
    defaults = LeNet5Config()
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
    cli.add_run_flags(parser, defaults, defaults.experiment)
    return parser


def main(argv: Sequence[str] | None = None, *, model: str = "mlp") -> int:
    """The command line of ``mnist_<model>.py``; returns the process exit status."""
    parser = make_parser(model)
    args = parser.parse_args(argv)
    if getattr(args, "compare", False):
        return compare.compare(args)
    config_cls = MODELS[model]
    return cli.run_from_args(
        config_cls.experiment, config_cls, parser, argv, train.train_and_evaluate
    )
