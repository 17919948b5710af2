"""The transformer tables: float / codebooks / codebooks + head pruning / W8A8 / W4A8 / W4A16.

    python bench/vit.py --data-dir ../shared/data --workdir runs/bench_vit [--retrain-epochs N]
    python bench/vit.py --config charlm_pydoc --workdir runs/bench_charlm     # the character model

For a language model (sequence labels) every row also gives the test perplexity.

    python bench/vit.py --latency runs/vit20_f6 runs/vit20_w8a8 --pretrained runs/bench_vit20/pretrained.gqz

times the ``model.onnx`` of finished runs against the float32 export of their pretrained model, side
by side in one process (ONNX Runtime as ``export.session`` runs them: integer kernels for quantised
activations), without training anything.

``vit_mnist`` (models/vit.py) is pretrained once (kept in WORKDIR/pretrained.gqz for reruns) and
retrained with the mixture prior once; every codebook row starts from that retrained model (compress,
then the mode's grid and calibrated activation quantisation, then fine-tuning); the head-pruning row
removes the quarter of heads with the lowest Q/K/V scores after pretraining and retrains. Selection
uses the validation split; the test error is reported. Latency: ONNX Runtime, median of interleaved
runs of every export against the float32 export in the same process (ratios, batch 1 and 64).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import numpy as np
from export import _latency as timed_runs  # bench/export.py: interleaved medians
from flax import nnx

import models
from gmm_quant.core import accounting
from gmm_quant.core.rules import flatten
from gmm_quant.formats import export, storage
from gmm_quant.run import config as cfgm
from gmm_quant.run import configs, model_stages, stages
from gmm_quant.run.plan import build_plan
from gmm_quant.search.trial import memory_runner
from gmm_quant.training import data

MODES = {"codebooks": "", "W8A8": "w8a8", "W4A8": "w4a8", "W4A16": "w4a16"}


def _pretrained(cfg, workdir, ctx, model):
    path = workdir / "pretrained.gqz"
    if path.is_file():
        return storage.load_compressed(path).params(model.params)
    params = stages.pretrain(ctx, model, stages.Record())[0].params
    storage.save_compressed(path, {}, params, model=cfg.model)
    return params


def _row(name, model, record, codebooks, x, encoding):
    apply_fn, final = model.apply_fn, model.params
    flat = {p: np.asarray(v) for p, v in flatten(final).items()}
    summary = accounting.summarize(codebooks, flat, removed=model.removed)
    onnx_model = export.to_onnx(apply_fn, final, codebooks, x[:8], encoding=encoding)
    export.verify(onnx_model, apply_fn, final, x[:256])
    heads = model.heads or {}
    kept = sum(len(h["kept"]) for h in heads.values()) if heads else None
    return {
        "variant": name,
        "test_error": record.errors.get("finetuned", record.errors.get("pretrained")),
        "test_perplexity": record.perplexities.get("finetuned", record.perplexities.get("pretrained")),
        "val_error": record.val_errors.get("finetuned", record.val_errors.get("pretrained")),
        "nonzero_percent": 100 * summary["nonzero_fraction"] if codebooks else 100.0,
        "heads_kept": kept,
        "compression_ratio": summary["compression_ratio"] if codebooks else 1.0,
        "onnx": onnx_model,
        "onnx_bytes": len(onnx_model.SerializeToString()),
    }


def _latency(rows, x, repeats):
    """Latency of every export relative to float32 at batch 1 and 64 (bench/export.py's timing)."""
    sessions = {r["variant"]: export.session(r["onnx"], integer_kernels=r.get("integer_kernels"))
                for r in rows}  # fmt: skip
    out = {}
    for batch in (1, 64):
        med = timed_runs(sessions, x[:batch], repeats)
        out[batch] = {k: v / med["float32"] for k, v in med.items()}
    return out


def run(args) -> list[dict]:
    fields = ("pretrain_epochs", "retrain_epochs", "finetune_epochs", "train_subset")
    given = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    cfg = cfgm.override(configs.load(args.config), given)
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    full = data.load(cfg.dataset, args.data_dir, cfg.train_subset or None)
    ds, val = data.split_validation(full, cfg.val_fraction, cfg.seed)
    train, test = (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)
    graphdef, params = nnx.split(models.create(cfg.model, cfg.seed), nnx.Param)

    def context(c):
        return stages.Context(c, train, val, memory_runner(c, train), test)

    apply_fn = lambda p, v: nnx.merge(graphdef, p)(v)  # noqa: E731
    ctx = context(cfg)
    pretrained = stages.Model(apply_fn, params, graphdef)
    pretrained = pretrained._replace(params=_pretrained(cfg, workdir, ctx, pretrained))
    record = stages.Record().scored(ctx, "pretrained", pretrained)
    rows = [_row("float32", pretrained, record, {}, ds.x_test, "codebook")]
    plan = build_plan(cfg, pretrained.params)
    mixtures, retrained, record = stages.retrain(ctx, plan, pretrained, record)
    for name, mode in MODES.items():
        c = context(dataclasses.replace(cfg, activation_mode=mode))
        codebooks, model, rec = stages.compress(c, plan, mixtures, retrained, record)
        model, rec = model_stages.quantise_activations(c, model, rec)
        codebooks, model, rec = stages.finetune(c, codebooks, model, rec, cfg.finetune_epochs)
        rows.append(_row(name, model, rec, codebooks, ds.x_test, "grid" if mode else "sparse"))
    c = context(dataclasses.replace(cfg, head_ratio=args.head_ratio))
    model, rec = model_stages.prune_heads(c, pretrained, record)
    plan_h = build_plan(c.cfg, model.params)
    mix_h, model, rec = stages.retrain(c, plan_h, model, rec)
    codebooks, model, rec = stages.compress(c, plan_h, mix_h, model, rec)
    codebooks, model, rec = stages.finetune(c, codebooks, model, rec, cfg.finetune_epochs)
    rows.append(_row(f"codebooks + heads ({args.head_ratio:.0%} pruned)", model, rec, codebooks, ds.x_test,
                     "sparse"))  # fmt: skip
    latency = _latency(rows, export.model_input(ds.x_test), args.repeats)
    for r in rows:
        r["latency_b1"], r["latency_b64"] = latency[1][r["variant"]], latency[64][r["variant"]]
        del r["onnx"]
    return rows


def latency_of_runs(workdirs, pretrained, data_dir, repeats) -> dict:
    """{name: (latency batch 1, batch 64)} of the runs' ONNX files relative to float32."""
    import onnx

    apply_fn, params, _cb, compressed = export.load_model_file(pretrained)
    ds = data.load((compressed.config or {}).get("dataset", "mnist"), data_dir)
    x = export.model_input(ds.x_test)
    rows = [
        {"variant": "float32", "onnx": export.to_onnx(apply_fn, params, {}, x[:8], remove_dead_units=False)}
    ]
    for w in workdirs:
        proto = onnx.load(pathlib.Path(w) / "model.onnx")
        rows.append({"variant": str(w), "onnx": proto})
        if export.quantises_activations(proto):  # the same file with ORT's integer kernels off
            rows.append({"variant": f"{w} (float kernels)", "onnx": proto, "integer_kernels": False})
    latency = _latency(rows, x, repeats)
    return {r["variant"]: (latency[1][r["variant"]], latency[64][r["variant"]]) for r in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", nargs="+", default=None, metavar="WORKDIR", help="time finished runs only")
    ap.add_argument("--pretrained", default=None, help="with --latency: the float32 model (.gqz)")
    ap.add_argument("--config", default="vit_mnist", help="vit_mnist or charlm_pydoc (or any transformer's)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--workdir", default="runs/bench_vit")
    ap.add_argument("--pretrain-epochs", type=int, default=None, help="default: the config's")
    ap.add_argument("--retrain-epochs", type=int, default=None)
    ap.add_argument("--finetune-epochs", type=int, default=None)
    ap.add_argument("--train-subset", type=int, default=None, help="first N training images (smoke runs)")
    ap.add_argument("--head-ratio", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    start = time.perf_counter()
    if args.latency:
        for name, (b1, b64) in latency_of_runs(
            args.latency, args.pretrained, args.data_dir, args.repeats
        ).items():
            print(f"{name:<34} batch 1 {b1:5.2f}x   batch 64 {b64:5.2f}x")
        return
    rows = run(args)
    head = f"{'variant':<34} {'test err':>8} {'ppl':>7} {'non-zero':>8} {'heads':>5} {'CR':>7} {'ONNX B':>8}"
    print(f"{head} {'b1':>6} {'b64':>6}")
    for r in rows:
        heads = "-" if r["heads_kept"] is None else str(r["heads_kept"])
        ppl = "-" if r["test_perplexity"] is None else f"{r['test_perplexity']:.3f}"
        print(f"{r['variant']:<34} {100 * r['test_error']:>7.2f}% {ppl:>7} {r['nonzero_percent']:>7.1f}% "
              f"{heads:>5} {r['compression_ratio']:>6.1f}x {r['onnx_bytes']:>8,} {r['latency_b1']:>5.2f}x "
              f"{r['latency_b64']:>5.2f}x")  # fmt: skip
    print(f"wall time {time.perf_counter() - start:.0f} s")
    (pathlib.Path(args.workdir) / "table.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
