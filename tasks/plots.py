"""Figures logged with every training run: the report's curves and a confusion matrix.
Built as matplotlib Figures (no pyplot state, no display) for `mlflow.log_figure`."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def curves(history: list[dict[str, float]], title: str) -> Figure:
    """Loss and accuracy per epoch, training against validation (the report's Figures 2-5)."""
    epochs = [int(h["epoch"]) + 1 for h in history]
    fig = Figure(figsize=(10, 4), layout="tight")
    for ax, key, label in zip(fig.subplots(1, 2), ("loss", "acc"), ("loss", "accuracy"),
                              strict=True):
        ax.plot(epochs, [h[f"train/{key}"] for h in history], label="train", marker=".")
        ax.plot(epochs, [h[f"val/{key}"] for h in history], label="validation", marker=".")
        ax.set(xlabel="epoch", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return fig


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int = 10) -> np.ndarray:
    """(classes, classes) counts, rows true labels, columns predictions."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def confusion(matrix: np.ndarray, class_names: tuple[str, ...], title: str) -> Figure:
    fig = Figure(figsize=(7, 6), layout="tight")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    threshold = matrix.max() / 2
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > threshold else "black")
    fig.colorbar(image, ax=ax)
    return fig
