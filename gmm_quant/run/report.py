"""The report a user reads: per-layer table, totals, ``metrics.json`` and figures."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from gmm_quant._util.files import write_atomic


def layer_rows(summary: dict) -> list[dict]:
    return [
        {
            "name": c.name,
            "num_weights": c.num_weights,
            "nonzero": c.nonzero,
            "nonzero_percent": 100.0 * c.nonzero / c.num_weights,
            "centres": c.centres,
            "bits_per_index": c.bits_per_index,
            "han_bits": c.han_bits,
            "compression_ratio": 32 * c.num_weights / c.han_bits if c.han_bits else None,  # None: all zero
        }
        for c in summary["layers"]
    ]


def metric_name(task: str) -> str:
    """The name a task's metric has in metrics.json: ``error`` (a fraction) or ``rmse``."""
    return "rmse" if task == "regress" else "error"


def metrics_dict(errors: dict, summary: dict, extra: dict | None = None, metric: str = "error") -> dict:
    """Machine-readable metrics: the task's metric per stage (``error_*`` or ``rmse_*``), sizes and
    ratios, and per-layer rows."""
    return {
        **{f"{metric}_{k}": v for k, v in errors.items()},
        "nonzero_fraction": summary["nonzero_fraction"],
        "compression_ratio": summary["compression_ratio"],
        "packed_ratio": summary["packed_ratio"],
        "num_weights": summary["num_weights"],
        "nonzero": summary["nonzero"],
        "float_values": summary["float_values"],
        "float_bytes": summary["float_bits"] / 8,
        "float_code_bits": summary["float_code_bits"],
        "original_bytes": summary["original_bits"] / 8,
        "han_bytes": summary["han_bits"] / 8,
        "packed_bytes": summary["packed_bits"] / 8,
        "layers": layer_rows(summary),
        **(extra or {}),
    }


def format_table(metrics: dict) -> str:
    """The per-layer table and totals as printed at the end of a run."""
    lines = [
        f"{'layer':<24} {'weights':>9} {'non-zero %':>10} {'centres':>7} {'bits/idx':>8} {'CR (Han)':>9}",
    ]
    for row in metrics["layers"]:
        ratio = row["compression_ratio"]
        lines.append(
            f"{row['name']:<24} {row['num_weights']:>9d} {row['nonzero_percent']:>10.2f} "
            f"{row['centres']:>7d} {row['bits_per_index']:>8d} "
            + (f"{ratio:>8.1f}x" if ratio is not None else f"{'all zero':>9}")
        )
    lines.append(
        f"{'total (+ float leaves)':<24} {metrics['num_weights']:>9d} "
        f"{100 * metrics['nonzero_fraction']:>10.2f} {'':>7} {'':>8} {metrics['compression_ratio']:>8.1f}x"
    )
    widths = metrics.get("float_code_bits") or []
    kind = "32-bit" if not widths else f"{'/'.join(map(str, widths))}-bit codes"
    line = f"float leaves ({kind}): {metrics['float_values']} values"
    lines.append(line + (f" = {metrics['float_bytes']:,.0f} bytes" if "float_bytes" in metrics else ""))
    line = f"compression ratio (Han et al.): {metrics['compression_ratio']:.1f}x"
    line += f" = {metrics['han_bytes']:,.0f} bytes   packed: {metrics['packed_ratio']:.1f}x"
    if "gzip_ratio" in metrics:
        line += f"   gzip -9 of float32: {metrics['gzip_ratio']:.1f}x"
    lines.append(line)
    if "file_bytes" in metrics:
        original = metrics["original_bytes"]
        files = {"model.gqz": metrics["file_bytes"], "model.onnx": (metrics.get("onnx") or {}).get("bytes")}
        shown = [f"{name} {n:,} bytes ({original / n:.1f}x)" for name, n in files.items() if n]
        lines.append("files on disk: " + "   ".join(shown))
    units = {p: u for p, u in (metrics.get("units") or {}).items() if u["outputs"][0] < u["outputs"][1]
             or u["inputs"][0] < u["inputs"][1]}  # fmt: skip
    if units:
        shown = "  ".join(f"{p} {u['inputs'][0]}/{u['inputs'][1]} -> {u['outputs'][0]}/{u['outputs'][1]}"
                          for p, u in units.items())  # fmt: skip
        lines.append(f"live units (inputs -> outputs): {shown}")
    if metrics.get("disconnected"):
        shown = "  ".join(f"{p} {n:,}" for p, n in metrics["disconnected"].items())
        lines.append(f"weights reading dead units, zeroed: {shown}")
    if metrics.get("heads"):
        kept = "  ".join(f"{p} {len(h['kept'])}/{h['of']}" for p, h in metrics["heads"].items())
        lines.append(f"attention heads kept: {kept}")
    if metrics.get("reuse"):
        links = "  ".join(f"{r['target']} <- {r['source']} (rank {r['rank']})" for r in metrics["reuse"])
        lines.append(f"layers reusing another's weights: {links}")
    stages = ("pretrained", "heads_pruned", "reused", "retrained", "compressed", "activations_quantised",
              "finetuned")  # fmt: skip
    # with --snap-epochs the network trained on its snapped weights: the continuous ones do not ship
    label = {"retrained": "retrained (unsnapped)"} if metrics.get("snap_epochs") else {}
    for title, key, shown in (("test error", "error", lambda v: f"{100 * v:.2f}%"),
                              ("test RMSE", "rmse", lambda v: f"{v:.4g}"),
                              ("test perplexity", "perplexity", lambda v: f"{v:.3f}")):  # fmt: skip
        found = [k for k in stages if f"{key}_{k}" in metrics]
        if found:
            lines.append(
                f"{title}: " + "  ".join(f"{label.get(k, k)} {shown(metrics[f'{key}_{k}'])}" for k in found)
            )
    return "\n".join(lines)


