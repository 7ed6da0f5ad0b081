"""Bengio et al.'s neural language model, and a small transformer, on the Brown corpus.

    python experiments/brown_lm.py                    # the default: a small causal transformer
    python experiments/brown_lm.py --model nplm       # Bengio et al. (2003)'s MLP, n=5 h=50 m=60
    python experiments/brown_lm.py --loss optax       # same model, optax on materialised logits
    python experiments/brown_lm.py --compare          # both losses: perplexity, time, memory
    python experiments/brown_lm.py --resume runs/brown_lm/<timestamp> [--epochs N]

The corpus is split and numbered as in the paper (``data/brown.py``). The output softmax over
the 14,114-word vocabulary goes through ``jxent.fused_linear_cross_entropy``. Leaves
``config.json``, ``metrics.jsonl``, ``results.json``, ``curves.png`` and ``checkpoints/`` in
the run directory; Ctrl-C saves a checkpoint and exits with status 130; a kill at any instant
leaves a run that ``--resume`` completes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cli
import devices
import jax
import lm_engine
import lm_models
import optax
import plots
import runfiles
from data import brown
from flax import nnx
from signals import StopRequest

EXPERIMENT = "brown_lm"
MODELS = ("transformer", "nplm")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of a run; saved as ``config.json`` and reloaded by ``--resume``.

    ``None`` means the model's own default (see ``MODEL_DEFAULTS``).
    """

    model: str = "transformer"
    epochs: int | None = None
    batch_size: int = 32
    context: int = 64
    learning_rate: float | None = None
    weight_decay: float | None = None
    warmup_steps: int = 200
    dropout: float | None = None
    # transformer
    width: int = 192
    depth: int = 3
    heads: int = 4
    # nplm (Bengio et al.'s n, h and m)
    order: int = 5
    hidden: int = 50
    embed_dim: int = 60
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    # Tokens per block of jxent's fused output layer (0: jxent's own choice, one block of the
    # whole 2048-token batch at the default shapes; 512 holds less memory but runs slower).
    loss_chunk: int = 0
    eval_stride: int | None = None
    seed: int = 0
    loss: str = "jxent"
    devices: int = 1
    chunk_steps: int = 39
    data_dir: str | None = None

    def __post_init__(self) -> None:
        # Fill every None with the model's default, so a saved config.json is explicit.
        if self.model not in MODELS:
            raise ValueError(f"model {self.model!r} is not one of {MODELS}")
        defaults = dict(MODEL_DEFAULTS[self.model])
        # The NPLM needs only order - 1 words of context: score windows nearly end to end.
        defaults["eval_stride"] = (
            self.context // 2 if self.model == "transformer" else self.context - self.order + 1
        )
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)


MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "transformer": dict(epochs=5, learning_rate=2e-3, weight_decay=0.1, dropout=0.25),
    "nplm": dict(epochs=5, learning_rate=2e-3, weight_decay=0.0, dropout=0.0),
}


def build_model(config: Config, vocab_size: int) -> nnx.Module:
    """The model, initialised from ``config.seed`` alone (one compiled initialiser per shape)."""
    return _compiled_init(config, vocab_size)(jax.random.key(config.seed))


@functools.cache
def _compiled_init(config: Config, vocab_size: int) -> Any:
    def init(key: jax.Array) -> nnx.Module:
        rngs = nnx.Rngs(params=key)
        if config.model == "nplm":
            return lm_models.NPLM(
                vocab_size,
                order=config.order,
                embed_dim=config.embed_dim,
                hidden=config.hidden,
                dropout=config.dropout or 0.0,
                rngs=rngs,
            )
        return lm_models.Transformer(
            vocab_size,
            context=config.context,
            width=config.width,
            depth=config.depth,
            heads=config.heads,
            dropout=config.dropout or 0.0,
            rngs=rngs,
        )

    return nnx.jit(init)


