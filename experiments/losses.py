"""Classification losses of the MNIST experiments: jxent's cross-entropy, or optax's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import devices  # noqa: F401  (puts a plain checkout's jxent on the path)
import jax
import optax

import jxent

LOSSES = ("jxent", "optax")


def make_loss(name: str, label_smoothing: float = 0.0) -> Callable[[Any, Any], Any]:
    """Mean cross-entropy of integer labels: jxent's, or optax's for comparison."""

    if name == "jxent":

        def jxent_loss(logits: Any, labels: Any) -> Any:
            return jxent.cross_entropy(logits, labels, label_smoothing=label_smoothing)

        return jxent_loss
    if name == "optax":

        def optax_loss(logits: Any, labels: Any) -> Any:
            if label_smoothing:
                targets = optax.smooth_labels(
                    jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing
                )
                return optax.softmax_cross_entropy(logits, targets).mean()
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return optax_loss
    raise ValueError(f"loss {name!r} is not one of {LOSSES}")
