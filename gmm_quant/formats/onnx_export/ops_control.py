"""Control flow: ``scan`` (``nnx.scan`` over stacked blocks, ``lax.fori_loop`` with fixed bounds), unrolled.

The loop body is walked once per iteration with that iteration's slices of the scanned inputs, so the
graph holds the layers one after another as a Python loop over the same weights would; its size
grows with the number of iterations (an ONNX ``Loop`` would not, and was not tried). ``remat`` and
``checkpoint`` are plain calls (``surgery.unit_flow.CALLS``): rematerialisation changes nothing at inference.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.extend import core as jcore

from gmm_quant.formats.onnx_export.converter import host, register
from gmm_quant.formats.onnx_export.values import Sym, WeightRef, identity

_UNUSED = np.zeros((), np.float32)


@register("scan")
def scan(conv, eqn, *args):
    p = eqn.params
    n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
    consts, carry, xs = args[:n_consts], list(args[n_consts : n_consts + n_carry]), args[n_consts + n_carry :]
    body = p["jaxpr"]
    body_consts = [host(c) for c in body.consts]
    stacked = [_sliceable(conv, x) for x in xs]
    steps = range(length - 1, -1, -1) if p["reverse"] else range(length)
    ys = {}
    for i in steps:
        outs = conv.run(body.jaxpr, [*consts, *carry, *(_index(conv, x, i) for x in stacked)], body_consts)
        carry, ys[i] = outs[:n_carry], outs[n_carry:]
    stacked_ys = [
        _UNUSED if isinstance(var, jcore.DropVar) else _stack(conv, [ys[i][j] for i in range(length)])
        for j, var in enumerate(eqn.outvars[n_carry:])
    ]  # outputs nobody reads (an nnx.scan's pass-through of the blocks) emit no nodes
    return [*carry, *stacked_ys]


def _sliceable(conv, x):
    """A scanned input as a constant or a Sym (a quantised stack is decoded once, then sliced)."""
    if isinstance(x, WeightRef):
        return conv.sym(x)
    return conv.full(x)


def _index(conv, x, i: int):
    """``x[i]`` along the scanned axis."""
    if not isinstance(x, Sym):
        return x[i]
    name = conv.node("Gather", [conv.plain(x), conv.const(np.asarray(i, np.int64), "index")], axis=0)
    return Sym(name, identity(len(x.shape) - 1), tuple(x.shape[1:]))


def _stack(conv, values):
    """The per-iteration outputs stacked along a new leading axis."""
    values = [conv.full(v) for v in values]
    if not any(isinstance(v, (Sym, WeightRef)) for v in values):
        return host(jax.numpy.stack(values))
    first = values[0]
    shape = (len(values), *(first.shape if isinstance(first, (Sym, WeightRef)) else np.shape(first)))
    axes = conv.const(np.asarray([0], np.int64), "axes")
    parts = [conv.node("Unsqueeze", [conv.plain(v), axes]) for v in values]
    return Sym(conv.node("Concat", parts, axis=0), identity(len(shape)), shape)
