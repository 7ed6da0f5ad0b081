"""The command line of the Brown example, ``brown_lm.py``: Bengio et al.'s neural language
model, and a small transformer, on the Brown corpus.

    python experiments/brown_lm.py                    # the default: a small causal transformer
    python experiments/brown_lm.py --model nplm       # Bengio et al. (2003)'s MLP, n=5 h=50 m=60
    python experiments/brown_lm.py --loss optax       # same model, optax on materialised logits
    python experiments/brown_lm.py --compare          # both losses: perplexity, time, memory
    python experiments/brown_lm.py --resume runs/brown_lm/<timestamp> [--epochs N]
    python experiments/brown_lm.py --ensemble RUN_DIR RUN_DIR   # a mixture of finished runs

The corpus is split and numbered as in the paper (``experiments/data/brown.py``). The output
softmax over the 14,114-word vocabulary goes through ``jxent.fused_linear_cross_entropy``. Leaves
``config.json``, ``metrics.jsonl``, ``results.json``, ``curves.png`` and ``checkpoints/`` in
the run directory; Ctrl-C saves a checkpoint and exits with status 130; a kill at any instant
leaves a run that ``--resume`` completes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from experiments.brown import compare, ensemble, train
from experiments.brown.configs import EXPERIMENT, MODEL_DEFAULTS, MODELS, Config, describe
from experiments.common import cli, devices, runfiles
from experiments.common.signals import StopRequest


def make_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(
        description="Train a language model on the Brown corpus with jxent's fused "
        "linear + cross-entropy output layer.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--model", choices=MODELS, default=defaults.model)
    for name, kind in (
        ("epochs", int),
        ("batch_size", int),
        ("context", int),
        ("learning_rate", float),
        ("weight_decay", float),
        ("dropout", float),
    ):
        per_model = ", ".join(f"{m} {MODEL_DEFAULTS[m][name]}" for m in MODELS)
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=None, help=f"default: {per_model}"
        )
    for name in (
        "warmup_steps",
        "width",
        "depth",
        "heads",
        "order",
        "hidden",
        "embed_dim",
        "chunk_steps",
        "loss_chunk",
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name)
        )
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    parser.add_argument("--z-loss", type=float, default=defaults.z_loss)
    parser.add_argument(
        "--eval-stride",
        type=int,
        default=None,
        help="words scored per evaluation window (default: context/2 for the transformer, "
        "context-n+1 for the NPLM)",
    )
    parser.add_argument(
        "--time-limit",
        metavar="MINUTES",
        type=float,
        default=None,
        help="stop training when the run (compilation, training and the final evaluation) "
        "would pass this many minutes of wall time, the learning-rate schedule planned for "
        "--epochs cut off; then evaluate as at the end of a run (default: 20 for the "
        "transformer, 0 = no limit for the NPLM)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--loss", choices=train.LOSSES, default=defaults.loss)
    parser.add_argument(
        "--devices", type=int, default=defaults.devices, help="data-parallel device count"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="Brown cache (default: $JXENT_BROWN_DIR or ~/.cache/jxent/brown)",
    )
    parser.add_argument(
        "--out-dir", default=None, help=f"run directory (default: runs/{EXPERIMENT}/<timestamp>)"
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR from its newest checkpoint; --epochs N extends it; "
        "other flags must match its config.json",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="train with jxent and with optax, then time and size both train steps",
    )
    parser.add_argument(
        "--compare-rounds", type=int, default=10, help="timed rounds per loss for --compare"
    )
    parser.add_argument("--compare-steps", type=int, default=10, help="train steps per timed round")
    parser.add_argument(
        "--ensemble",
        nargs="+",
        metavar="RUN_DIR",
        default=None,
        help="print the validation and test perplexity of the mixture (mean probability) of "
        "these finished runs; with --out-dir, also write ensemble.json there",
    )
    cli.add_multi_process_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.distributed and (args.ensemble or args.compare):
        parser.error("--distributed trains one run; --ensemble and --compare run in one process")
    if args.distributed:
        config, run_dir, resume = cli.start_or_resume_everywhere(
            EXPERIMENT, Config, parser, argv, args
        )
        return train_and_report(args, config, run_dir, resume)
    devices.set_cpu_device_count(args.devices)
    if args.ensemble:
        try:
            return ensemble.main(args.ensemble, args.data_dir, args.out_dir)
        except ValueError as err:
            parser.error(str(err))
    if args.compare:
        config = cli.config_from_args(Config, args)
        return compare.compare(config, args, runfiles.new_run_dir(EXPERIMENT, args.out_dir))
    config, run_dir, resume = cli.start_or_resume(EXPERIMENT, Config, parser, argv, args)
    return train_and_report(args, config, run_dir, resume)


def train_and_report(args: argparse.Namespace, config: Config, run_dir: Path, resume: bool) -> int:
    """Trains (or resumes) the run and prints its summary; returns the exit status."""
    t0 = time.perf_counter()
    stop = StopRequest()
    try:
        with stop.installed():
            result = train.train_and_evaluate(
                config, run_dir, resume=resume, progress=not args.no_progress, stop=stop
            )
    except Exception as err:
        cli.explain_failure(args, run_dir)(err)
        raise
    if not result.interrupted and cli.main_process():
        best = min(result.records, key=lambda r: r["valid_perplexity"])
        limited = result.time_limit_stop
        print(
            f"\n{EXPERIMENT}: test perplexity {result.test_perplexity:.2f} (best valid "
            f"{best['valid_perplexity']:.2f} at epoch {best['epoch']:.3g}); "
            f"{time.perf_counter() - t0:.0f} s wall; {describe(config)}\n"
            + (
                ""
                if limited is None
                else f"stopped at the {config.time_limit:g}-minute time limit after "
                f"{limited['steps']} steps ({limited['epoch']:.3g} of {config.epochs} epochs)\n"
            )
            + f"run directory: {run_dir}"
        )
    return result.exit_code
