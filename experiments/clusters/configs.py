"""The two recipes the five-cluster toy compares, and the run's defaults.

The tutorial trains its MLP with plain full-batch gradient descent, learning rate 1e-4, for
1000 epochs (``TUTORIAL``); the "good" recipe swaps in Adam at 1e-2, everything else equal.
"""

from __future__ import annotations

import dataclasses

import optax

EXPERIMENT = "five_clusters"  # runs/five_clusters/<timestamp>
SEED = 0
POINTS_PER_CLUSTER = 200
EPOCHS = 1000


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to train: an optimizer, the loss reduction it expects, and for how long."""

    name: str
    optimizer: optax.GradientTransformation
    reduction: str
    epochs: int = EPOCHS


TUTORIAL = Recipe("tutorial: GD lr 1e-4", optax.sgd(1e-4), "mean")
GOOD = Recipe("good: Adam lr 1e-2", optax.adam(1e-2), "mean")
