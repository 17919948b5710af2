"""Reuse candidates: per same-shaped pair of quantised kernels, how well one explains the other.

See the package docstring for the command; the maths (least-squares output scales, similarity) is
here, apart from the model surgery (``layers``) and the command line (``command``).
"""

from __future__ import annotations

import itertools

import numpy as np

from gmm_quant.core.rules import flatten, replace_leaves
from gmm_quant.training import loop


def output_scales(target, source) -> np.ndarray:
    """Per last-axis channel ``s_j = <t_j, b_j> / <b_j, b_j>`` (0 where the source channel is 0)."""
    t = np.asarray(target, np.float64).reshape(-1, np.shape(target)[-1])
    b = np.asarray(source, np.float64).reshape(-1, np.shape(source)[-1])
    norms = np.sum(b * b, axis=0)
    return np.where(norms > 0, np.sum(t * b, axis=0) / np.where(norms > 0, norms, 1), 0.0)


def similarity(target, source) -> float:
    """``1 - ||target - source * s||^2 / ||target||^2`` with ``s = output_scales(target, source)``."""
    t, b = np.asarray(target, np.float64), np.asarray(source, np.float64)
    residual = t - b * output_scales(t, b)
    return float(1.0 - np.sum(residual**2) / max(np.sum(t**2), 1e-300))


def candidates(params, paths) -> list[dict]:
    """Every ordered same-shape pair of ``paths``, most similar first."""
    flat = flatten(params)
    rows = []
    for target, source in itertools.permutations(paths, 2):
        if np.shape(flat[target]) == np.shape(flat[source]):
            rows.append(
                {"target": target, "source": source, "similarity": similarity(flat[target], flat[source])}
            )
    return sorted(rows, key=lambda r: -r["similarity"])


def reuse_table(apply_fn, params, paths, val, evaluate: int = 10) -> dict:
    """``{"baseline": val error, "pairs": [...]}``; the first ``evaluate`` pairs get ``"error"``."""
    flat = flatten(params)
    rows = candidates(params, paths)
    for row in rows[:evaluate]:
        t, b = flat[row["target"]], np.asarray(flat[row["source"]], np.float32)
        replaced = (b * output_scales(t, b).astype(np.float32)).astype(np.float32)
        row["error"] = loop.error_rate(apply_fn, replace_leaves(params, {row["target"]: replaced}), *val)
    return {"baseline": loop.error_rate(apply_fn, params, *val), "pairs": rows}


def format_table(result: dict) -> str:
    lines = [f"validation error of the unchanged model: {100 * result['baseline']:.2f}%",
             f"{'target':<28} {'source':<28} {'similarity':>10} {'error if reused':>15}"]  # fmt: skip
    for r in result["pairs"]:
        err = f"{100 * r['error']:.2f}%" if "error" in r else "-"
        lines.append(f"{r['target']:<28} {r['source']:<28} {r['similarity']:>10.3f} {err:>15}")
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """Heat map of similarity, target (rows) by source (columns); blank where shapes differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["target"] for r in result["pairs"]} | {r["source"] for r in result["pairs"]})
    grid = np.full((len(names), len(names)), np.nan)
    for r in result["pairs"]:
        grid[names.index(r["target"]), names.index(r["source"])] = r["similarity"]
    fig, ax = plt.subplots(figsize=(0.45 * len(names) + 3, 0.45 * len(names) + 2))
    image = ax.imshow(grid, cmap="viridis", vmin=min(0.0, np.nanmin(grid)), vmax=1.0)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.colorbar(image, ax=ax, label="similarity after per-channel scaling")
    ax.set_title("reuse candidates: target (row) from source (column)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
