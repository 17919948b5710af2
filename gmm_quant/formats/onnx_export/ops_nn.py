"""Layer primitives: dot_general (MatMul / Einsum), convolutions, pooling windows, reductions."""

from __future__ import annotations

import string

import numpy as np

from gmm_quant.formats.onnx_export import units
from gmm_quant.formats.onnx_export.converter import onnx_dtype, register
from gmm_quant.formats.onnx_export.values import Narrow, Sym, WeightRef, identity


def _out_shape(eqn) -> tuple:
    return tuple(eqn.outvars[0].aval.shape)


def _operand(conv, value, perm) -> str:
    """A dot/conv operand in layout ``perm``; quantised weights are decoded directly in that layout."""
    if isinstance(value, WeightRef):
        return value.materialise(conv, perm).name
    if isinstance(value, Sym):
        return conv.layout(value, perm)
    return conv.const(np.transpose(conv.broadcastable(np.asarray(value, np.float32)), perm), "weight")


def _rank(value) -> int:
    return len(value.shape) if isinstance(value, (Sym, WeightRef, Narrow)) else np.ndim(value)


def _matmul(conv, x, w, shape):
    out = conv.node("MatMul", [_operand(conv, x, identity(_rank(x))), _operand(conv, w, (0, 1))])
    return Sym(out, identity(len(shape)), shape)


@register("dot_general", narrow=True)
def dot_general(conv, eqn, x, w):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    shape = _out_shape(eqn)
    nx, nw = _rank(x), _rank(w)
    if not lb and tuple(lc) == (nx - 1,) and tuple(rc) == (0,) and nw == 2:  # x @ W: MatMul
        if conv.remove_dead_units and (isinstance(x, Narrow) or units.weight_array(w) is not None):
            return units.narrow_matmul(conv, eqn, x, w, _matmul)
        return _matmul(conv, x, w, shape)
    x, w = conv.full(x), conv.full(w)
    k = len(lc)
    trailing = tuple(lc) == tuple(range(nx - k, nx)) and tuple(rc) == tuple(range(k))
    flat = _flat_weight(w, k) if not lb and trailing else None
    if flat is not None:
        return _dense_general(conv, x, flat, k, shape)
    letters = iter(string.ascii_lowercase)
    xs, ws = [next(letters) for _ in range(nx)], [None] * nw
    for i, j in zip(lb, rb, strict=True):
        ws[j] = xs[i]
    for i, j in zip(lc, rc, strict=True):
        ws[j] = xs[i]
    ws = [c or next(letters) for c in ws]
    free_x = [xs[i] for i in range(nx) if i not in lb and i not in lc]
    free_w = [ws[j] for j in range(nw) if j not in rb and j not in rc]
    equation = f"{''.join(xs)},{''.join(ws)}->{''.join([xs[i] for i in lb] + free_x + free_w)}"
    inputs = [_operand(conv, x, identity(nx)), _operand(conv, w, identity(nw))]
    return Sym(conv.node("Einsum", inputs, equation=equation), identity(len(shape)), shape)


