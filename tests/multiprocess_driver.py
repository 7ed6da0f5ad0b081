"""An experiment's real command line, on the tests' small offline data (tests/test_multiprocess.py).

    python tests/multiprocess_driver.py {mnist,brown} FLAG...

Runs ``mnist_mlp.main(FLAGS)`` or ``brown_lm.main(FLAGS)`` unchanged, except that the data
loaders return the small data the other tests use (no download, no cache needed), every
training chunk prints ``chunk EPOCH STEP`` (so a test can time a kill), and at the end process
0 saves the final parameters as ``RUN_DIR/final_params.npz``. ``$JXENT_TEST_JAX_CACHE``, if set,
is a persistent compilation cache shared by the test's processes (each would compile the same
programs again).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent / "experiments"))
sys.path.insert(0, str(TESTS))

import kill_driver  # noqa: E402  (after the path set-up above)


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
        import mnist_mlp
        import test_experiments
        from data import mnist

        def small_mnist(data_dir: Any, train_limit: Any, test_limit: Any) -> Any:
            return test_experiments.small_data(train_limit, test_limit)

        mnist.load_dataset = small_mnist
        mnist_mlp.train = save_params(mnist_mlp.train)
        return mnist_mlp.main(argv)
    import brown_lm
    import test_brown_lm
    from data import brown

    brown.load_brown = lambda data_dir=None: test_brown_lm.small_corpus()
    brown_lm.train = save_params(brown_lm.train)
    return brown_lm.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
