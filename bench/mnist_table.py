"""The paper's MNIST table, side by side with the baselines, from one pretrained model per architecture.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
        python bench/mnist_table.py --data-dir ../shared/data --workdir runs/table [--quick] [--models ...]

Methods, all from the same pretrained weights (the shipped config's pretraining):
  sws-default   the shipped config (gmm_quant/run/configs/<model>.py) through ``train_and_evaluate``
  sws-best      the best settings found (BEST below), same pretrained weights
  kmeans        per-layer k-means (linear init, as many clusters as sws-best keeps) + centroid fine-tuning
  kmeans+prune  magnitude pruning to sws-best's per-layer sparsity, then the same
  prune+retrain+kmeans  Deep Compression in full: prune, retrain the survivors, k-means, fine-tune
  int8 / int4   uniform symmetric per-tensor post-training quantisation
Prints a markdown table per model and writes ``table.json`` in the work directory.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import baselines

import gmm_quant as gq
import models
from gmm_quant.core import accounting
from gmm_quant.run import config, configs
from gmm_quant.run import job as run
from gmm_quant.run.pretrained import load_pretrained
from gmm_quant.training import data, loop

WEAK = {"zero_gamma": "500,0.1", "gamma": "50,0.01"}  # weaker Gamma hyper-priors than the tutorial's
BEST = {
    "lenet300_100": {"tau": "0.07", **WEAK, "prune_threshold": "0.0005", "finetune_epochs": "10"},
    "lenet5_caffe": {"tau": "0.15", **WEAK},
}
QUICK = {
    "train_subset": "10000",
    "batch_size": "64",
    "pretrain_epochs": "10",
    "retrain_epochs": "30",
    "warmup_epochs": "3",
    "finetune_epochs": "3",
    "tau": "0.007",
}


def _row(method, errors, summary, seconds, codebooks):
    return {
        "method": method,
        "error_pretrained": errors[0],
        "error_final": errors[1],
        "nonzero_percent": 100 * summary["nonzero_fraction"],
        "centres": [len(cb.centres) for cb in codebooks.values()],
        "compression_ratio": summary["compression_ratio"],
        "packed_ratio": summary["packed_ratio"],
        "seconds": seconds,
    }


def _sws(cfg, workdir, data_dir, pretrained=None):
    t0 = time.perf_counter()
    m = run.train_and_evaluate(cfg, workdir, data_dir=data_dir, pretrained=pretrained, progress=False,
                               export_onnx=False)  # fmt: skip
    seconds = time.perf_counter() - t0 - m["seconds"]["pretrain"]
    loaded = gq.load_compressed(pathlib.Path(workdir) / "model.gqz")
    return m, loaded.codebooks, seconds


def _baseline(name, make_codebook, params, apply_fn, ds, cfg, finetune):
    t0 = time.perf_counter()
    flat = gq.core.rules.flatten(params)
    codebooks = {p: make_codebook(p, np.asarray(w)) for p, w in flat.items() if p.endswith("kernel")}
    snapped = gq.dequantize(codebooks, params)
    if finetune:
        codebooks, snapped = gq.finetune(apply_fn, codebooks, snapped, (ds.x_train, ds.y_train),
                                         epochs=cfg.finetune_epochs, batch_size=cfg.batch_size,
                                         learning_rate=cfg.finetune_lr)  # fmt: skip
    error = loop.error_rate(apply_fn, snapped, ds.x_test, ds.y_test)
    return error, accounting.summarize(codebooks, snapped), time.perf_counter() - t0, codebooks


def table_for(model, args):
    wd = pathlib.Path(args.workdir) / model
    base = configs.load(model)
    overrides = QUICK if args.quick else {}
    cfg_default = config.override(base, overrides)
    m0, cb0, s0 = _sws(cfg_default, wd / "sws-default", args.data_dir)
    rows = [_row("sws-default", (m0["error_pretrained"], m0["error_finetuned"]), m0, s0, cb0)]
    best_over = {**BEST[model], **overrides} if not args.quick else {**overrides, "prune_threshold": "0.0005"}
    cfg_best = config.override(base, {**best_over, "pretrain_epochs": "0"})
    m1, cb1, s1 = _sws(cfg_best, wd / "sws-best", args.data_dir, pretrained=wd / "sws-default")
    rows.append(_row("sws-best", (m1["error_pretrained"], m1["error_finetuned"]), m1, s1, cb1))

    graphdef, like = nnx.split(models.create(model), nnx.Param)
    params = load_pretrained(wd / "sws-default", like)
    ds = data.load("mnist", args.data_dir, cfg_default.train_subset or None)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    k = {p: len(cb.centres) for p, cb in cb1.items()}
    keep = {p: float(np.mean(cb.indices != 0)) for p, cb in cb1.items()}
    err0 = m0["error_pretrained"]
    variants = [
        ("kmeans", lambda p, w: baselines.kmeans_codebook(w, k[p]), True),
        ("kmeans+prune", lambda p, w: baselines.kmeans_codebook(w, k[p], keep[p]), True),
        ("int8", lambda p, w: baselines.uniform_codebook(w, 8), False),
        ("int4", lambda p, w: baselines.uniform_codebook(w, 4), False),
    ]
    for name, make, tune in variants:
        err, summary, secs, cbs = _baseline(name, make, params, apply_fn, ds, cfg_default, tune)
        rows.append(_row(name, (err0, err), summary, secs, cbs))
    # Deep Compression in full: prune, retrain the survivors, then k-means + centroid fine-tuning
    t0 = time.perf_counter()
    pruned = baselines.retrain_pruned(apply_fn, params, baselines.magnitude_masks(params, keep),
                                      (ds.x_train, ds.y_train), epochs=cfg_default.finetune_epochs,
                                      batch_size=cfg_default.batch_size)  # fmt: skip

    def pruned_kmeans(p, w):
        return baselines.kmeans_codebook(w, k[p], keep[p])

    err, summary, _, cbs = _baseline(
        "prune+retrain+kmeans", pruned_kmeans, pruned, apply_fn, ds, cfg_default, True
    )
    rows.append(_row("prune+retrain+kmeans", (err0, err), summary, time.perf_counter() - t0, cbs))
    return rows, m0["seconds"]["pretrain"]


def markdown(model, rows, pretrain_seconds):
    lines = [
        f"**{model}** (pretraining {pretrain_seconds:.0f} s)",
        "",
        "| method | error pretrained -> final | non-zero % | centres per layer | CR (Han) | packed CR "
        "| wall time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {100 * r['error_pretrained']:.2f}% -> {100 * r['error_final']:.2f}% | "
            f"{r['nonzero_percent']:.2f} | {r['centres']} | {r['compression_ratio']:.1f}x | "
            f"{r['packed_ratio']:.1f}x | {r['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--workdir", default="runs/table")
    ap.add_argument("--models", nargs="+", default=["lenet300_100", "lenet5_caffe"])
    ap.add_argument("--quick", action="store_true", help="10k training images, few epochs: a smoke check")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = {}
    for model in args.models:
        rows, pre = table_for(model, args)
        results[model] = {"rows": rows, "pretrain_seconds": pre}
        print(markdown(model, rows, pre), flush=True)
        print()
    total = time.perf_counter() - t0
    print(f"total wall time: {total / 60:.1f} min")
    out = pathlib.Path(args.workdir) / "table.json"
    out.write_text(json.dumps({"results": results, "total_seconds": total, "quick": args.quick}, indent=1))


if __name__ == "__main__":
    main()