def _flat_weight(w, k: int):
    """The weight as a 2-D [contracted, free] matrix (a WeightRef or constant), or None."""
    if isinstance(w, WeightRef) and w.codebook is not None and w.make is not None:
        cb = w.codebook
        rows = int(np.prod(w.shape[:k]))
        if cb.slices > 1 and rows % cb.slices:  # a codebook per slice cannot follow this reshape
            return None
        centres = np.repeat(cb.centres, rows // cb.slices, axis=0) if cb.slices > 1 else cb.centres
        flat = cb._replace(centres=centres, indices=np.asarray(cb.indices).reshape(rows, -1))
        return WeightRef(w.path, w.make(flat), flat.indices.shape, flat, w.make)
    if isinstance(w, Sym | Narrow):
        return None
    arr = np.asarray(w, np.float32)
    return arr.reshape(int(np.prod(arr.shape[:k])), -1)


def _dense_general(conv, x, flat, k, shape):
    """``x`` contracted over its last ``k`` axes with a weight's first ``k`` (Flax's LinearGeneral,
    attention projections): one MatMul with the weight ``flat`` flattened to 2-D offline, so that a
    quantised weight's DequantizeLinear feeds the MatMul directly and ONNX Runtime can fuse integer
    kernels."""
    x = conv.sym(x)
    lead = x.shape[: len(x.shape) - k]
    name = conv.plain(x)
    if k > 1:
        name = conv.node("Reshape", [name, conv.shape_tensor((*lead, int(np.prod(x.shape[-k:]))))])
    out = conv.node("MatMul", [name, _operand(conv, flat, (0, 1))])
    if len(shape) != len(lead) + 1:
        out = conv.node("Reshape", [out, conv.shape_tensor(shape)])
    return Sym(out, identity(len(shape)), shape)


def _dilate(conv, name, spatial_axes_nc, factors, shape_nc):
    """Insert ``factor - 1`` zeros between input elements along the spatial axes (lhs dilation)."""
    for axis, factor in zip(spatial_axes_nc, factors, strict=True):
        if factor == 1:
            continue
        n = shape_nc[axis]
        # [.., n, ..] -> [.., n, 1, ..] -> pad to [.., n, f, ..] -> [.., n*f, ..] -> slice to (n-1)*f+1
        unsq = conv.node("Unsqueeze", [name, conv.const(np.asarray([axis + 1], np.int64), "axes")])
        pads = np.zeros(2 * (len(shape_nc) + 1), np.int64)
        pads[len(shape_nc) + 1 + axis + 1] = factor - 1
        padded = conv.node("Pad", [unsq, conv.const(pads, "pads")])
        dims = [0 if i < axis else s for i, s in enumerate(shape_nc)]  # 0: copy (the batch, axis 0)
        dims[axis] = n * factor
        merged = conv.node("Reshape", [padded, conv.const(np.asarray(dims, np.int64), "shape")])
        ends = conv.const(np.asarray([(n - 1) * factor + 1], np.int64), "ends")
        zero, ax = conv.const(np.asarray([0], np.int64)), conv.const(np.asarray([axis], np.int64))
        name = conv.node("Slice", [merged, zero, ends, ax])
        shape_nc = (*shape_nc[:axis], (n - 1) * factor + 1, *shape_nc[axis + 1 :])
    return name, shape_nc


@register("conv_general_dilated")
def conv_general_dilated(conv, eqn, x, w):
    """N-d convolution (strides, padding, dilation, feature groups; lhs dilation for ConvTranspose)."""
    p = eqn.params
    dn = p["dimension_numbers"]
    if p["batch_group_count"] != 1:
        raise NotImplementedError("ONNX export does not support batch_group_count != 1 in convolutions")
    lhs_spec = tuple(dn.lhs_spec)
    xs = conv.sym(x)
    name = conv.layout(xs, lhs_spec)
    shape_nc = tuple(xs.shape[i] for i in lhs_spec)
    spatial = list(range(2, len(lhs_spec)))
    name, shape_nc = _dilate(conv, name, spatial, p["lhs_dilation"], shape_nc)
    lo = [a for a, _ in p["padding"]]
    hi = [b for _, b in p["padding"]]
    if min(lo + hi) < 0:  # negative padding crops
        starts = [max(-a, 0) for a in lo]
        ends = [shape_nc[2 + i] - max(-b, 0) for i, b in enumerate(hi)]
        name = conv.node("Slice", [name, conv.const(np.asarray(starts, np.int64)),
                                   conv.const(np.asarray(ends, np.int64)),
                                   conv.const(np.asarray(spatial, np.int64))])  # fmt: skip
        lo, hi = [max(a, 0) for a in lo], [max(b, 0) for b in hi]
    out = conv.node(
        "Conv", [name, _operand(conv, w, tuple(dn.rhs_spec))], strides=list(p["window_strides"]),
        pads=lo + hi, dilations=list(p["rhs_dilation"]), group=p["feature_group_count"],
    )  # fmt: skip
    return Sym(out, tuple(dn.out_spec), _out_shape(eqn))


def _pool(conv, eqn, x, op, **attrs):
    """reduce_window_* over the middle (spatial) axes of a channels-last input as an ONNX pool."""
    p = eqn.params
    win, strides, rank = p["window_dimensions"], p["window_strides"], len(p["window_dimensions"])
    if rank < 3 or win[0] != 1 or win[-1] != 1 or strides[0] != 1 or strides[-1] != 1:
        raise NotImplementedError("ONNX export supports pooling over the spatial axes of [N, ..., C] inputs")
    if any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
        raise NotImplementedError("ONNX export does not support dilated pooling")
    layout = (0, rank - 1, *range(1, rank - 1))
    pads = [p["padding"][i][0] for i in range(1, rank - 1)] + [p["padding"][i][1] for i in range(1, rank - 1)]
    out = conv.node(
        op, [conv.layout(conv.sym(x), layout)], kernel_shape=list(win[1:-1]), strides=list(strides[1:-1]),
        pads=pads, **attrs,
    )  # fmt: skip
    return Sym(out, layout, _out_shape(eqn))


@register("reduce_window_max")
def reduce_window_max(conv, eqn, x):
    return _pool(conv, eqn, x, "MaxPool")


@register("reduce_window_min")
def reduce_window_min(conv, eqn, x):
    neg = conv.sym(x)
    neg = Sym(conv.node("Neg", [neg.name]), neg.perm, neg.shape)
    out = _pool(conv, eqn, neg, "MaxPool")
    return Sym(conv.node("Neg", [out.name]), out.perm, out.shape)


@register("reduce_window_sum")
def reduce_window_sum(conv, eqn, x):
    """Window sums (Flax's avg_pool divides them afterwards) = AveragePool counting pads * window size."""
    out = _pool(conv, eqn, x, "AveragePool", count_include_pad=1)
    size = np.float32(np.prod(eqn.params["window_dimensions"]))
    return Sym(conv.node("Mul", [out.name, conv.const(size)]), out.perm, out.shape)


def _reduce(op):
    def handler(conv, eqn, x):
        shape = _out_shape(eqn)
        axes = conv.const(np.asarray([int(a) for a in eqn.params["axes"]], np.int64), "axes")
        return Sym(conv.node(op, [conv.plain(x), axes], keepdims=0), identity(len(shape)), shape)

    return handler


_REDUCTIONS = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin"}
for _name, _op in {**_REDUCTIONS, "reduce_prod": "ReduceProd"}.items():
    register(_name)(_reduce(_op))


@register("argmax", "argmin")
def argmax(conv, eqn, x):
    (axis,) = eqn.params["axes"]
    op = "ArgMax" if eqn.primitive.name == "argmax" else "ArgMin"
    shape = _out_shape(eqn)
    out = conv.node(op, [conv.plain(x)], axis=int(axis), keepdims=0)
    out = conv.node("Cast", [out], to=onnx_dtype(eqn.params["index_dtype"]))
    return Sym(out, identity(len(shape)), shape)


@register("cumsum")
def cumsum(conv, eqn, x):
    shape = _out_shape(eqn)
    axis = conv.const(np.asarray(int(eqn.params["axis"]), np.int64), "axis")
    out = conv.node("CumSum", [conv.plain(x), axis], reverse=int(bool(eqn.params["reverse"])))
    return Sym(out, identity(len(shape)), shape)
