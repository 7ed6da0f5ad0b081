"""The five clusters: seeded Gaussian points around the corners of a pentagon.

The tutorial's sample is not published, so the points are drawn here; its numbers are
therefore matched in kind, not to the digit.
"""

from __future__ import annotations

import numpy as np

NUM_CLUSTERS = 5
TRAIN_FRACTION = 0.8
# Cluster centres on a pentagon of radius 4; unit-variance clusters overlap at their edges.
CENTRES = 4.0 * np.stack(
    [np.cos(2 * np.pi * np.arange(NUM_CLUSTERS) / NUM_CLUSTERS + 0.3),
     np.sin(2 * np.pi * np.arange(NUM_CLUSTERS) / NUM_CLUSTERS + 0.3)],
    axis=1,
)  # fmt: skip


def make_clusters(n_per_cluster: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_cluster`` Gaussian points (std 1) around each of the five centres."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_CLUSTERS), n_per_cluster).astype(np.int32)
    points = CENTRES[labels] + rng.normal(size=(len(labels), 2))
    order = rng.permutation(len(labels))
    return points[order].astype(np.float32), labels[order]


def train_test_split(
    points: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, test_x, test_y)``: the first 80 % of the (shuffled) points train."""
    split = int(TRAIN_FRACTION * len(labels))
    return points[:split], labels[:split], points[split:], labels[split:]
