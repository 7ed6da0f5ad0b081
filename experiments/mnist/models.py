"""The MNIST classifiers in Flax NNX: an MLP and the Keras tutorial's LeNet-5.

Both map images ``(B, 28, 28)`` (or ``(B, 784)``) to logits ``(B, 10)`` and take the
``dropout_key`` the training engine passes (``experiments.mnist.train.fit``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from experiments.data.mnist import NUM_CLASSES
from experiments.mnist.configs import Config, LeNet5Config, MLPConfig


class MLP(nnx.Module):
    """784 -> hidden... -> 10 with ReLU and dropout after every hidden layer."""

    def __init__(self, hidden: Sequence[int], dropout: float, *, rngs: nnx.Rngs):
        sizes = (28 * 28, *hidden)
        self.layers = nnx.List(
            [nnx.Linear(n_in, n_out, rngs=rngs) for n_in, n_out in itertools.pairwise(sizes)]
        )
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(sizes[-1], NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits for images ``(B, 28, 28)`` or ``(B, 784)``; dropout iff a key is given."""
        x = x.reshape(x.shape[0], -1)
        if dropout_key is None:
            keys: Sequence[jax.Array | None] = [None] * len(self.layers)
        else:
            keys = list(jax.random.split(dropout_key, len(self.layers)))
        for layer, key in zip(self.layers, keys, strict=True):
            x = self.dropout(jax.nn.relu(layer(x)), deterministic=key is None, rngs=key)
        return self.head(x)


class LeNet5(nnx.Module):
    """The tutorial's LeNet-5 (Keras ``Sequential`` layer for layer).

    conv 6@5x5 ReLU -> max-pool 2 -> conv 16@5x5 ReLU -> max-pool 2 -> dense 120 ReLU ->
    dense 84 ReLU -> dense 10, with Keras' defaults where they matter: 'valid' convolutions,
    Glorot-uniform kernels and zero biases.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        glorot = nnx.initializers.glorot_uniform()  # Keras' default kernel initialiser
        self.conv1 = nnx.Conv(1, 6, (5, 5), padding="VALID", kernel_init=glorot, rngs=rngs)
        self.conv2 = nnx.Conv(6, 16, (5, 5), padding="VALID", kernel_init=glorot, rngs=rngs)
        self.fc1 = nnx.Linear(16 * 4 * 4, 120, kernel_init=glorot, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, kernel_init=glorot, rngs=rngs)
        self.fc3 = nnx.Linear(84, NUM_CLASSES, kernel_init=glorot, rngs=rngs)

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits for images ``(B, 28, 28)`` or ``(B, 784)``; LeNet-5 has no dropout."""
        del dropout_key
        x = x.reshape(x.shape[0], 28, 28, 1)
        x = nnx.max_pool(jax.nn.relu(self.conv1(x)), (2, 2), strides=(2, 2))  # 24 -> 12
        x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))  # 8 -> 4
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.fc1(x))
        x = jax.nn.relu(self.fc2(x))
        return self.fc3(x)


def build_model(config: Config) -> MLP | LeNet5:
    """The config's model, initialised from ``config.seed`` alone."""
    key = jax.random.key(config.seed)
    if isinstance(config, MLPConfig):
        return _compiled_mlp_init(config.hidden, config.dropout)(key)
    if isinstance(config, LeNet5Config):
        return _compiled_lenet5_init()(key)
    raise TypeError(f"config {config!r}: expected an MLPConfig or a LeNet5Config")


# One compiled initialiser per architecture: op-by-op init compiles dozens of tiny programs.
@functools.cache
def _compiled_mlp_init(hidden: tuple[int, ...], dropout: float) -> Any:
    return nnx.jit(lambda key: MLP(hidden, dropout, rngs=nnx.Rngs(params=key)))


@functools.cache
def _compiled_lenet5_init() -> Any:
    return nnx.jit(lambda key: LeNet5(rngs=nnx.Rngs(params=key)))
