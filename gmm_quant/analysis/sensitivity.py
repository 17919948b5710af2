"""Per-layer sensitivity: how much error each quantised layer alone costs when snapped or pruned.

For every quantised layer of a run's pretrained model, with all other layers untouched: the error
on the run's validation split (held out of the training data, ``val_fraction``; the test set is never
read) when the layer is snapped to ``k`` centres of its own 1-D k-means, and when its smallest ``p``
of weights (by magnitude) are zeroed. No training: seconds for LeNet-5. Writes
``sensitivity.json`` and ``sensitivity.png`` (a heat map of the error increase) into WORKDIR and
prints the table. Meant to seed or bound a search over per-layer settings.
"""

from __future__ import annotations

import numpy as np

from gmm_quant.core.codebook import kmeans_1d, snap
from gmm_quant.core.rules import flatten, replace_leaves
from gmm_quant.training import loop


def zero_smallest(weights, fraction: float) -> np.ndarray:
    w = np.asarray(weights, np.float32)
    if fraction <= 0:
        return w
    cut = np.quantile(np.abs(w), fraction)
    return np.where(np.abs(w) <= cut, np.float32(0), w)


def layer_sensitivity(apply_fn, params, paths, val, *, ks=(3, 5, 9, 17), fractions=(0.5, 0.9, 0.99),
                      measure=None):  # fmt: skip
    """``{"baseline": error, "layers": {path: {"k=3": error, ..., "zero 50%": error}}}`` on ``val``;
    ``measure(apply_fn, params, x, y)`` (default the error rate) is what "error" means."""
    measure = measure or loop.error_rate
    flat = flatten(params)
    out = {"baseline": measure(apply_fn, params, *val), "layers": {}}
    for path in paths:
        w = np.asarray(flat[path], np.float32)
        row = {}
        for k in ks:
            centres = kmeans_1d(w, k, init="quantile", iterations=30)
            snapped = centres[snap(w, centres)]
            row[f"k={k}"] = measure(apply_fn, replace_leaves(params, {path: snapped}), *val)
        for p in fractions:
            pruned = zero_smallest(w, p)
            row[f"zero {100 * p:g}%"] = measure(apply_fn, replace_leaves(params, {path: pruned}), *val)
        out["layers"][path] = row
    return out


def format_table(result: dict) -> str:
    columns = list(next(iter(result["layers"].values())))
    lines = [f"validation error of the unchanged model: {100 * result['baseline']:.2f}%",
             f"{'layer':<24} " + " ".join(f"{c:>10}" for c in columns)]  # fmt: skip
    for path, row in result["layers"].items():
        lines.append(f"{path:<24} " + " ".join(f"{100 * row[c]:>9.2f}%" for c in columns))
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(result["layers"])
    columns = list(result["layers"][layers[0]])
    grid = np.array([[100 * (result["layers"][p][c] - result["baseline"]) for c in columns] for p in layers])
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 2, 0.5 * len(layers) + 1.5))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:+.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax, label="error increase (points)")
    ax.set_title("one layer at a time: validation error increase")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
