"""Convert a traced JAX model (its jaxpr) into an ONNX graph, quantised weights kept compressed.

``convert(fn, leaves, paths, encoders, sample, opset=...)`` traces ``fn(leaves, x)`` and walks the
jaxpr through a table of handlers, one small function per primitive family (``ops_elementwise``,
``ops_shape``, ``ops_nn``; the walk, layouts and constant folding are in ``converter``). Leaves named
in ``encoders`` are decoded inside the graph from their compressed form (see ``gmm_quant.export``).

Why our own converter rather than jax2onnx (0.17.1): it pins orbax-checkpoint < 0.11.37, which would
downgrade the orbax this project checkpoints with, and adds 29 packages; it cannot keep a weight as
``Cast -> Gather(centres)`` over UINT4 indices without rewriting its output; and it took 4.2 s for
LeNet-300-100 where this converter takes about 0.1 s (BENCHMARKS.md, "Export"). Extending the table
to Flax's standard layers cost about 450 lines.

A primitive without a handler raises ``NotImplementedError`` naming it and where in the model it is.
"""

from __future__ import annotations

import jax
import numpy as np
from onnx import helper

from gmm_quant.formats.onnx_export import ops_control, ops_elementwise, ops_nn, ops_quant, ops_shape  # noqa: F401
from gmm_quant.formats.onnx_export.converter import HANDLERS, TRACE_BATCH, Converter, host, onnx_dtype
from gmm_quant.formats.onnx_export.values import Sym, WeightRef, identity

__all__ = ["COMPUTE_DTYPE", "HANDLERS", "TRACE_BATCH", "convert", "supported_primitives"]
COMPUTE_DTYPE = "gmm_quant.compute_dtype"  # metadata: the lowest float precision the model computes in


def supported_primitives() -> list[str]:
    return sorted(HANDLERS)


def _trace_input(sample: np.ndarray) -> np.ndarray:
    """``sample`` repeated to ``TRACE_BATCH`` rows: the batch dimension is recognised by its size."""
    reps = -(-TRACE_BATCH // sample.shape[0])
    return np.concatenate([sample] * reps)[:TRACE_BATCH]


def convert(
    apply_fn, params_leaves: list, paths: list, encoders: dict, sample, *, opset: int, name="gmm_quant",
    codebooks=None, make=None, remove_dead_units=True,
):  # fmt: skip
    """ONNX ModelProto of ``apply_fn(leaves, x)``; leaves whose path is in ``encoders`` stay compressed.

    With ``codebooks`` ({path: Codebook}) and the encoding's factory ``make``, units whose weights are
    all zero are removed from the graph (``units``) unless ``remove_dead_units`` is False."""
    sample = np.asarray(sample)
    traced = _trace_input(sample)
    closed = jax.make_jaxpr(apply_fn)(params_leaves, traced)
    conv = Converter(remove_dead_units=remove_dead_units)
    codebooks = codebooks or {}
    inputs = [
        WeightRef(p, encoders[p], np.shape(leaf), codebooks.get(p), make)
        if p in encoders
        else np.asarray(leaf)
        for p, leaf in zip(paths, params_leaves, strict=True)
    ]
    x = Sym("input", identity(traced.ndim), tuple(traced.shape))
    (out,) = conv.run(closed.jaxpr, [*inputs, x], [host(c) for c in closed.consts])
    out_name = conv.plain(out)
    conv.nodes.append(helper.make_node("Identity", [out_name], ["output"]))
    out_dtype = onnx_dtype(closed.out_avals[0].dtype)
    out_shape = ["N" if conv.is_batch(s) else s for s in closed.out_avals[0].shape]
    graph = helper.make_graph(
        conv.nodes, name,
        [helper.make_tensor_value_info("input", onnx_dtype(sample.dtype), ["N", *sample.shape[1:]])],
        [helper.make_tensor_value_info("output", out_dtype, out_shape)],
        conv.initializers,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="gmm_quant"
    )
    if conv.half:  # the model computes (partly) in half precision: the graph rounds where it does
        lowest = min(conv.half, key=lambda d: jax.numpy.finfo(d).nmant)
        helper.set_model_props(model, {COMPUTE_DTYPE: np.dtype(lowest).name})
    return model
