"""MNIST into the training steps: the dataset, each epoch's order, augmentation, normalisation.

The whole dataset lives on the devices as uint8 (47 MB); an epoch's batches are index arrays
into it, gathered, shifted and normalised inside the jitted steps (``experiments.mnist.train``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from experiments.data import mnist
from experiments.data.mnist import MNIST_MEAN, MNIST_STD
from experiments.mnist.configs import Config


def load_data(config: Config) -> mnist.MNIST:
    """The run's MNIST (``config.data_dir`` cache, first ``train_limit``/``test_limit`` images)."""
    return mnist.load_dataset(config.data_dir, config.train_limit, config.test_limit)


def normalize(images: Any) -> Any:
    """uint8 pixels -> float32, standardised with the MNIST train-set mean and std."""
    return (images.astype(jnp.float32) / 255.0 - MNIST_MEAN) / MNIST_STD


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Full batches per epoch; the remainder is dropped (a fresh permutation every epoch)."""
    if batch_size > n_train:
        raise ValueError(f"batch size {batch_size} exceeds the {n_train} training examples")
    return n_train // batch_size


def make_permute(n_train: int, batch_size: int) -> Callable[[Any], Any]:
    """Jitted ``epoch key -> (steps, batch)`` example indices: a fresh permutation per epoch."""
    n_steps = steps_per_epoch(n_train, batch_size)

    def permute(key: Any) -> Any:
        order = jax.random.permutation(jax.random.fold_in(key, 0), n_train)
        return order[: n_steps * batch_size].reshape(n_steps, batch_size)

    return jax.jit(permute)


def random_shift(images: Any, key: Any, max_shift: int) -> Any:
    """Translates each uint8 image ``(B, 28, 28)`` by up to ``max_shift`` pixels, zero-filled.

    The classic MNIST augmentation: cheap, label-preserving, and for an MLP (which has no
    translation invariance of its own) worth a few tenths of a percent of test accuracy.
    """

    if max_shift <= 0:
        return images
    height, width = images.shape[1:]
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1]), (height, width))

    return jax.vmap(crop)(padded, offsets)
