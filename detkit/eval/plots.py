"""PNG plots of an evaluation: PR curves, F1 versus score threshold, confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from detkit.eval.curves import at_threshold  # noqa: E402
from detkit.files import atomic_path  # noqa: E402


def _finish(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def plot_pr_curves(
    recall: np.ndarray, precision: np.ndarray, class_names: list[str], path: str | Path
) -> Path:
    """PR curve per class (thin) and their mean (thick); ``precision`` is ``[R, K]`` at the
    ``recall`` points, -1 for classes without ground truth (left out)."""
    fig, ax = plt.subplots(figsize=(7, 5.5))
    valid = [k for k in range(precision.shape[1]) if (precision[:, k] > -1).any()]
    for k in valid:
        ax.plot(recall, precision[:, k], lw=0.8, alpha=0.6, label=class_names[k])
    if valid:
        mean = precision[:, valid].mean(axis=1)
        ax.plot(recall, mean, lw=2.5, color="black", label=f"mean (AP {mean.mean():.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("Precision-recall, IoU 0.5")
    if len(valid) <= 20:
        ax.legend(fontsize=7, loc="lower left")
    return _finish(fig, path)


def plot_f1_curves(curves: list[dict], class_names: list[str], path: str | Path) -> Path:
    """F1 against the score threshold per class, and the mean over classes with ground truth."""
    fig, ax = plt.subplots(figsize=(7, 5.5))
    scores = np.concatenate([c["scores"] for c in curves] + [np.zeros(0)])
    lo, hi = (float(scores.min()), float(scores.max())) if len(scores) else (0.0, 1.0)
    grid = np.linspace(lo, hi, 200)
    valid = [k for k, c in enumerate(curves) if c["num_gt"] > 0]
    table = np.array([[at_threshold(curves[k], t)["f1"] for t in grid] for k in valid])
    for row, k in zip(table, valid, strict=True):
        ax.plot(grid, row, lw=0.8, alpha=0.6, label=class_names[k])
    if len(valid):
        mean = table.mean(axis=0)
        best = int(np.argmax(mean))
        ax.plot(grid, mean, lw=2.5, color="black",
                label=f"mean (best {mean[best]:.3f} at {grid[best]:.3f})")  # fmt: skip
    ax.set(xlabel="score threshold", ylabel="F1", ylim=(0, 1.02))
    ax.set_title("F1 vs score threshold, IoU 0.5")
    if len(valid) <= 20:
        ax.legend(fontsize=7)
    return _finish(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: str | Path) -> Path:
    """Counts normalised per true class (row); the last row/column is background."""
    labels = [*class_names, "background"]
    totals = matrix.sum(axis=1, keepdims=True)
    shown = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    size = max(5.0, 0.35 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true")
    if len(labels) <= 25:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                color = "white" if shown[i, j] > 0.5 else "black"
                ax.text(j, i, str(count), ha="center", va="center", fontsize=6, color=color)
    ax.set_title("Confusion matrix (row-normalised, counts)")
    return _finish(fig, path)
