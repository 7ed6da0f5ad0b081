"""The NumPy tutorial's 2-D five-cluster toy, its recipe against Adam: ``experiments/clusters/``.

python experiments/five_clusters.py --help
"""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository root (see README.md)

from experiments.clusters.main import main

if __name__ == "__main__":
    sys.exit(main())
