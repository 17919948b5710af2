"""Cross-layer reuse candidates: which same-shaped layers could share one stored matrix.

    python -m gmm_quant.reuse WORKDIR [--pretrained FILE.gqz] [--pattern REGEX] [--evaluate N]

For every ordered pair (target, source) of same-shaped quantised kernels of a run's pretrained
model: the per-output-channel scale ``s`` (last axis) that best maps the source onto the target
(least squares, channel by channel) and the similarity ``1 - ||target - source * s||^2 /
||target||^2`` — the share of the target's energy the scaled source explains (1: the same matrix up
to channel scales; 0: no better than zeros). For the ``N`` most similar pairs, the validation error
when the target is replaced by the scaled source (its bias kept): what reusing the source with a
per-channel output scale would cost before any retraining. Writes ``reuse.json`` and ``reuse.png``
(similarity heat map) into WORKDIR and prints the table. The validation split is the run's; the
test set is never read.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import re
import sys

import numpy as np

from gmm_quant import cli, loop
from gmm_quant.checkpoint import write_atomic
from gmm_quant.rules import flatten, replace_leaves


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


def _run(workdir: pathlib.Path, pattern: str, evaluate: int, data_dir=None, pretrained=None) -> dict:
    from gmm_quant.sensitivity import pretrained_model

    apply_fn, params, quantised, val = pretrained_model(workdir, data_dir, pretrained)
    paths = [p for p in quantised if re.search(pattern, p)]
    if len(paths) < 2:
        raise ValueError(f"--pattern {pattern!r} matches {len(paths)} quantised layer(s); reuse needs two")
    return reuse_table(apply_fn, params, paths, val, evaluate)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = cli.Parser(prog="python -m gmm_quant.reuse", description=__doc__.splitlines()[0])
    ap.add_argument("workdir", help="a run's work directory (its config; results are written there)")
    ap.add_argument(
        "--pretrained",
        default=None,
        help="the model to examine: a .gqz file or a work directory "
        "with a pretraining (default: WORKDIR's own pretraining)",
    )
    ap.add_argument(
        "--data-dir", default=None, help="directory with the MNIST .gz files (or $GMM_QUANT_DATA)"
    )
    ap.add_argument("--pattern", default=".", help="regex of the quantised layers to compare")
    ap.add_argument("--evaluate", type=int, default=10, help="validation error of the N most similar pairs")
    cli.add_debug_flag(ap)
    args = ap.parse_args(argv)

    def body() -> int:
        cli.quiet_libraries(argv)
        if args.evaluate < 0:
            raise ValueError(f"--evaluate must be >= 0, got {args.evaluate}")
        try:
            re.compile(args.pattern)
        except re.error as err:
            raise ValueError(f"--pattern {args.pattern!r} is not a regular expression ({err})") from None
        workdir = pathlib.Path(args.workdir)
        result = _run(workdir, args.pattern, args.evaluate, args.data_dir, args.pretrained)
        write_atomic(workdir / "reuse.json", json.dumps(result, indent=1).encode())
        plot(result, workdir / "reuse.png")
        print(format_table(result))
        return 0

    return cli.run(body, argv)


if __name__ == "__main__":
    cli.exit_now(main())
