"""What a search leaves behind: the best config file, a table of trials and a Pareto plot."""

from __future__ import annotations

import csv
import io
import json
import math

from gmm_quant._util.files import write_atomic
from gmm_quant.search import study as study_lib


def trial_rows(study) -> list[dict]:
    """One row per trial: number, state, CR, validation error (%), within budget (and, with a size
    target, the file's bytes), rescued, params."""
    rows = []
    for t in study.trials:
        err = t.user_attrs.get("val_error")
        cr = t.user_attrs.get("compression_ratio", t.value)  # a size target's objective is the error
        size = {"file_bytes": t.user_attrs.get("file_bytes")} if "max_bytes" in study.user_attrs else {}
        if "max_latency_ms" in study.user_attrs:
            size["latency_ms"] = t.user_attrs.get("latency_ms")
        rows.append({
            "trial": t.number,
            "state": t.state.name.lower(),
            "compression_ratio": round(cr, 2) if t.state.name == "COMPLETE" else None,
            **size,
            "pruned_at_epoch": max(t.intermediate_values) if t.state.name == "PRUNED" else None,
            "val_error_percent": round(100 * err, 3) if err is not None else None,
            "within_budget": (study_lib.constraint(t) <= 0) if err is not None else None,
            "rescued": t.user_attrs.get("rescued"),
            "params": json.dumps({k: _short(v) for k, v in t.params.items()}),
        })  # fmt: skip
    return rows


def _short(value):
    return round(value, 5) if isinstance(value, float) else value


def write_table(rows: list[dict], path) -> None:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_atomic(path, out.getvalue().encode())


def format_table(rows: list[dict], limit_percent: float, label: str = "val err %") -> str:
    sized, timed = bool(rows) and "file_bytes" in rows[0], bool(rows) and "latency_ms" in rows[0]
    within = "within targets" if sized or timed else f"within budget ({limit_percent:.2f}%)"
    size_head = (f" {'bytes':>9}" if sized else "") + (f" {'ms':>8}" if timed else "")
    lines = [f"{'trial':>5} {'state':<9} {'CR':>8} {label:>10}{size_head}  {within}"]
    for r in rows:
        cr = f"{r['compression_ratio']:.1f}x" if r["compression_ratio"] is not None else "-"
        err = f"{r['val_error_percent']:.2f}" if r["val_error_percent"] is not None else "-"
        if sized:
            err += f" {r['file_bytes']:>9,}" if r["file_bytes"] is not None else f" {'-':>9}"
        if timed:
            err += f" {r['latency_ms']:>8.3f}" if r["latency_ms"] is not None else f" {'-':>8}"
        ok = {True: "yes", False: "no", None: "-"}[r["within_budget"]]
        if r["rescued"]:
            ok += " (after longer fine-tuning)"
        if r["pruned_at_epoch"]:
            ok = f"- (pruned at retraining epoch {r['pruned_at_epoch']})"
        lines.append(f"{r['trial']:>5} {r['state']:<9} {cr:>8} {err:>10}  {ok}")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]], higher_x: bool = True) -> list[tuple[float, float]]:
    """The (x, error) points no other point beats on both (lower error, and higher x — a CR — or with
    ``higher_x`` False lower x — bytes, milliseconds), sorted by x."""
    sign = 1 if higher_x else -1
    front = [
        p for p in points
        if not any(q != p and sign * q[0] >= sign * p[0] and q[1] <= p[1] for q in points)
    ]  # fmt: skip
    return sorted(set(front))


VIEWS = {  # row key -> (axis label, higher is better, log scale)
    "compression_ratio": ("compression ratio (Han et al.)", True, True),
    "file_bytes": ("shipped file (bytes)", False, True),
    "latency_ms": ("ONNX Runtime latency (ms)", False, False),
}


def plot_pareto(
    rows, limit_percent, baseline_percent, path, label="validation error (%)", targets=None
) -> None:
    """Validation error (or what ``label`` names) of every completed trial against its CR and, when
    the trials measured them, its file's bytes and its latency: one panel each, with the budget line,
    the targets ``{"file_bytes": N, "latency_ms": T}`` as vertical lines and each panel's Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = [k for k in VIEWS if k == "compression_ratio" or (rows and k in rows[0])]
    fig, axes = plt.subplots(1, len(views), figsize=(6 * len(views), 4), squeeze=False)
    for ax, key in zip(axes[0], views, strict=True):
        _panel(ax, rows, key, limit_percent, baseline_percent, targets or {})
        ax.set_ylabel(label)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def _panel(ax, rows, key, limit_percent, baseline_percent, targets: dict) -> None:
    """One view: a trial is green when it is feasible (within the budget and every target)."""
    name, higher, log = VIEWS[key]
    rows = [r for r in rows if r["state"] == "complete" and r[key] is not None]
    done = [(r[key], r["val_error_percent"]) for r in rows]
    if done:
        ok = [p for p, r in zip(done, rows, strict=True) if r["within_budget"]]
        over = [p for p, r in zip(done, rows, strict=True) if not r["within_budget"]]
        words = ("meets the targets", "misses them") if targets else ("within budget", "over budget")
        for points, colour, what in ((ok, "tab:green", words[0]), (over, "tab:gray", words[1])):
            if points:
                ax.scatter(*zip(*points, strict=True), s=18, color=colour, label=f"trial, {what}")
        front = pareto_front(done, higher)
        step = "steps-pre" if higher else "steps-post"  # the best error within each x
        ax.plot(*zip(*front, strict=True), color="tab:orange", drawstyle=step, label="Pareto front")
    if math.isfinite(limit_percent):  # a size target alone has no error limit
        ax.axhline(limit_percent, color="tab:red", linestyle="--", label=f"budget ({limit_percent:.2f}%)")
    ax.axhline(baseline_percent, color="gray", linestyle=":", label=f"pretrained ({baseline_percent:.2f}%)")
    if key in targets:
        ax.axvline(targets[key], color="tab:purple", linestyle="--", label=f"target ({targets[key]:,g})")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(name)
    ax.legend(fontsize=8)


def write_config(values: dict, path) -> None:
    write_atomic(path, (json.dumps(values, indent=1) + "\n").encode())
