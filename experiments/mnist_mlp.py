"""MNIST with a Flax NNX MLP, optax AdamW and jxent's cross-entropy: ``experiments/mnist/``.

python experiments/mnist_mlp.py --help
"""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository root (see README.md)

from experiments.mnist.main import main

if __name__ == "__main__":
    sys.exit(main(model="mlp"))
