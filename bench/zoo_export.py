"""Export time of every zoo model (models/zoo.py): build the graph, check it, verify in ONNX Runtime.

    python bench/zoo_export.py [--repeats 3]

Per model and encoding: the median seconds of ``gmm_quant.export.to_onnx`` (trace, convert, full
``onnx.checker`` check, strict shape inference) and of building an ONNX Runtime session, the number of
graph nodes and the file size. Runtime: about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from flax import nnx

import gmm_quant as gq
from gmm_quant.core import grid
from gmm_quant.formats import export
from models.zoo import ZOO


def _inputs(kind, batch):
    rng = np.random.default_rng(0)
    if kind == "tokens":
        return rng.integers(0, 50, size=(batch, 5)).astype(np.int32)
    return rng.normal(size=(batch, *kind)).astype(np.float32)


def _compressed(make):
    graphdef, params, rest = nnx.split(make(), nnx.Param, ...)
    plan = gq.make_plan(params, mixture=gq.MixtureConfig(num_components=9))
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    return (lambda p, x: nnx.merge(graphdef, p, rest)(x)), snapped, codebooks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'model':<30} {'encoding':<9} {'to_onnx s':>9} {'session s':>9} {'nodes':>6} {'bytes':>8}")
    for name, (make, kind) in ZOO.items():
        apply_fn, params, codebooks = _compressed(make)
        for encoding in export.ENCODINGS:
            cbs = {p: grid.to_grid(cb, 4) for p, cb in codebooks.items()} if encoding == "grid" else codebooks
            p = gq.dequantize(cbs, params)
            build, load = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model = export.to_onnx(apply_fn, p, cbs, _inputs(kind, 8), encoding=encoding)
                build.append(time.perf_counter() - start)
                start = time.perf_counter()
                export.session(model)
                load.append(time.perf_counter() - start)
            size = len(model.SerializeToString())
            times = f"{statistics.median(build):>9.3f} {statistics.median(load):>9.3f}"
            print(f"{name:<30} {encoding:<9} {times} {len(model.graph.node):>6d} {size:>8d}")


if __name__ == "__main__":
    main()
