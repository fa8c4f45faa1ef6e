"""Figures for people: learning curves and the confusion matrix, as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from maskcls.labels import NUM_CLASSES, AgeCutoffs, class_name  # noqa: E402


def learning_curves(history: list[dict], path: str | Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, loss_ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    if "val_loss" in history[0]:
        loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    if "val_macro_f1" in history[0]:
        f1_ax = loss_ax.twinx()
        f1_ax.plot(
            epochs, [h["val_macro_f1"] for h in history], "s-", color="tab:green", label="val macro-F1"
        )
        f1_ax.set_ylabel("val macro-F1")
        f1_ax.set_ylim(0, 1)
        f1_ax.legend(loc="upper right")
    loss_ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def confusion_matrix(matrix: np.ndarray, path: str | Path, cutoffs: AgeCutoffs = AgeCutoffs()) -> Path:
    names = [class_name(c, cutoffs) for c in range(NUM_CLASSES)]
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(9, 8), dpi=100)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(NUM_CLASSES), names, rotation=90, fontsize=7)
    ax.set_yticks(range(NUM_CLASSES), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                fontsize=6,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def study_curves(curves: list[tuple[dict[int, float], str]], path: str | Path) -> Path:
    """Every trial's validation macro-F1 per epoch: `(values by epoch, kind)` with kind `exported`,
    `complete` or `pruned` (greyed)."""
    style: dict[str, dict[str, Any]] = {
        "pruned": {"color": "0.75", "lw": 0.8, "zorder": 1},
        "complete": {"color": "tab:blue", "lw": 1.0, "alpha": 0.7, "zorder": 2},
        "exported": {"color": "tab:red", "lw": 2.0, "zorder": 3},
    }
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    shown = set()
    for values, kind in sorted(curves, key=lambda c: int(style[c[1]]["zorder"])):
        steps = sorted(values)
        label = kind if kind not in shown else None
        shown.add(kind)
        ax.plot(steps, [values[s] for s in steps], "o-", ms=2.5, label=label, **style[kind])
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("val macro-F1")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
