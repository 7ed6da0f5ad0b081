"""LeNet-5 on MNIST as the Keras tutorial builds it, with jxent: ``experiments/mnist/``.

python experiments/mnist_lenet5.py --help
"""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository root (see README.md)

from experiments.mnist.main import main

if __name__ == "__main__":
    sys.exit(main(model="lenet5"))
