"""The settings of an MNIST run: one frozen dataclass per model, saved as ``config.json``.

``--resume`` rebuilds a config from ``config.json`` by field name, so the fields are the
run directory's format: renaming or removing one breaks the resume of older runs.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

SCHEDULES = ("cosine", "constant")  # LeNet-5's learning-rate schedules


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """Every knob of an MLP run (``python experiments/mnist_mlp.py``)."""

    experiment: ClassVar[str] = "mnist_mlp"  # runs/<experiment>/<timestamp>; not in config.json

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


@dataclasses.dataclass(frozen=True)
class LeNet5Config:
    """Every knob of a LeNet-5 run (``python experiments/mnist_lenet5.py``): the Keras
    tutorial's recipe, except the cosine decay of the learning rate (``schedule``)."""

    experiment: ClassVar[str] = "mnist_lenet5"

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


Config = MLPConfig | LeNet5Config
