"""Per-layer sensitivity: how much error each quantised layer alone costs when snapped or pruned.

    python -m gmm_quant.sensitivity WORKDIR [--ks 3,5,9,17] [--fractions 0.5,0.9,0.99]

For every quantised layer of a run's pretrained model, with all other layers untouched: the error
on the run's validation split (held out of the training data, ``val_fraction``; the test set is never
read) when the layer is snapped to ``k`` centres of its own 1-D k-means, and when its smallest ``p``
of weights (by magnitude) are zeroed. No training: seconds for LeNet-5. Writes
``sensitivity.json`` and ``sensitivity.png`` (a heat map of the error increase) into WORKDIR and
prints the table. Meant to seed or bound a search over per-layer settings.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

from gmm_quant import cli, loop
from gmm_quant.checkpoint import write_atomic
from gmm_quant.codebook import kmeans_1d, snap
from gmm_quant.rules import flatten, replace_leaves

VAL_FRACTION = 0.1


def zero_smallest(weights, fraction: float) -> np.ndarray:
    w = np.asarray(weights, np.float32)
    if fraction <= 0:
        return w
    cut = np.quantile(np.abs(w), fraction)
    return np.where(np.abs(w) <= cut, np.float32(0), w)


def layer_sensitivity(apply_fn, params, paths, val, *, ks=(3, 5, 9, 17), fractions=(0.5, 0.9, 0.99)):
    """``{"baseline": error, "layers": {path: {"k=3": error, ..., "zero 50%": error}}}`` on ``val``."""
    flat = flatten(params)
    out = {"baseline": loop.error_rate(apply_fn, params, *val), "layers": {}}
    for path in paths:
        w = np.asarray(flat[path], np.float32)
        row = {}
        for k in ks:
            centres = kmeans_1d(w, k, init="quantile", iterations=30)
            snapped = centres[snap(w, centres)]
            row[f"k={k}"] = loop.error_rate(apply_fn, replace_leaves(params, {path: snapped}), *val)
        for p in fractions:
            pruned = zero_smallest(w, p)
            row[f"zero {100 * p:g}%"] = loop.error_rate(
                apply_fn, replace_leaves(params, {path: pruned}), *val
            )
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


def pretrained_model(workdir: pathlib.Path, data_dir=None, pretrained=None):
    """``(apply_fn, params, quantised paths, val)`` of a run's pretrained model (or of ``pretrained``,
    a ``.gqz`` file or another work directory) with the run's validation split: what the analysis
    commands (this one, ``gmm_quant.reuse``) examine."""
    from flax import nnx

    from gmm_quant import data, run, stages
    from gmm_quant import workdir as workdir_lib
    from gmm_quant.model_spec import make_model

    cfg = workdir_lib.saved_config(workdir)
    graphdef, like = nnx.split(make_model(cfg.model, cfg.seed), nnx.Param)
    if pretrained is not None:
        params = run._load_pretrained(pretrained, like)
    else:
        params = run.pretrained_params(workdir, like)
        if params is None:
            raise FileNotFoundError(f"{workdir}: no intact pretraining checkpoint")
    ds = data.load(cfg.dataset, data_dir, cfg.train_subset or None)
    # the run's own held-out split; runs made before it existed (val_fraction 0) get a fresh 10%,
    # which they have trained on
    _ds, val = data.split_validation(ds, cfg.val_fraction or VAL_FRACTION, cfg.seed)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    return apply_fn, params, stages.build_plan(cfg, params).quantised(), val


def _run(workdir: pathlib.Path, ks, fractions, data_dir=None) -> dict:
    apply_fn, params, paths, val = pretrained_model(workdir, data_dir)
    return layer_sensitivity(apply_fn, params, paths, val, ks=ks, fractions=fractions)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = cli.Parser(prog="python -m gmm_quant.sensitivity", description=__doc__.splitlines()[0])
    ap.add_argument("workdir", help="a work directory with a finished pretraining")
    ap.add_argument(
        "--data-dir", default=None, help="directory with the MNIST .gz files (or $GMM_QUANT_DATA)"
    )
    ap.add_argument("--ks", default="3,5,9,17", help="numbers of centres to try per layer")
    ap.add_argument("--fractions", default="0.5,0.9,0.99", help="fractions of smallest weights to zero")
    cli.add_debug_flag(ap)
    args = ap.parse_args(argv)

    def body() -> int:
        cli.quiet_libraries(argv)
        ks = tuple(int(v) for v in args.ks.split(","))
        fractions = tuple(float(v) for v in args.fractions.split(","))
        if min(ks) < 1 or not all(0 <= f < 1 for f in fractions):
            raise ValueError("--ks must be >= 1 and --fractions in [0, 1)")
        workdir = pathlib.Path(args.workdir)
        result = _run(workdir, ks, fractions, args.data_dir)
        write_atomic(workdir / "sensitivity.json", json.dumps(result, indent=1).encode())
        plot(result, workdir / "sensitivity.png")
        print(format_table(result))
        return 0

    return cli.run(body, argv)


if __name__ == "__main__":
    cli.exit_now(main())
