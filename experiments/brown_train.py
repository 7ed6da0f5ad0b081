"""Brown LM training: the config, the models and optimizer it builds, and one run's files.

``train`` is what ``brown_lm.py`` runs; tests and ``brown_compare`` call it directly.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

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
    batch_size: int | None = None
    context: int | None = None
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
        for name, value in MODEL_DEFAULTS[self.model].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.eval_stride is None:
            # The NPLM needs only order - 1 words of context: score windows nearly end to end.
            assert self.context is not None
            stride = (
                self.context // 2 if self.model == "transformer" else self.context - self.order + 1
            )
            object.__setattr__(self, "eval_stride", stride)


MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "transformer": dict(
        epochs=5, batch_size=8, context=128, learning_rate=2e-3, weight_decay=0.1, dropout=0.1
    ),
    "nplm": dict(
        epochs=5, batch_size=32, context=64, learning_rate=2e-3, weight_decay=0.0, dropout=0.0
    ),
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
    runfiles.ensure_config(run_dir, config)
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
