"""Running an exported file in ONNX Runtime the way it is best run (what tests and benchmarks time)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def quantises_activations(model) -> bool:
    """Whether the graph quantises activations (holds a ``QuantizeLinear``)."""
    return any(node.op_type == "QuantizeLinear" for node in model.graph.node)


def session(model, optimized_path=None, integer_kernels=None, threads=None):
    """An onnxruntime CPU session for ``model`` (ModelProto or bytes), run as it is best run
    (``optimized_path``: where ORT writes the graph it actually runs, to see its kernels;
    ``integer_kernels``: force ORT's QDQ fusion on or off, default on exactly when the model
    quantises activations; ``threads``: ORT's intra-op threads, default its own choice).

    Weights only quantised: ORT constant-folds ``Cast -> Gather(centres)`` by itself, but keeps
    ``DequantizeLinear`` for its QDQ int8 kernels unless ``session.disable_quant_qdq`` is set: without
    it the grid encoding re-decodes every weight on every call (LeNet-300-100, batch 1: 0.44 ms vs
    0.035 ms), so it is set. Activations quantised too (``QuantizeLinear`` in the graph): that is
    exactly what the QDQ fusion is for — ``MatMulIntegerToFloat`` integer kernels, as a plain
    ``onnxruntime.InferenceSession`` runs the file — so it is left on.
    """
    import onnxruntime as ort

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    integer_kernels = quantises_activations(proto) if integer_kernels is None else integer_kernels
    if not integer_kernels:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    else:  # ORT never folds a DequantizeLinear; decode those no integer kernel takes, once, here
        proto = fold_constant_dequantize(proto)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


_INTEGER_KERNEL_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}  # what ORT's QDQ fusion can turn integer


def fold_constant_dequantize(model) -> onnx.ModelProto:
    """A copy of ``model`` with every per-tensor ``DequantizeLinear`` of constants that feeds no
    matrix product (float leaves stored as codes: biases, LayerNorm) replaced by its float32 value:
    ONNX Runtime keeps such nodes to fuse QDQ patterns and would decode them on every call."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    consts = {i.name: i for i in graph.initializer}
    users: dict = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    keep, folded = [], []
    for node in graph.node:
        inputs = [consts.get(name) for name in node.input]
        constant = len(inputs) == 3 and all(i is not None for i in inputs)
        foldable = node.op_type == "DequantizeLinear" and constant
        if foldable and not users.get(node.output[0], set()) & _INTEGER_KERNEL_OPS:
            q, scale, zero_point = (numpy_helper.to_array(i) for i in inputs)
            if scale.size == 1 and zero_point.size == 1:
                zp, step = int(zero_point.reshape(-1)[0]), np.float32(scale.reshape(-1)[0])
                value = (q.astype(np.int32) - zp).astype(np.float32) * step
                folded.append(numpy_helper.from_array(value, node.output[0]))
                continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(folded)
    return model
