"""An experiment's real command line, on the tests' small offline data (test_multiprocess.py).

    PYTHONPATH=. python tests/experiments/multiprocess_driver.py {mnist,brown} FLAG...

Runs the command line of ``mnist_mlp.py`` or ``brown_lm.py`` (``experiments.mnist.main``,
``experiments.brown.main``) unchanged, except that the data loaders return the small data the
other tests use (no download, no cache needed), every training chunk prints ``chunk EPOCH
STEP`` (so a test can time a kill), and at the end process 0 saves the final parameters as
``RUN_DIR/final_params.npz``. ``$JXENT_TEST_JAX_CACHE``, if set,
is a persistent compilation cache shared by the test's processes (each would compile the same
programs again). Imports as ``kill_driver.py`` does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import jax
import kill_driver
import numpy as np


def report_chunk(epoch: int, step: int) -> None:
    print(f"chunk {epoch} {step}", flush=True)


def save_params(train: Any) -> Any:
    """``train`` that also leaves the final parameters in the run directory (process 0)."""

    def train_and_save(config: Any, run_dir: Path, **kwargs: Any) -> Any:
        result = train(config, run_dir, on_chunk=report_chunk, **kwargs)
        if not result.interrupted and jax.process_index() == 0:
            leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(result.params)]
            np.savez(run_dir / "final_params.npz", *leaves)
        return result

    return train_and_save


def main(which: str, argv: list[str]) -> int:
    cache = os.environ.get("JXENT_TEST_JAX_CACHE")
    if cache:
        kill_driver.enable_compilation_cache(Path(cache))
    if which == "mnist":
        import test_mnist

        from experiments.data import mnist
        from experiments.mnist import main as mnist_main
        from experiments.mnist import train as mnist_train

        def small_mnist(data_dir: Any, train_limit: Any, test_limit: Any) -> Any:
            return test_mnist.small_data(train_limit, test_limit)

        mnist.load_dataset = small_mnist
        mnist_train.train_and_evaluate = save_params(mnist_train.train_and_evaluate)
        return mnist_main.main(argv, model="mlp")
    import test_brown

    from experiments.brown import main as brown_main
    from experiments.brown import train as brown_train
    from experiments.data import brown

    brown.load_brown = lambda data_dir=None: test_brown.small_corpus()
    brown_train.train_and_evaluate = save_params(brown_train.train_and_evaluate)
    return brown_main.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
