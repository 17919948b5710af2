"""Shape primitives: reshape, transpose, broadcast, concatenate, split, slice, squeeze, pad, gather."""

from __future__ import annotations

import numpy as np

from gmm_quant.formats.onnx_export.converter import register
from gmm_quant.formats.onnx_export.values import Sym, compose, identity

_END = np.iinfo(np.int64).max


def _out_shape(eqn, i=0) -> tuple:
    return tuple(eqn.outvars[i].aval.shape)


@register("reshape")
def reshape(conv, eqn, a):
    shape = _out_shape(eqn)
    out = conv.node("Reshape", [conv.plain(a), conv.shape_tensor(shape)])
    return Sym(out, identity(len(shape)), shape)


@register("transpose")
def transpose(conv, eqn, a):
    a = conv.sym(a)
    logical = tuple(eqn.params["permutation"])
    return Sym(a.name, compose(a.perm, logical), tuple(a.shape[i] for i in logical))


@register("broadcast_in_dim")
def broadcast_in_dim(conv, eqn, a):
    a = conv.sym(a)
    shape = tuple(eqn.params["shape"])
    target = [1] * len(shape)
    for src, dst in enumerate(eqn.params["broadcast_dimensions"]):
        target[dst] = a.shape[src]
    name = conv.plain(a)
    if tuple(target) != tuple(a.shape):
        name = conv.node("Reshape", [name, conv.shape_tensor(target)])
    if tuple(target) != shape:
        name = conv.node("Expand", [name, conv.shape_tensor(shape, batch_as="runtime")])
    return Sym(name, identity(len(shape)), shape)


@register("squeeze")
def squeeze(conv, eqn, a):
    shape = _out_shape(eqn)
    axes = conv.const(np.asarray(eqn.params["dimensions"], np.int64), "axes")
    return Sym(conv.node("Squeeze", [conv.plain(a), axes]), identity(len(shape)), shape)


@register("expand_dims")
def expand_dims(conv, eqn, a):
    return reshape(conv, eqn, a)


@register("concatenate")
def concatenate(conv, eqn, *args):
    shape = _out_shape(eqn)
    names = [_full_size(conv, a) for a in args]
    return Sym(conv.node("Concat", names, axis=int(eqn.params["dimension"])), identity(len(shape)), shape)


def _full_size(conv, value) -> str:
    """A Concat input at its full size: Concat does not broadcast, so a folded constant cut to size 1
    along the batch (e.g. a ViT's class token broadcast to the batch) is expanded to the runtime batch."""
    if not isinstance(value, np.ndarray | np.generic):
        return conv.plain(conv.sym(value))
    cut = conv.broadcastable(value)
    if cut.shape == value.shape:
        return conv.const(value)
    return conv.node("Expand", [conv.const(cut), conv.shape_tensor(value.shape, "runtime")])


@register("split")
def split(conv, eqn, a):
    axis, sizes = int(eqn.params["axis"]), list(eqn.params["sizes"])
    outs = conv.nodes_out(
        "Split", [conv.plain(a), conv.const(np.asarray(sizes, np.int64), "sizes")], len(sizes), axis=axis
    )
    return [Sym(o, identity(len(_out_shape(eqn, i))), _out_shape(eqn, i)) for i, o in enumerate(outs)]


def _slice(conv, a, starts, limits, strides, shape):
    a = conv.sym(a)
    axes = [i for i, (s, e, n) in enumerate(zip(starts, limits, a.shape, strict=True)) if s != 0 or e != n]
    axes = [i for i in range(len(starts)) if i in axes or (strides and strides[i] != 1)]
    if not axes:
        return a
    ends = [_END if conv.is_batch(a.shape[i]) and limits[i] == a.shape[i] else limits[i] for i in axes]
    inputs = [
        conv.plain(a),
        conv.const(np.asarray([starts[i] for i in axes], np.int64), "starts"),
        conv.const(np.asarray(ends, np.int64), "ends"),
        conv.const(np.asarray(axes, np.int64), "axes"),
        conv.const(np.asarray([strides[i] if strides else 1 for i in axes], np.int64), "steps"),
    ]
    return Sym(conv.node("Slice", inputs), identity(len(shape)), shape)


@register("slice")
def slice_(conv, eqn, a):
    p = eqn.params
    return _slice(conv, a, p["start_indices"], p["limit_indices"], p["strides"], _out_shape(eqn))


@register("dynamic_slice")
def dynamic_slice(conv, eqn, a, *starts):
    if any(isinstance(s, Sym) for s in starts):
        raise NotImplementedError("ONNX export supports dynamic_slice only with constant start indices")
    sizes = eqn.params["slice_sizes"]
    shape = conv.sym(a).shape
    begin = [int(np.clip(int(s), 0, n - k)) for s, n, k in zip(starts, shape, sizes, strict=True)]
    return _slice(conv, a, begin, [b + k for b, k in zip(begin, sizes, strict=True)], None, _out_shape(eqn))


@register("pad")
def pad(conv, eqn, a, value):
    config = eqn.params["padding_config"]
    if any(interior for _, _, interior in config) or any(lo < 0 or hi < 0 for lo, hi, _ in config):
        raise NotImplementedError("ONNX export supports pad with non-negative edges and no interior padding")
    pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
    fill = conv.const(np.asarray(value, eqn.invars[0].aval.dtype))
    shape = _out_shape(eqn)
    out = conv.node("Pad", [conv.plain(a), conv.const(np.asarray(pads, np.int64), "pads"), fill])
    return Sym(out, identity(len(shape)), shape)


@register("gather")
def gather(conv, eqn, operand, indices):
    """``jnp.take(table, idx, axis=0)`` (what nnx.Embed does) as ONNX Gather."""
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    operand_shape = tuple(eqn.invars[0].aval.shape)
    rank = len(operand_shape)
    plain_take = (
        tuple(dn.collapsed_slice_dims) == (0,) and tuple(dn.start_index_map) == (0,)
        and tuple(sizes) == (1, *operand_shape[1:]) and not dn.operand_batching_dims
        and tuple(dn.offset_dims) == tuple(range(len(eqn.invars[1].aval.shape) - 1, eqn.outvars[0].aval.ndim))
    )  # fmt: skip
    if not plain_take or rank < 1:
        raise NotImplementedError(
            "ONNX export supports gather only as a take along axis 0 (embedding lookup)"
        )
    idx = conv.sym(indices)
    squeezed = conv.node("Squeeze", [conv.plain(idx), conv.const(np.asarray([-1], np.int64), "axes")])
    shape = _out_shape(eqn)
    return Sym(conv.node("Gather", [conv.plain(operand), squeezed], axis=0), identity(len(shape)), shape)
