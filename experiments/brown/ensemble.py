"""``brown_lm.py --ensemble RUN_DIR ...``: the perplexity of a mixture of finished runs.

The mixture predicts each word with the mean of the runs' probabilities, as Bengio et al. mixed
their network with a trigram for their best result. Its log-probability of a word is
``logsumexp_k(log p_k) - log M``, formed with jxent from the per-word cross-entropy of each
run's best parameters (the ones its ``results.json`` reports). Runs may differ in model,
context and evaluation stride: each scores every word of a split once, in order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jxent
from experiments.brown import input_pipeline, train
from experiments.brown.configs import Config
from experiments.brown.models import build_model
from experiments.common import devices, loop, runfiles
from experiments.data import brown

SPLITS = ("valid", "test")


def check_run_dir(run_dir: Path) -> None:
    """Raises ``ValueError`` naming ``run_dir`` unless it holds a config and checkpoints."""
    for name in (runfiles.CONFIG, runfiles.CHECKPOINTS):
        if not (run_dir / name).exists():
            raise ValueError(
                f"--ensemble {run_dir}: no {name} there; expected the directory of a trained "
                "brown_lm run"
            )


def load_best_params(run_dir: Path, corpus: brown.Corpus) -> tuple[Config, Any, Any]:
    """``(config, graphdef, params)``: the best parameters of the run in ``run_dir``."""
    check_run_dir(run_dir)
    config = Config(**json.loads((run_dir / runfiles.CONFIG).read_text()))
    graphdef, params = nnx.split(build_model(config, corpus.vocab_size), nnx.Param)
    n_steps = input_pipeline.steps_per_epoch(corpus.train.stop, config.batch_size, config.context)
    state = train.initial_state(params, train.build_optimizer(config, n_steps))
    replicated = NamedSharding(devices.make_mesh(1), P())
    checkpointer = runfiles.Checkpointer(run_dir / runfiles.CHECKPOINTS)
    restored = checkpointer.restore(loop.abstract_like(state, replicated))
    checkpointer.close()
    if restored is None:
        raise ValueError(f"--ensemble {run_dir}: no complete checkpoint; expected a trained run")
    return config, graphdef, restored[0]["best_params"]


def word_losses(run_dir: Path, corpus: brown.Corpus) -> dict[str, np.ndarray]:
    """The cross-entropy of every word of each split (``SPLITS``) under the run's best
    parameters, in order."""
    config, graphdef, params = load_best_params(run_dir, corpus)
    stride = config.eval_stride
    assert stride is not None
    evaluate = train.make_evaluate(graphdef, 64, stride, per_word=True)
    losses = {}
    for split in SPLITS:
        inputs, targets = input_pipeline.pad_windows(
            *input_pipeline.eval_windows(
                corpus.ids, getattr(corpus, split), config.context, stride
            ),
            multiple=64,
        )
        per_position, _ = evaluate(params, inputs, targets)
        scored = targets[:, -stride:].reshape(-1) >= 0
        losses[split] = np.asarray(per_position)[scored]
    return losses


def mixture_perplexity(losses: Any) -> float:
    """Perplexity of the equal-weight mixture of ``M`` models, from their per-word CE ``(M, W)``."""
    log_mean_p = jxent.logsumexp(-jnp.asarray(losses, jnp.float32), axis=0) - math.log(len(losses))
    return math.exp(-float(jnp.mean(log_mean_p)))


def ensemble(run_dirs: list[Path], corpus: brown.Corpus) -> dict[str, Any]:
    """Each run's perplexity and the mixture's, on the validation and test words."""
    report: dict[str, Any] = {"runs": [str(d) for d in run_dirs]}
    per_run = [word_losses(d, corpus) for d in run_dirs]  # one restore and compile per run
    for split in SPLITS:
        losses = np.stack([run[split] for run in per_run])
        report[split] = {
            "runs": [math.exp(float(np.mean(run))) for run in losses],
            "mixture": mixture_perplexity(losses),
        }
    return report


def main(run_dirs: list[str], data_dir: str | None, out_dir: str | None) -> int:
    """Prints (and with ``out_dir`` writes ``ensemble.json``) the mixture of ``run_dirs``."""
    paths = [Path(d) for d in run_dirs]
    for path in paths:  # before the corpus is fetched
        check_run_dir(path)
    report = ensemble(paths, brown.load_brown(data_dir))
    for split in SPLITS:
        runs = ", ".join(f"{p:.2f}" for p in report[split]["runs"])
        print(f"{split:5s} perplexity: runs {runs}; mixture {report[split]['mixture']:.2f}")
    if out_dir:
        runfiles.write_json_atomic(Path(out_dir) / "ensemble.json", report)
        print(f"written to {Path(out_dir) / 'ensemble.json'}")
    return 0