def write_metrics(workdir, metrics: dict) -> pathlib.Path:
    path = pathlib.Path(workdir) / "metrics.json"
    write_atomic(path, json.dumps(metrics, indent=1).encode())
    return path


def plot_figures(workdir, config, mixture, before: np.ndarray, after: np.ndarray, comps: np.ndarray):
    """weights.png (histograms with the mixture density) and scatter.png (paper's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gmm_quant.core import mixture as mx

    workdir = pathlib.Path(workdir)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    grid = np.linspace(min(before.min(), after.min()), max(before.max(), after.max()), 800)
    density = np.exp(np.asarray(mx.log_density(config, mixture, grid)))
    for ax, w, title in ((axes[0], before, "pretrained"), (axes[1], after, "after retraining")):
        ax.hist(w, bins=200, density=True, log=True, color="0.6")
        ax.plot(grid, np.maximum(density, 1e-6), color="C3", lw=1, label="mixture prior")
        ax.set_title(f"weights, {title}")
        ax.set_xlabel("weight")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(workdir / "weights.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    take = np.random.default_rng(0).permutation(before.size)[:20000]
    ax.scatter(before[take], after[take], c=comps[take], cmap="tab20", s=2)
    means = np.asarray(mx.component_means(mixture))
    for m in means:
        ax.axhline(m, color="0.8", lw=0.5, zorder=0)
    ax.set_xlabel("pretrained weight")
    ax.set_ylabel("retrained weight")
    ax.set_title("weights by mixture component")
    fig.tight_layout()
    fig.savefig(workdir / "scatter.png", dpi=110)
    plt.close(fig)


def plot_mixture_evolution(config, history: list, path, weights=None):
    """The paper's figure of the mixture over retraining: each component's mean +- 2 std per epoch.

    ``history`` is a list of (epoch, MixtureState); ``weights`` (optional) adds the final histogram.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gmm_quant.core import mixture as mx

    epochs = [e for e, _ in history]
    means = np.stack([np.asarray(mx.component_means(s)) for _, s in history])
    stds = np.stack([np.exp(-0.5 * np.asarray(s.log_precisions)) for _, s in history])
    fig, ax = plt.subplots(figsize=(7, 4))
    for j in range(means.shape[1]):
        color = "C3" if j == 0 else f"C{j % 10}"
        ax.plot(epochs, means[:, j], color=color, lw=1)
        ax.fill_between(
            epochs, means[:, j] - 2 * stds[:, j], means[:, j] + 2 * stds[:, j], color=color, alpha=0.15
        )
    ax.set_xlabel("retraining epoch")
    ax.set_ylabel("component mean +- 2 std")
    ax.set_title("mixture prior during retraining")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
