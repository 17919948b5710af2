"""Where each unit's value goes: a traced forward pass, evaluated on a sample one operation at a time,
that follows the output features of every kernel through per-feature operations to the next kernel
that reads them (``dead_units`` disconnects the dead ones there).

A value is *tagged* ``Tag(producer, units, out_axis)`` when its last axis carries the units of kernel
``producer`` (feature ``f`` is unit ``units[f]``) and each feature depends on the input only through
its own unit: so a unit whose weights are all zero is a constant over every other axis. A product
``x @ W`` or a convolution whose kernel is a parameter tags its output; operations that treat each
feature alike keep the tag (registered in ``RULES``: elementwise operations whose other operands do
not depend on the input and are constant along the leading axes, pooling without padding across
features, reductions over leading axes, a reshape that flattens the feature axis last); anything else
drops it. A kernel reading a tagged value is a ``Reader``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.extend import core as jcore

from gmm_quant.core.rules import flatten

CALLS = ("pjit", "jit", "custom_jvp_call", "custom_vjp_call", "closed_call", "remat", "remat2", "checkpoint")
_NAMES = (
    "add sub mul div max min neg exp exp2 log log1p expm1 tanh logistic erf erfc erf_inv integer_pow "
    "pow sqrt rsqrt cbrt abs sign floor ceil round select_n convert_element_type square clamp sin cos "
    "ne eq gt ge lt le and or not copy copy_p reduce_precision"
)
ELEMENTWISE = frozenset(_NAMES.split())


def called_jaxpr(eqn):
    """``(jaxpr, consts)`` of a call-like equation (jit, custom_jvp/vjp, remat), or None: what a
    walk over a traced program enters (also the ONNX converter's)."""
    if eqn.primitive.name not in CALLS:
        return None
    inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
    return getattr(inner, "jaxpr", inner), list(getattr(inner, "consts", ()))


class Tag(NamedTuple):
    producer: str  # the kernel's parameter path
    units: np.ndarray  # the producer's unit carried by each feature of the last axis
    out_axis: int  # the kernel's axis of units


class Reader(NamedTuple):
    """A kernel (a parameter leaf) reading a tagged value. ``fill``: the input's features at the
    first leading position; ``steady``: which of them are equal at every position of the sample;
    ``in_axis``/``out_axis``: the kernel's axes of input and output features; ``padded``: a
    convolution with padding or input dilation; ``bias``: the vector added to its output, or None."""

    kernel: str
    tag: Tag
    fill: np.ndarray
    steady: np.ndarray
    in_axis: int
    out_axis: int
    padded: bool
    bias: str | None = None


class Found(NamedTuple):
    outputs: list  # the model's outputs on the sample
    readers: list  # [Reader]
    uses: Counter  # {parameter path: operations reading it}


class _Info(NamedTuple):
    value: Any
    data: bool = False  # depends on the model's input
    tag: Tag | None = None
    leaf: str | None = None  # a parameter leaf as read (a cast of it included)
    vector: str | None = None  # a 1-D parameter laid along the last axis (a bias, broadcast)
    reader: int | None = None  # the Reader whose kernel produced this value


class Trace:
    """``apply_fn(params, sample)`` traced once; ``readers(flat)`` evaluates it with the leaves
    ``flat`` ({path: array}, the structure of ``params``)."""

    def __init__(self, apply_fn, params, sample):
        self.paths = list(flatten(params))
        leaves, treedef = jax.tree_util.tree_flatten(params)
        self.closed = jax.make_jaxpr(lambda ls, x: apply_fn(jax.tree_util.tree_unflatten(treedef, ls), x))(
            leaves, sample
        )
        self.sample = sample

    def readers(self, flat: dict) -> Found:
        walk = _Walk()
        jaxpr = self.closed.jaxpr
        infos = [_Info(flat[p], leaf=p, vector=p if np.ndim(flat[p]) == 1 else None) for p in self.paths]
        infos.append(_Info(self.sample, data=True))
        outs = walk.run(jaxpr, infos, self.closed.consts)
        return Found([np.asarray(o.value) for o in outs], walk.readers, walk.uses)


class _Walk:
    def __init__(self):
        self.readers: list[Reader] = []
        self.uses: Counter = Counter()

    def run(self, jaxpr, infos: list, consts=()) -> list:
        env = {v: _Info(c) for v, c in zip(jaxpr.constvars, consts, strict=True)}
        env.update(zip(jaxpr.invars, infos, strict=True))

        def read(v):
            return _Info(v.val) if isinstance(v, jcore.Literal) else env[v]

        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn, [read(v) for v in eqn.invars])
            env.update(zip(eqn.outvars, outs, strict=True))
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, args: list) -> list:
        name = eqn.primitive.name
        called = called_jaxpr(eqn)
        if called is not None:
            return self.run(called[0], args, called[1])
        out = eqn.primitive.bind(*[a.value for a in args], **eqn.params)
        data = any(a.data for a in args)
        if eqn.primitive.multiple_results:
            outs = [_Info(o, data) for o in out]
        else:
            rule = RULES.get(name)
            outs = [rule(self, eqn, args, _Info(out, data)) if rule is not None else _Info(out, data)]
        carried = {n for o in outs for n in (o.leaf, o.vector)}  # a cast or reshape passes it on
        for a in args:  # every other operation reading a parameter is a use of it
            self.uses.update({a.leaf, a.vector} - carried - {None})
        return outs


