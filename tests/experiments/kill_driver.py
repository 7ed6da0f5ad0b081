"""A tiny training run in its own process, for the kill tests (test_kill_resume.py).

    PYTHONPATH=. python tests/experiments/kill_driver.py {mnist,brown} RUN_DIR [uninterrupted]

Resumes RUN_DIR (from the start if it holds no checkpoint), prints ``chunk EPOCH STEP`` after
every training chunk (so the test can time its kills), and at the end saves the final
parameters as ``RUN_DIR/final_params.npz``. With ``uninterrupted`` it starts afresh instead.
It imports ``experiments.`` from the repository root, which the launching test puts on
``PYTHONPATH``, and the tiny configs from the test modules beside it (this script's folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np


def enable_compilation_cache(directory: Path) -> None:
    # Every relaunch would otherwise recompile the same programs.
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def report_chunk(epoch: int, step: int) -> None:
    print(f"chunk {epoch} {step}", flush=True)


def main(which: str, run_dir: Path, resume: bool) -> None:
    enable_compilation_cache(run_dir.parent / "jax-cache")
    if which == "mnist":
        import test_mnist

        from experiments.mnist.train import train_and_evaluate

        result = train_and_evaluate(
            test_mnist.TINY,
            run_dir,
            resume=resume,
            data=test_mnist.small_data(),
            progress=False,
            on_chunk=report_chunk,
            plots=False,
        )
    else:
        import test_brown

        from experiments.brown.train import train_and_evaluate

        result = train_and_evaluate(
            test_brown.TINY,
            run_dir,
            resume=resume,
            corpus=test_brown.small_corpus(),
            progress=False,
            on_chunk=report_chunk,
            plots_too=False,
        )
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(result.params)]
    np.savez(run_dir / "final_params.npz", *leaves)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), resume=sys.argv[3:] != ["uninterrupted"])
