"""The tutorial's network in Flax NNX."""

from __future__ import annotations

import jax
from flax import nnx

from experiments.clusters.input_pipeline import NUM_CLUSTERS


class TutorialMLP(nnx.Module):
    """2 -> 32 ReLU -> 5, the tutorial's network."""

    def __init__(self, hidden: int = 32, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(2, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, NUM_CLUSTERS, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.hidden(x)))
