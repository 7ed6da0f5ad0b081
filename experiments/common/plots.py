"""Plots of the experiments (matplotlib, headless)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

NUM_CLASSES = 10


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_norm() -> Any:
    from matplotlib.colors import LogNorm

    return LogNorm()


def plot_perplexity(records: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Train (running, with dropout) and validation perplexity against epoch, log scale."""
    plt = pyplot()
    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_perplexity"] for r in records], "o-", label="train (running)")
    ax.plot(epochs, [r["valid_perplexity"] for r in records], "o-", label="validation")
    if records:
        best = min(records, key=lambda r: r["valid_perplexity"])
        ax.annotate(
            f"{best['valid_perplexity']:.1f}",
            (best["epoch"], best["valid_perplexity"]),
            textcoords="offset points",
            xytext=(-10, 8),
        )
    ax.set(xlabel="epoch", ylabel="perplexity", title=title, yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(records: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Train/test loss and test accuracy against epoch."""
    plt = pyplot()
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train (running)")
    ax_loss.plot(epochs, [r["test_loss"] for r in records], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * r["test_accuracy"] for r in records], "o-", color="C2")
    best = max(records, key=lambda r: r["test_accuracy"]) if records else None
    if best is not None:
        ax_acc.annotate(
            f"{100 * records[-1]['test_accuracy']:.2f}%",
            (records[-1]["epoch"], 100 * records[-1]["test_accuracy"]),
            textcoords="offset points",
            xytext=(-30, -15),
        )
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """``counts[true, predicted]``."""
    counts = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def plot_confusion(labels: np.ndarray, predictions: np.ndarray, path: Path, title: str) -> None:
    """The test confusion matrix, counts annotated (log colour scale so errors show)."""

    plt = pyplot()
    counts = confusion_matrix(labels, predictions)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(counts + 1, cmap="Blues", norm=_log_norm())
    for (true, pred), count in np.ndenumerate(counts):
        if count:
            color = "white" if true == pred else "black"
            ax.text(pred, true, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set(
        xticks=range(NUM_CLASSES),
        yticks=range(NUM_CLASSES),
        xlabel="predicted",
        ylabel="true",
        title=f"{title}\n{int(np.trace(counts))}/{counts.sum()} correct",
    )
    fig.colorbar(image, ax=ax, label="count + 1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_mistakes(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    path: Path,
    title: str,
    max_shown: int = 48,
    cols: int = 8,
) -> None:
    """A grid of misclassified test digits, each captioned ``true → predicted``.

    Drawn as one mosaic image with text on top (not one subplot per digit): many times faster.
    """
    plt = pyplot()
    wrong_all = np.flatnonzero(labels != predictions)
    wrong = wrong_all[:max_shown]
    rows = max(1, math.ceil(len(wrong) / cols))
    cell, caption = 28 + 4, 12  # pixels per digit cell, caption band above each digit
    mosaic = np.zeros((rows * (cell + caption), cols * cell), dtype=np.float32)
    fig, ax = plt.subplots(figsize=(cols * 0.9, rows * 1.1 + 0.5))
    for i, index in enumerate(wrong):
        top = (i // cols) * (cell + caption) + caption + 2
        left = (i % cols) * cell + 2
        mosaic[top : top + 28, left : left + 28] = images[index] / 255.0
        ax.text(left + 14, top - 3, f"{labels[index]} → {predictions[index]}", ha="center",
                va="bottom", fontsize=8, color="C3")  # fmt: skip
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"{title}: {len(wrong_all)} mistakes (true → predicted)", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(run_dir: Path, result: Any, data: Any, title: str) -> None:
    """``curves.png``, ``confusion.png`` and ``mistakes.png`` in ``run_dir``."""
    plot_curves(result.records, run_dir / "curves.png", title)
    if result.predictions is not None:
        plot_confusion(data.test_labels, result.predictions, run_dir / "confusion.png", title)
        plot_mistakes(
            data.test_images, data.test_labels, result.predictions, run_dir / "mistakes.png", title
        )
