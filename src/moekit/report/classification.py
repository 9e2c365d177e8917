"""The parts of a report proper to a classifier: the confusion matrix and which
expert takes which class."""

from __future__ import annotations

import numpy as np

from moekit.plotting import _pyplot
from moekit.report.regression import named


def confusion_figure(classes, y, pred):
    plt = _pyplot()
    C = len(classes)
    index = {c: i for i, c in enumerate(classes)}
    counts = np.zeros((C, C))
    for a, b in zip(y, pred, strict=True):
        counts[index[a], index[b]] += 1
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * C, 1.2 + 0.45 * C))
    ax.imshow(counts, cmap="Blues")
    for i in range(C):
        for j in range(C):
            if counts[i, j]:
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if counts[i, j] > counts.max() / 2 else "black")  # fmt: skip
    ax.set_xticks(range(C), [str(c) for c in classes])
    ax.set_yticks(range(C), [str(c) for c in classes])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix")
    return fig


def class_expert_figure(model, X, y):
    """Mean gate weight g_k(x) of each expert over the rows of each true class."""
    plt = _pyplot()
    g = model.gate_weights(named(model, X))
    classes = list(model.classes_)
    share = np.stack([g[y == c].mean(0) if np.any(y == c) else np.zeros(g.shape[1])
                      for c in classes])  # fmt: skip
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(classes), 1.2 + 0.5 * g.shape[1]))
    im = ax.imshow(share.T, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(classes)), [str(c) for c in classes])
    ax.set_yticks(range(g.shape[1]), [f"expert {k}" for k in range(g.shape[1])])
    ax.set_xlabel("true class")
    ax.set_title("mean gate weight per class")
    fig.colorbar(im, ax=ax)
    return fig
