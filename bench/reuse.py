"""Codebooks alone vs codebooks + cross-layer reuse on the ViT (issue 13).

    python bench/reuse.py --data-dir ../shared/data --workdir runs/bench_vit [--variants a,b]

Every variant starts from the same pretrained ``vit_mnist`` (WORKDIR/pretrained.gqz, written by
bench/vit.py or here) and runs the stages of ``python -m gmm_quant.train`` with the config's settings:
(reuse ->) retrain with the prior -> compress -> fine-tune. Variants (``VARIANTS``): codebooks alone;
reuse chosen greedily within +0.3 points of validation error; every later block's MLP matrices
reusing block 0's (rank 0, and rank 8); blocks 1 and 3 reusing every matrix of blocks 0 and 2; every
later block reusing every matrix of block 0; ``q_*``: the same with biases and embeddings under the
prior too. Reuse variants have the pretrained model as
distillation teacher. Columns: test and validation error, CR (Han, counting a shared matrix once
and the transforms as float32), the ``.gqz`` and ONNX file sizes (the ONNX file verified against
JAX). The test set is only reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import tempfile
import time

import numpy as np
from flax import nnx
from vit import _pretrained  # bench/vit.py: the pretrained model, kept in WORKDIR

import models
from gmm_quant.core import accounting
from gmm_quant.core.rules import flatten
from gmm_quant.formats import export, storage
from gmm_quant.run import config as cfgm
from gmm_quant.run import configs, model_stages, stages
from gmm_quant.run.plan import build_plan
from gmm_quant.search.trial import memory_runner
from gmm_quant.training import data

MLPS = r"blocks/[1-9]/(mlp_in|mlp_out)$=blocks/0/\1"  # every later block's MLPs reuse block 0's
LAYERS = r"(attn/(query|key|value|out)|mlp_in|mlp_out)$"
PAIRS = (rf"blocks/1/{LAYERS}=blocks/0/\1", rf"blocks/3/{LAYERS}=blocks/2/\1")  # odd blocks reuse even
ALL = rf"blocks/[1-9]/{LAYERS}=blocks/0/\1"  # every later block reuses all of block 0's matrices
EVERYTHING = {"quantise_biases": True, "keep_float": ()}
VARIANTS = {
    "codebooks": {},  # codebooks alone
    "greedy": {"reuse_budget": 0.3},  # links chosen greedily within +0.3 points of validation error
    "mlp_rank0": {"reuse": (MLPS,), "distill_alpha": 0.5},
    "mlp_rank8": {"reuse": (MLPS,), "reuse_rank": 8, "distill_alpha": 0.5},
    "pairs_rank0": {"reuse": PAIRS, "distill_alpha": 0.5},
    "all_rank0": {"reuse": (ALL,), "distill_alpha": 0.5},
    # every leaf but LayerNorm's and the transforms' scales under the prior (float leaves cap the CR)
    "q_codebooks": {**EVERYTHING},
    "q_mlp_rank0": {**EVERYTHING, "reuse": (MLPS,), "distill_alpha": 0.5},
    "q_all_rank0": {**EVERYTHING, "reuse": (ALL,), "distill_alpha": 0.5},
}  # fmt: skip


def variant(cfg, graphdef, pretrained, train, val, test, x_test) -> dict:
    ctx = stages.Context(cfg, train, val, memory_runner(cfg, train), test)
    model = stages.Model(lambda p, v: nnx.merge(graphdef, p)(v), pretrained, graphdef)
    record = stages.Record().scored(ctx, "pretrained", model)
    model, record = model_stages.reuse_layers(ctx, model, record)
    plan = build_plan(cfg, model.params)
    mixtures, model, record = stages.retrain(ctx, plan, model, record)
    codebooks, model, record = stages.compress(ctx, plan, mixtures, model, record)
    codebooks, model, record = stages.finetune(ctx, codebooks, model, record, cfg.finetune_epochs)
    final = model.params
    summary = accounting.summarize(codebooks, {p: np.asarray(v) for p, v in flatten(final).items()},
                                   removed=model.removed)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "model.gqz"
        storage.save_compressed(path, codebooks, final, model=cfg.model, reuse=list(model.links))
        info = export.export_file(
            path, pathlib.Path(tmp) / "model.onnx", sample=x_test[:256], encoding="sparse"
        )
        gqz = path.stat().st_size
    return {
        "links": [dataclasses.asdict(link) for link in model.links],
        "test_error": record.errors["finetuned"], "val_error": record.val_errors["finetuned"],
        "val_error_reused": record.val_errors.get("reused"), "errors": record.errors,
        "compression_ratio": summary["compression_ratio"], "gqz_bytes": gqz, "onnx_bytes": info["bytes"],
    }  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="vit_mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--workdir", default="runs/bench_vit")
    ap.add_argument("--retrain-epochs", type=int, default=None, help="default: the config's")
    ap.add_argument("--train-subset", type=int, default=None, help="first N training images (smoke runs)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated keys of VARIANTS")
    args = ap.parse_args()
    given = {"retrain_epochs": args.retrain_epochs, "train_subset": args.train_subset}
    cfg = cfgm.override(configs.load(args.config), {k: v for k, v in given.items() if v is not None})
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ds, val = data.split_validation(data.load(cfg.dataset, args.data_dir, cfg.train_subset or None),
                                    cfg.val_fraction, cfg.seed)  # fmt: skip
    train, test = (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)
    graphdef, params = nnx.split(models.create(cfg.model, cfg.seed), nnx.Param)
    ctx = stages.Context(cfg, train, val, memory_runner(cfg, train), test)
    pretrained = _pretrained(cfg, workdir, ctx, stages.Model(lambda p, v: nnx.merge(graphdef, p)(v), params))
    rows = {}
    print(f"{'variant':<12} {'test err':>8} {'val err':>8} {'CR':>7} {'.gqz B':>8} {'ONNX B':>8}  seconds")
    for name in args.variants.split(","):
        start = time.perf_counter()
        c = dataclasses.replace(cfg, **VARIANTS[name])
        rows[name] = r = variant(c, graphdef, pretrained, train, val, test, ds.x_test)
        r["seconds"] = time.perf_counter() - start
        print(f"{name:<12} {100 * r['test_error']:>7.2f}% {100 * r['val_error']:>7.2f}% "
              f"{r['compression_ratio']:>6.1f}x {r['gqz_bytes']:>8,} {r['onnx_bytes']:>8,}  "
              f"{r['seconds']:.0f}", flush=True)  # fmt: skip
        (workdir / "reuse_table.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
