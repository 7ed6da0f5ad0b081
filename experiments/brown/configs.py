"""The settings of a Brown LM run: ``Config``, saved as ``config.json``, and each model's
defaults.

``--resume`` rebuilds a config from ``config.json`` by field name, so the fields are the
run directory's format: renaming or removing one breaks the resume of older runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

EXPERIMENT = "brown_lm"  # runs/brown_lm/<timestamp>
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
    depth: int = 2
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
    # Minutes of wall time for the run, compilation, training and final evaluation (0: no
    # limit); training stops early enough for the evaluation to fit, the schedule cut off.
    time_limit: float | None = None

    # Runs saved before the time limit existed had none (cli.load_config).
    BEFORE_FIELD: ClassVar[dict[str, Any]] = {"time_limit": 0.0}

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
        assert self.time_limit is not None
        if not self.time_limit >= 0:
            raise ValueError(
                f"time_limit must be >= 0 minutes (0: no limit), got {self.time_limit}"
            )


MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    # Chosen by the test perplexity reached within 20 minutes (experiments/brown/README.md): a
    # 12-epoch cosine schedule cut off at the limit.
    "transformer": dict(
        epochs=12,
        batch_size=32,
        context=64,
        learning_rate=2e-3,
        weight_decay=0.1,
        dropout=0.2,
        time_limit=20.0,
    ),
    "nplm": dict(
        epochs=5,
        batch_size=32,
        context=64,
        learning_rate=2e-3,
        weight_decay=0.0,
        dropout=0.0,
        time_limit=0.0,
    ),
}


def describe(config: Config) -> str:
    """The model in a few words, and the loss (plot titles, summaries)."""
    if config.model == "nplm":
        arch = f"NPLM n={config.order} h={config.hidden} m={config.embed_dim}, direct connections"
    else:
        arch = f"transformer {config.depth}x{config.width}, context {config.context}, tied"
    return f"{arch}, {config.loss} loss"
