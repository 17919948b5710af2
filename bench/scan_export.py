"""A scanned stack of blocks in ONNX: unrolled (what gmm_quant's exporter writes) against an ONNX
``Loop`` over the stacked weights, timed side by side in ONNX Runtime on this machine.

The block is a transformer-style residual MLP, ``x + W2 relu(W1 LayerNorm(x))`` with weights stacked
[layers, ...] as ``nnx.vmap`` builds them and ``nnx.scan`` runs them. Both graphs hold the same stacked
initializers; the unrolled one slices them per block (constant-folded by ORT at load), the ``Loop``
one gathers block ``i`` inside its body at run time. Outputs are checked equal before timing.

    python bench/scan_export.py                       # ~1 min on 2 cores
    python bench/scan_export.py --layers 4 12 --dim 128 256 --batches 1 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _block(prefix, x, w1, w2, nodes):
    """Nodes of one block reading weights named ``w1``/``w2``; returns the output name."""
    ln = f"{prefix}_ln"
    nodes.append(helper.make_node("LayerNormalization", [x, "ln_scale", "ln_bias"], [ln], axis=-1))
    nodes.append(helper.make_node("MatMul", [ln, w1], [f"{prefix}_h"]))
    nodes.append(helper.make_node("Relu", [f"{prefix}_h"], [f"{prefix}_r"]))
    nodes.append(helper.make_node("MatMul", [f"{prefix}_r", w2], [f"{prefix}_o"]))
    nodes.append(helper.make_node("Add", [x, f"{prefix}_o"], [f"{prefix}_y"]))
    return f"{prefix}_y"


def _common(weights, dim):
    w1, w2 = weights
    return [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.ones(dim, np.float32), "ln_scale"),
        numpy_helper.from_array(np.zeros(dim, np.float32), "ln_bias"),
    ]


def _io(dim):
    return (helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim]))  # fmt: skip


def unrolled(weights, dim) -> onnx.ModelProto:
    nodes, inits, x = [], _common(weights, dim), "x"
    for i in range(weights[0].shape[0]):
        for name in ("w1", "w2"):
            idx = numpy_helper.from_array(np.asarray(i, np.int64), f"{name}_at{i}")
            inits.append(idx)
            nodes.append(helper.make_node("Gather", [name, idx.name], [f"{name}_{i}"], axis=0))
        x = _block(f"b{i}", x, f"w1_{i}", f"w2_{i}", nodes)
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    return helper.make_model(helper.make_graph(nodes, "unrolled", [_io(dim)[0]], [_io(dim)[1]], inits))


def looped(weights, dim) -> onnx.ModelProto:
    body_nodes = [
        helper.make_node("Gather", ["w1", "i"], ["w1_i"], axis=0),
        helper.make_node("Gather", ["w2", "i"], ["w2_i"], axis=0),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ]
    out = _block("b", "x_in", "w1_i", "w2_i", body_nodes)
    body_nodes.append(helper.make_node("Identity", [out], ["x_out"]))
    value = lambda n, t, s: helper.make_tensor_value_info(n, t, s)  # noqa: E731
    body = helper.make_graph(
        body_nodes,
        "block",
        [value("i", TensorProto.INT64, []), value("cond_in", TensorProto.BOOL, []),
         value("x_in", TensorProto.FLOAT, ["batch", dim])],
        [value("cond_out", TensorProto.BOOL, []), value("x_out", TensorProto.FLOAT, ["batch", dim])],
    )  # fmt: skip
    trips = numpy_helper.from_array(np.asarray(weights[0].shape[0], np.int64), "trips")
    inits = [*_common(weights, dim), trips, numpy_helper.from_array(np.asarray(True), "cond")]
    nodes = [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)]
    return helper.make_model(helper.make_graph(nodes, "looped", [_io(dim)[0]], [_io(dim)[1]], inits))


def _session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_ms(session, x, runs: int) -> float:
    for _ in range(10):
        session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 12], help="blocks in the stack")
    ap.add_argument("--dim", type=int, nargs="+", default=[128, 256], help="model widths")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="batch sizes timed")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per cell (median reported)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'layers':>6} {'dim':>5} {'batch':>5} {'unrolled ms':>11} {'Loop ms':>8} {'Loop/unrolled':>13}")
    for layers in args.layers:
        for dim in args.dim:
            weights = tuple((rng.normal(0, dim**-0.5, (layers, a, b))).astype(np.float32)
                            for a, b in ((dim, 4 * dim), (4 * dim, dim)))  # fmt: skip
            flat, loop = _session(unrolled(weights, dim)), _session(looped(weights, dim))
            for batch in args.batches:
                x = rng.normal(size=(batch, dim)).astype(np.float32)
                want = flat.run(None, {"x": x})[0]  # same maths, other order: float32 rounding apart
                np.testing.assert_allclose(loop.run(None, {"x": x})[0], want, atol=1e-5 * np.abs(want).max())
                runs = args.runs if batch < 16 else max(20, args.runs // 4)
                a, b = [], []
                for _ in range(3):  # interleaved: both see the same machine
                    a.append(median_ms(flat, x, runs))
                    b.append(median_ms(loop, x, runs))
                ua, lb = statistics.median(a), statistics.median(b)
                print(f"{layers:>6} {dim:>5} {batch:>5} {ua:>11.3f} {lb:>8.3f} {lb / ua:>13.2f}")


if __name__ == "__main__":
    main()
