"""The command line of the five-cluster toy: ``five_clusters.py``.

    python experiments/five_clusters.py            # prints both accuracies, writes the plot

Writes ``decision_boundary.png`` and ``metrics.json`` into ``--out-dir``
(default ``runs/five_clusters/<timestamp>``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from experiments.clusters import configs
from experiments.clusters.train import train_and_evaluate
from experiments.common import cli, runfiles


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Five-cluster toy: the tutorial's recipe versus Adam, with jxent's loss.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=configs.SEED)
    parser.add_argument("--points-per-cluster", type=int, default=configs.POINTS_PER_CLUSTER)
    parser.add_argument("--epochs", type=int, default=configs.EPOCHS)
    parser.add_argument(
        "--out-dir", default=None, help=f"default: runs/{configs.EXPERIMENT}/<timestamp>"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the process exit status."""
    args = make_parser().parse_args(argv)
    train_and_evaluate(
        runfiles.new_run_dir(configs.EXPERIMENT, args.out_dir),
        seed=args.seed,
        n_per_cluster=args.points_per_cluster,
        epochs=args.epochs,
    )
    return 0