def build_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW (no decay on biases and norms), warmup then cosine to zero at the run's end.

    A schedule that ends with the run matters more than any other knob here: stopped while the
    learning rate is still high, the same network is tens of perplexity points worse.
    """
    assert config.epochs is not None and config.learning_rate is not None
    total = config.epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=min(config.warmup_steps, total // 2),
        decay_steps=total,
        end_value=0.0,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=config.weight_decay or 0.0, mask=decay_mask),
    )


def lm_options(config: Config, progress: bool) -> lm_engine.LMOptions:
    assert config.epochs is not None and config.eval_stride is not None
    return lm_engine.LMOptions(
        epochs=config.epochs,
        batch_size=config.batch_size,
        context=config.context,
        seed=config.seed,
        loss=config.loss,
        label_smoothing=config.label_smoothing,
        z_loss=config.z_loss,
        loss_chunk=config.loss_chunk or None,
        devices=config.devices,
        chunk_steps=config.chunk_steps,
        eval_stride=config.eval_stride,
        progress=progress,
    )


def train(
    config: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    corpus: brown.Corpus | None = None,
    progress: bool = True,
    stop: StopRequest | None = None,
    on_chunk: Any = None,
    plots_too: bool = True,
) -> lm_engine.LMResult:
    """Trains, evaluates and writes every artefact of one run into ``run_dir``.

    ``corpus`` replaces the Brown loader (tests); ``plots_too=False`` skips the PNG.
    """
    if corpus is None:
        corpus = brown.load_brown(config.data_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / runfiles.CONFIG).exists():
        runfiles.write_json_atomic(run_dir / runfiles.CONFIG, dataclasses.asdict(config))
    options = lm_options(config, progress)
    n_steps = lm_engine.steps_per_epoch(corpus.train.stop, config.batch_size, config.context)
    t0 = time.perf_counter()
    result = lm_engine.fit(
        model=build_model(config, corpus.vocab_size),
        optimizer=build_optimizer(config, n_steps),
        corpus=corpus,
        options=options,
        run_dir=run_dir,
        resume=resume,
        stop=stop,
        on_chunk=on_chunk,
        cache_key=(EXPERIMENT, config, corpus.vocab_size),
    )
    if result.interrupted or jax.process_index() != 0:
        return result
    best = min(result.records, key=lambda r: r["valid_perplexity"])
    runfiles.write_json_atomic(
        run_dir / "results.json",
        {
            "test_perplexity": result.test_perplexity,
            "best_epoch": best["epoch"],
            "best_valid_perplexity": best["valid_perplexity"],
            "vocab_size": corpus.vocab_size,
            "test_words": corpus.test.stop - corpus.test.start,
            "train_seconds": sum(r["train_seconds"] for r in result.records),
            "wall_seconds_this_process": time.perf_counter() - t0,
            "peak_rss_bytes": lm_engine.peak_rss_bytes(),
            "sample": result.sample,
        },
    )
    if plots_too:
        plots.plot_perplexity(result.records, run_dir / "curves.png", describe(config))
    return result


def describe(config: Config) -> str:
    if config.model == "nplm":
        arch = f"NPLM n={config.order} h={config.hidden} m={config.embed_dim}, direct connections"
    else:
        arch = f"transformer {config.depth}x{config.width}, context {config.context}, tied"
    return f"{arch}, {config.loss} loss"


# --------------------------------------------------------------------------------------------
# --compare: both losses, same model.


def compiled_step_memory(config: Config, corpus: brown.Corpus, loss: str) -> dict[str, int]:
    """XLA's ``memory_analysis`` of one compiled train step (temp, argument, output bytes)."""
    config = dataclasses.replace(config, loss=loss)
    n_steps = lm_engine.steps_per_epoch(corpus.train.stop, config.batch_size, config.context)
    graphdef, params = nnx.split(build_model(config, corpus.vocab_size), nnx.Param)
    optimizer = build_optimizer(config, n_steps)
    step = jax.jit(
        lm_engine.make_train_step(
            graphdef,
            optimizer,
            lm_engine.make_loss(
                loss, config.label_smoothing, config.z_loss, config.loss_chunk or None
            ),
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
    import statistics

    import jax.numpy as jnp

    mesh = devices.make_mesh(config.devices)
    tokens = jnp.asarray(corpus.ids[corpus.train])
    permute = lm_engine.make_permute(len(tokens), config.batch_size, config.context)
    order = permute(jax.random.key(config.seed))
    steps = min(steps or config.chunk_steps, order.shape[0])
    runners: dict[str, list[Any]] = {}
    for loss in lm_engine.LOSSES:
        cfg = dataclasses.replace(config, loss=loss)
        graphdef, params = nnx.split(build_model(cfg, corpus.vocab_size), nnx.Param)
        optimizer = build_optimizer(cfg, order.shape[0])
        chunk = lm_engine.make_train_chunk(
            graphdef,
            optimizer,
            lm_engine.make_loss(loss, chunk=cfg.loss_chunk or None),
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
            float(total)
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
    import subprocess

    results = {}
    for loss in lm_engine.LOSSES:
        out = run_dir / loss
        command = [sys.executable, __file__, "--out-dir", str(out), "--loss", loss]
        command += config_flags(config, skip={"loss"})
        if args.no_progress:
            command.append("--no-progress")
        print(f"compare: training with the {loss} loss -> {out}")
        status = subprocess.run(command, check=False).returncode
        if status:
            return status
        results[loss] = runfiles.read_json(out / "results.json")
    corpus = brown.load_brown(config.data_dir)
    print(f"compare: timing the train steps interleaved ({args.compare_rounds} rounds)")
    timing = interleaved_step_times(config, corpus, args.compare_rounds, args.compare_steps)
    memory = {loss: compiled_step_memory(config, corpus, loss) for loss in lm_engine.LOSSES}
    report = {
        "test_perplexity": {k: v["test_perplexity"] for k, v in results.items()},
        "peak_rss_bytes": {k: v["peak_rss_bytes"] for k, v in results.items()},
        "train_step_memory": memory,
        "step_time": timing,
    }
    runfiles.write_json_atomic(run_dir / "compare.json", report)
    print(f"\ncompare ({describe(config)}):")
    for loss in lm_engine.LOSSES:
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


# --------------------------------------------------------------------------------------------
# Command line.


def make_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(
        description="Train a language model on the Brown corpus with jxent's fused "
        "linear + cross-entropy output layer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", choices=MODELS, default=defaults.model)
    for name, kind in (
        ("epochs", int),
        ("learning_rate", float),
        ("weight_decay", float),
        ("dropout", float),
    ):
        per_model = ", ".join(f"{m} {MODEL_DEFAULTS[m][name]}" for m in MODELS)
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=None, help=f"default: {per_model}"
        )
    for name in (
        "batch_size",
        "context",
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
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--loss", choices=lm_engine.LOSSES, default=defaults.loss)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    devices.set_cpu_device_count(args.devices)
    if args.compare:
        config = cli.config_from_args(Config, args)
        return compare(config, args, runfiles.new_run_dir(EXPERIMENT, args.out_dir))
    config, run_dir, resume = cli.start_or_resume(EXPERIMENT, Config, parser, argv, args)
    t0 = time.perf_counter()
    stop = StopRequest()
    with stop.installed():
        result = train(config, run_dir, resume=resume, progress=not args.no_progress, stop=stop)
    if not result.interrupted:
        best = min(result.records, key=lambda r: r["valid_perplexity"])
        print(
            f"\n{EXPERIMENT}: test perplexity {result.test_perplexity:.2f} (best valid "
            f"{best['valid_perplexity']:.2f} at epoch {best['epoch']}); "
            f"{time.perf_counter() - t0:.0f} s wall; {describe(config)}\n"
            f"run directory: {run_dir}"
        )
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