RULES: dict = {}


def rule(*names):
    """Decorator: ``fn(walk, eqn, args, info) -> info`` tags the output of the primitives ``names``."""

    def wrap(fn):
        for name in names:
            RULES[name] = fn
        return fn

    return wrap


def _leading_constant(value) -> bool:
    v = np.asarray(value)
    if v.ndim == 0:
        return True
    rows = v.reshape(-1, v.shape[-1])
    return bool(np.all(rows == rows[:1]))


@rule(*ELEMENTWISE)
def _elementwise(walk, eqn, args, info):
    if eqn.primitive.name == "convert_element_type" and args[0].leaf is not None:
        info = info._replace(leaf=args[0].leaf, vector=args[0].vector)
    if eqn.primitive.name == "add":  # a bias added to a reader's product
        for a, b in ((args[0], args[1]), (args[1], args[0])):
            if a.reader is not None and b.vector is not None and walk.readers[a.reader].bias is None:
                walk.readers[a.reader] = walk.readers[a.reader]._replace(bias=b.vector)
    moving = [a for a in args if a.data]
    if not moving or any(a.tag is None for a in moving):
        return info
    tag = moving[0].tag
    if any(a.tag is not tag for a in moving):
        return info
    if any(not a.data and not _leading_constant(a.value) for a in args):
        return info
    return info._replace(tag=tag)


@rule("reshape", "broadcast_in_dim")
def _reshape(walk, eqn, args, info):
    old, new = np.shape(args[0].value), np.shape(info.value)
    src = args[0]
    if src.vector is not None and _along_last(eqn, old, new):
        info = info._replace(vector=src.vector)
    if src.tag is None or eqn.primitive.name != "reshape":
        return info
    for k in range(len(old)):
        if tuple(old[:k]) == tuple(new[:-1]) and int(np.prod(old[k:])) == new[-1]:
            return info._replace(tag=src.tag._replace(units=np.tile(src.tag.units, int(np.prod(old[k:-1])))))
    if new and old and new[-1] == old[-1]:  # leading axes merged or split
        return info._replace(tag=src.tag)
    return info


def _along_last(eqn, old: tuple, new: tuple) -> bool:
    """A reshape or broadcast that keeps the last axis last (a bias laid out to be added)."""
    if not new or not old or new[-1] != old[-1]:
        return False
    if eqn.primitive.name == "reshape":
        return int(np.prod(new)) == new[-1]
    return tuple(eqn.params["broadcast_dimensions"])[-1:] == (len(new) - 1,)


@rule("reduce_window_max", "reduce_window_min", "reduce_window_sum")
def _pool(walk, eqn, args, info):
    p = eqn.params
    across = p["window_dimensions"][-1] != 1 or p["window_strides"][-1] != 1 or p["base_dilation"][-1] != 1
    padded = any(tuple(pad) != (0, 0) for pad in p["padding"])
    if args[0].tag is None or across or (padded and eqn.primitive.name == "reduce_window_sum"):
        return info
    return info._replace(tag=args[0].tag)


@rule("reduce_sum", "reduce_max", "reduce_min")
def _reduce(walk, eqn, args, info):
    ndim = np.ndim(args[0].value)
    if args[0].tag is None or ndim - 1 in tuple(eqn.params["axes"]) or np.ndim(info.value) == 0:
        return info
    return info._replace(tag=args[0].tag)


@rule("dot_general")
def _dot(walk, eqn, args, info):
    """``x @ W`` with ``W`` a 2-D parameter: tags its output with W's units; reads a tagged ``x``."""
    (contract, batch), x, w = eqn.params["dimension_numbers"], args[0], args[1]
    plain = w.leaf is not None and np.ndim(w.value) == 2 and not any(batch[0]) and not any(batch[1])
    if not plain or tuple(contract[1]) != (0,) or tuple(contract[0]) != (np.ndim(x.value) - 1,):
        return info
    return _product(walk, info, x, w.leaf, np.shape(w.value)[1], axes=(0, 1), padded=False)


@rule("conv_general_dilated")
def _conv(walk, eqn, args, info):
    """A convolution by a parameter kernel, features last: as ``_dot``, per filter."""
    p, x, w = eqn.params, args[0], args[1]
    lhs, rhs, out = p["dimension_numbers"]
    last = np.ndim(info.value) - 1
    if w.leaf is None or p["feature_group_count"] != 1 or p["batch_group_count"] != 1 or out[1] != last:
        return info
    padded = any(tuple(pad) != (0, 0) for pad in p["padding"]) or any(d != 1 for d in p["lhs_dilation"])
    if lhs[1] != last:  # reads features along another axis: produces, does not read
        x = x._replace(tag=None)
    return _product(walk, info, x, w.leaf, np.shape(w.value)[rhs[0]], axes=(rhs[1], rhs[0]), padded=padded)


def _product(walk, info, x, kernel: str, width: int, axes: tuple, padded: bool):
    if x.tag is not None:
        rows = np.asarray(x.value, np.float32).reshape(-1, np.shape(x.value)[-1])
        steady = np.all(rows == rows[:1], axis=0)
        walk.readers.append(Reader(kernel, x.tag, rows[0].astype(np.float64), steady, *axes, padded))
        info = info._replace(reader=len(walk.readers) - 1)
    return info._replace(tag=Tag(kernel, np.arange(width), axes[1]))
