"""Dead units removed from the exported graph: matrices physically shrunk, outputs unchanged.

A unit is a feature of a matrix product ``x @ W`` (``W`` a 2-D weight). When a column of ``W`` is all
zero, that output feature does not depend on ``x``: the product is emitted with the live columns
only, and the value is carried as a ``Narrow`` — the live features in the graph, the dead ones as
trace-time constants. Elementwise operations with constants along the last axis (a bias add, ReLU,
GELU, ...) apply to both parts. When a ``Narrow`` reaches the next ``x @ W2``, its dead features
contribute ``fill @ W2[dead]``, a constant folded into a bias, and only the live rows of ``W2`` remain;
rows of ``W2`` that are all zero drop out the same way (for a plain input, through a Gather of the
live input features). Any other consumer gets the full-width value back (Concat + Gather).

Invariants (tests/test_units.py): the removed rows and columns are exactly the all-zero ones; the
outputs equal those of the unpruned graph.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from gmm_quant.formats.onnx_export.values import Narrow, Sym, WeightRef, identity

# Zero rows of a first layer (e.g. MNIST's border pixels) could be dropped with a Gather of the live
# input features; measured on the best LeNet-300-100 (378 of 784 inputs dead) it made batch 256 slower
# (1.05x vs 0.98x without it) and the file larger, so only hidden units are removed by default.
GATHER_INPUTS = False


class _Resized:
    """An equation seen with a narrower output (the live features only)."""

    def __init__(self, eqn, shape):
        self.primitive, self.params, self.invars = eqn.primitive, eqn.params, eqn.invars
        aval = type("Aval", (), {"shape": shape, "dtype": eqn.outvars[0].aval.dtype, "ndim": len(shape)})
        self.outvars = [type("Var", (), {"aval": aval})]


def narrowable(handler):
    """``handler`` extended to a Narrow argument (elementwise with constants), else full width."""

    def wrapped(conv, eqn, *args):
        if not any(isinstance(a, Narrow) for a in args):
            return handler(conv, eqn, *args)

        def emit(conv, eqn, live_args, shape):
            return handler(conv, _Resized(eqn, shape), *live_args)

        out = narrow_elementwise(conv, eqn, list(args), emit)
        return out if out is not None else handler(conv, eqn, *[conv.full(a) for a in args])

    return wrapped


def weight_array(w) -> np.ndarray | None:
    """The weight's values (codebook indices stand in: zero exactly where the weight is zero)."""
    if isinstance(w, (Sym, Narrow)):
        return None
    if isinstance(w, WeightRef):
        return None if w.codebook is None else np.asarray(w.codebook.indices)
    return np.asarray(w)


def subset(w, rows=None, cols=None):
    """``w[rows][:, cols]`` as a constant or a quantised WeightRef of the same encoding."""
    rows = slice(None) if rows is None else rows
    cols = slice(None) if cols is None else cols
    if not isinstance(w, WeightRef):
        return np.asarray(w)[rows][:, cols]
    return w.subset(rows, cols)


def dense_weight(w) -> np.ndarray:
    """The float values of a 2-D weight (decoding a codebook offline)."""
    if isinstance(w, WeightRef):
        return np.asarray(w.codebook.dequantize(), np.float32)
    return np.asarray(w, np.float32)


RESTORED = "units_restored"  # names the Gathers that put narrowed features back in order


def materialise(conv, n: Narrow) -> Sym:
    """The full-width value: Concat(live, broadcast fill) then Gather back into feature order."""
    live = conv.layout(n.sym, identity(len(n.sym.shape)))
    lead = conv.node("Shape", [live], start=0, end=len(n.shape) - 1)
    fill_shape = conv.node("Concat", [lead, conv.const(np.asarray([n.dead.size], np.int64))], axis=0)
    fill = conv.node("Expand", [conv.const(n.fill.reshape((1,) * (len(n.shape) - 1) + (-1,))), fill_shape])
    both = conv.node("Concat", [live, fill], axis=-1)
    order = np.argsort(np.concatenate([n.live, n.dead])).astype(np.int64)
    out = conv.node("Gather", [both, small_indices(conv, order)], axis=len(n.shape) - 1, hint=RESTORED)
    return Sym(out, identity(len(n.shape)), n.shape)


