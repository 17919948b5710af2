"""Elementwise primitives: arithmetic, comparisons, activations' building blocks, casts, select."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from gmm_quant.formats.onnx_export.converter import HALF, onnx_dtype, register
from gmm_quant.formats.onnx_export.units import narrowable
from gmm_quant.formats.onnx_export.values import Sym, WeightRef, identity

_BINARY = {
    "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min", "pow": "Pow",
    "gt": "Greater", "lt": "Less", "ge": "GreaterOrEqual", "le": "LessOrEqual", "eq": "Equal",
    "and": "And", "or": "Or", "xor": "Xor", "rem": "Mod", "atan2": None, "ne": None,
}  # fmt: skip
_UNARY = {
    "exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid", "neg": "Neg", "abs": "Abs",
    "sqrt": "Sqrt", "erf": "Erf", "sin": "Sin", "cos": "Cos", "tan": "Tan", "sign": "Sign",
    "floor": "Floor", "ceil": "Ceil", "round": "Round", "not": "Not", "asin": "Asin", "acos": "Acos",
    "atan": "Atan", "sinh": "Sinh", "cosh": "Cosh", "asinh": "Asinh", "acosh": "Acosh", "atanh": "Atanh",
}  # fmt: skip


def _is_sym(x) -> bool:
    return isinstance(x, (Sym, WeightRef))


def elementwise(conv, op, eqn, args, **attrs) -> Sym:
    """``op`` over ``args`` with numpy broadcasting, kept in the layout of the symbolic operand(s)."""
    shape = tuple(eqn.outvars[0].aval.shape)
    syms = [conv.sym(a) for a in args if _is_sym(a)]
    same = all(len(s.shape) == len(shape) and s.perm == syms[0].perm for s in syms)
    perm = syms[0].perm if same and len(syms[0].shape) == len(shape) else identity(len(shape))
    names = []
    for a, var in zip(args, eqn.invars, strict=True):
        if _is_sym(a):
            s = conv.sym(a)
            names.append(conv.layout(s, perm) if len(s.shape) == len(shape) else s.name)
            continue
        c = conv.broadcastable(np.asarray(a, var.aval.dtype))
        if c.ndim:
            c = c.reshape((1,) * (len(shape) - c.ndim) + c.shape)
            c = np.transpose(c, perm)
        names.append(conv.const(c))
    return Sym(conv.node(op, names, **attrs), perm, shape)


def _unary(conv, op, x, **attrs) -> Sym:
    s = conv.sym(x)
    return Sym(conv.node(op, [s.name], **attrs), s.perm, s.shape)


def _binary_handler(op):
    return lambda conv, eqn, *args: elementwise(conv, op, eqn, list(args))


for _name, _op in _BINARY.items():
    if _op is not None:
        register(_name, narrow=True)(narrowable(_binary_handler(_op)))
for _name, _op in _UNARY.items():
    register(_name, narrow=True)(narrowable(lambda conv, eqn, x, _op=_op: _unary(conv, _op, x)))


@register("ne")
def ne(conv, eqn, a, b):
    return _unary(conv, "Not", elementwise(conv, "Equal", eqn, [a, b]))


@register("rsqrt", narrow=True)
@narrowable
def rsqrt(conv, eqn, x):
    return _unary(conv, "Reciprocal", _unary(conv, "Sqrt", x))


@register("erfc", narrow=True)
@narrowable
def erfc(conv, eqn, x):
    e = _unary(conv, "Erf", x)
    return Sym(conv.node("Sub", [conv.const(np.float32(1.0)), e.name]), e.perm, e.shape)


@register("square", narrow=True)
@narrowable
def square(conv, eqn, x):
    s = conv.sym(x)
    return Sym(conv.node("Mul", [s.name, s.name]), s.perm, s.shape)


@register("integer_pow", narrow=True)
@narrowable
def integer_pow(conv, eqn, x):
    s, y = conv.sym(x), eqn.params["y"]
    if y == 2:
        return Sym(conv.node("Mul", [s.name, s.name]), s.perm, s.shape)
    return Sym(conv.node("Pow", [s.name, conv.const(np.float32(y))]), s.perm, s.shape)


@register("log1p", narrow=True)
@narrowable
def log1p(conv, eqn, x):
    s = conv.sym(x)
    return _unary(conv, "Log", Sym(conv.node("Add", [s.name, conv.const(np.float32(1))]), s.perm, s.shape))


@register("expm1", narrow=True)
@narrowable
def expm1(conv, eqn, x):
    e = _unary(conv, "Exp", x)
    return Sym(conv.node("Sub", [e.name, conv.const(np.float32(1))]), e.perm, e.shape)


@register("exp2")
def exp2(conv, eqn, x):
    s = conv.sym(x)
    return Sym(conv.node("Pow", [conv.const(np.float32(2)), s.name]), s.perm, s.shape)


@register("is_finite")
def is_finite(conv, eqn, x):
    s = conv.sym(x)
    bad = conv.node("Or", [conv.node("IsInf", [s.name]), conv.node("IsNaN", [s.name])])
    return Sym(conv.node("Not", [bad]), s.perm, s.shape)


@register("convert_element_type")
def convert_element_type(conv, eqn, x):
    s = conv.sym(x)
    new, old = np.dtype(eqn.params["new_dtype"]), np.dtype(eqn.invars[0].aval.dtype)
    if new in HALF and old != new:  # rounded to the half type, held as float32 (converter.HALF)
        half = conv.node("Cast", [s.name], to=HALF[new])
        return Sym(conv.node("Cast", [half], to=onnx_dtype(new)), s.perm, s.shape)
    if onnx_dtype(new) == onnx_dtype(old):
        return s
    return Sym(conv.node("Cast", [s.name], to=onnx_dtype(new)), s.perm, s.shape)


@register("select_n")
def select_n(conv, eqn, pred, *cases):
    if len(cases) != 2:
        raise NotImplementedError("ONNX export supports select_n with two cases (jnp.where)")
    if np.dtype(eqn.invars[0].aval.dtype) != np.bool_:
        shape = tuple(eqn.invars[0].aval.shape)
        pred = Sym(conv.node("Cast", [conv.plain(pred)], to=TensorProto.BOOL), identity(len(shape)), shape)
    return elementwise(conv, "Where", eqn, [pred, cases[1], cases[0]])


@register("clamp")
def clamp(conv, eqn, lo, x, hi):
    s = conv.sym(x)
    lo_c = np.asarray(lo, np.float32) if not _is_sym(lo) else None
    hi_c = np.asarray(hi, np.float32) if not _is_sym(hi) else None
    if lo_c is None or hi_c is None or lo_c.ndim or hi_c.ndim:
        raise NotImplementedError("ONNX export supports clamp with scalar constant bounds")
    return Sym(conv.node("Clip", [s.name, conv.const(lo_c), conv.const(hi_c)]), s.perm, s.shape)
