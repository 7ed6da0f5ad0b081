"""One MNIST run, shared by ``mnist_mlp.py`` and ``mnist_lenet5.py``: data, config file, fit, plots.

The scripts differ in their model, optimizer and flags; everything a run does with them is here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import engine
import jax
import losses
import runfiles
from data import mnist
from plots import write_plots
from signals import StopRequest


def train(
    experiment: str,
    config: Any,
    run_dir: Path,
    *,
    build_model: Callable[[Any], Any],
    build_optimizer: Callable[[Any, int], Any],
    title: str,
    resume: bool = False,
    data: mnist.MNIST | None = None,
    progress: bool = True,
    stop: StopRequest | None = None,
    on_chunk: Any = None,
    plots: bool = True,
) -> engine.FitResult:
    """Trains ``config`` (a script's dataclass), evaluates and writes every artefact of the run.

    ``data`` replaces the MNIST loader (tests); ``plots=False`` skips the PNGs (tests);
    ``stop``/``on_chunk`` are the interruption flag and a per-chunk hook (see ``engine.fit``).
    The config's optional ``label_smoothing`` applies to training only, its ``max_shift`` is
    the translation augmentation.
    """
    if data is None:
        data = mnist.load_dataset(config.data_dir, config.train_limit, config.test_limit)
    runfiles.ensure_config(run_dir, config)
    n_steps = engine.steps_per_epoch(len(data.train_images), config.batch_size)
    result = engine.fit(
        model=build_model(config),
        optimizer=build_optimizer(config, n_steps),
        loss_fn=losses.make_loss(config.loss, getattr(config, "label_smoothing", 0.0)),
        eval_loss_fn=losses.make_loss(config.loss),
        data=data,
        options=engine.FitOptions(
            epochs=config.epochs,
            batch_size=config.batch_size,
            seed=config.seed,
            devices=config.devices,
            chunk_steps=config.chunk_steps,
            max_shift=getattr(config, "max_shift", 0),
            progress=progress,
        ),
        run_dir=run_dir,
        resume=resume,
        stop=stop,
        on_chunk=on_chunk,
        cache_key=(experiment, config),
    )
    if plots and not result.interrupted and jax.process_index() == 0:
        write_plots(run_dir, result, data, title)
    return result