def small_indices(conv, indices) -> str:
    """Gather indices stored as UINT16 (UINT8 when they fit) and cast at load: 2-4x smaller files."""
    indices = np.asarray(indices)
    dtype = np.uint8 if indices.max(initial=0) < 256 else np.uint16 if indices.max() < 65536 else np.int64
    return conv.node("Cast", [conv.const(indices.astype(dtype), "units")], to=TensorProto.INT64)


def dead_columns(w) -> np.ndarray | None:
    arr = weight_array(w)
    if arr is None or arr.ndim != 2:
        return None
    return np.flatnonzero(~arr.any(axis=0))


def live_rows(w) -> np.ndarray | None:
    arr = weight_array(w)
    return None if arr is None or arr.ndim != 2 else np.flatnonzero(arr.any(axis=1))


def narrow_matmul(conv, eqn, x, w, matmul):
    """``x @ w`` with dead input features and dead output columns removed. ``matmul(conv, x, w)``
    emits a plain product; returns a Sym or a Narrow."""
    shape = tuple(eqn.outvars[0].aval.shape)
    bias = None
    if isinstance(x, Narrow):  # contract over the live features only; the dead ones are constants
        bias = x.fill @ dense_weight(w)[x.dead] if x.dead.size else None
        bias = bias if bias is not None and bias.any() else None  # rows already disconnected
        keep = np.intersect1d(x.live, live_rows(w))
        pos = np.searchsorted(x.live, keep)
        x_sym = x.sym
        if pos.size != x.live.size:
            x_sym = Sym(conv.node("Gather", [conv.plain(x_sym), small_indices(conv, pos)], axis=-1),
                        identity(len(x.shape)), (*x.shape[:-1], pos.size))  # fmt: skip
        x, w = x_sym, subset(w, rows=keep)
    else:
        rows = live_rows(w)
        n_in = np.shape(weight_array(w))[0]
        if GATHER_INPUTS and rows is not None and rows.size < n_in:
            xs = conv.sym(x)
            x = Sym(conv.node("Gather", [conv.plain(xs), small_indices(conv, rows)], axis=-1),
                    identity(len(xs.shape)), (*xs.shape[:-1], rows.size))  # fmt: skip
            w = subset(w, rows=rows)
    dead = dead_columns(w)
    n_out = shape[-1]
    live = np.setdiff1d(np.arange(n_out), dead if dead is not None else [])
    if dead is not None and 0 < dead.size < n_out:
        w = subset(w, cols=live)
    else:
        dead, live = np.zeros(0, np.int64), np.arange(n_out)
    out = matmul(conv, x, w, (*shape[:-1], live.size))
    fill = np.zeros(dead.size, np.float32)
    if bias is not None:
        out = Sym(
            conv.node("Add", [out.name, conv.const(bias[live].astype(np.float32))]), out.perm, out.shape
        )
        fill = bias[dead].astype(np.float32)
    if dead.size == 0:
        return out
    return Narrow(out, live, dead, fill, shape)


def narrow_elementwise(conv, eqn, args, emit):
    """An elementwise op on one Narrow and constants: applied to the live part in the graph (through
    ``emit(conv, eqn, args, shape)``) and to the fill constants at trace time. None if it does not fit."""
    narrows = [a for a in args if isinstance(a, Narrow)]
    n = narrows[0]
    same = all(np.array_equal(m.live, n.live) and m.shape == n.shape for m in narrows)
    if not same or any(isinstance(a, (Sym, WeightRef)) for a in args):  # e.g. x * sigmoid(x) is fine
        return None
    width = n.shape[-1]
    live_args, dead_args = [], []
    for a in args:
        if isinstance(a, Narrow):
            live_args.append(a.sym)
            dead_args.append(a.fill)
            continue
        c = np.asarray(a)
        if c.ndim and (any(d != 1 for d in c.shape[:-1]) or c.shape[-1] not in (1, width)):
            return None
        flat = c.reshape(-1) if c.ndim else c
        sliced = flat[n.live] if c.ndim and c.shape[-1] == width else flat
        live_args.append(sliced.reshape((1,) * (len(n.shape) - 1) + (-1,)) if c.ndim else c)
        dead_args.append(flat[n.dead] if c.ndim and c.shape[-1] == width else flat)
    fill = np.asarray(eqn.primitive.bind(*dead_args, **eqn.params), np.float32).reshape(-1)
    out = emit(conv, eqn, live_args, (*n.shape[:-1], n.live.size))
    return Narrow(out, n.live, n.dead, np.broadcast_to(fill, n.dead.shape).astype(np.float32), n.shape)
