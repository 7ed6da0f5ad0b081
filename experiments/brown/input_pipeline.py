"""The Brown corpus into the training steps: the corpus, each epoch's windows, the evaluation
windows.

* Training: every epoch cuts the training words into windows of ``context + 1`` words at a
  random offset and shuffles the windows; the token stream stays on the device and the jitted
  steps gather each batch of windows from it (``experiments.brown.train``).
* Evaluation: windows overlap (``stride < context``) so that each scored word sees at least
  ``context - stride`` words of context; a window may reach back across the split's start,
  since the corpus is one text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.brown.configs import Config
from experiments.data import brown


def load_corpus(config: Config) -> brown.Corpus:
    """The Brown corpus, split and numbered as in the paper (``experiments/data/brown.py``)."""
    return brown.load_brown(config.data_dir)


def steps_per_epoch(n_tokens: int, batch_size: int, context: int) -> int:
    """Full batches of windows per epoch (the count at the worst random offset)."""
    windows = (n_tokens - context) // context
    if windows < batch_size:
        raise ValueError(
            f"{n_tokens} training words make {windows} windows of context {context}; "
            f"expected at least batch_size {batch_size}"
        )
    return windows // batch_size


def make_permute(n_tokens: int, batch_size: int, context: int) -> Callable:
    """Jitted ``epoch key -> (steps, batch)`` window starts: a random offset, shuffled windows."""
    n_steps = steps_per_epoch(n_tokens, batch_size, context)
    windows = (n_tokens - context) // context

    def permute(key):
        offset = jax.random.randint(jax.random.fold_in(key, 0), (), 0, context)
        order = jax.random.permutation(jax.random.fold_in(key, 2), windows)
        starts = offset + context * order[: n_steps * batch_size]
        return starts.reshape(n_steps, batch_size)

    return jax.jit(permute)


def gather_windows(tokens: jax.Array, starts: jax.Array, length: int) -> jax.Array:
    return tokens[starts[:, None] + jnp.arange(length)]


def eval_windows(
    ids: np.ndarray, split: slice, context: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(K, context)`` and targets ``(K, context)`` scoring each word of ``split`` once.

    Window ``k`` scores the words ``[a + k·stride, a + (k+1)·stride)`` (``a`` = split start),
    placed at its end, so each sees at least ``context - stride`` words before it; every other
    target is -1 (ignored).
    """
    start, stop = split.start, split.stop
    if not 0 < stride <= context:
        raise ValueError(f"eval stride {stride}: expected 1..context ({context})")
    if start < context + 1 - stride:
        raise ValueError(f"split {split} starts too early for context {context}")
    inputs, targets = [], []
    for lo in range(start, stop, stride):
        end = min(lo + stride, stop)
        target = ids[end - context : end].astype(np.int32)
        target[: context - (end - lo)] = -1
        inputs.append(ids[end - context - 1 : end - 1])
        targets.append(target)
    return np.stack(inputs).astype(np.int32), np.stack(targets)


def pad_windows(inputs: np.ndarray, targets: np.ndarray, multiple: int) -> tuple[Any, Any]:
    """Pads the window count to a multiple of the eval batch with windows that score nothing."""
    extra = -len(inputs) % multiple
    inputs = np.concatenate([inputs, np.zeros((extra, inputs.shape[1]), inputs.dtype)])
    targets = np.concatenate([targets, np.full((extra, targets.shape[1]), -1, targets.dtype)])
    return inputs, targets
