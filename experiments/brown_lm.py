"""Bengio et al.'s neural language model, and a small transformer, on the Brown corpus, with
jxent's fused output layer: ``experiments/brown/``.

    python experiments/brown_lm.py --help
"""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository root (see README.md)

from experiments.brown.main import main

if __name__ == "__main__":
    sys.exit(main())
