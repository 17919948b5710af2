"""The jaxpr walk: symbolic values, layouts, constant folding and the table of primitive handlers.

A handler is a small function ``handler(conv, eqn, *args) -> Sym | list[Sym]`` registered for one or
more JAX primitive names with ``@register("name", ...)``; the op modules of this package each hold one
family (elementwise, shape, neural-network layers). Arguments are ``Sym`` (computed in the graph),
``WeightRef`` (a quantised weight, decoded in the graph on first use) or numpy arrays (constants).

Layouts: JAX convolutions here are NHWC, ONNX's NCHW. Each symbolic value carries the permutation its
ONNX tensor has relative to the JAX value, so a conv -> bias -> pool -> conv chain stays in NCHW and
Transposes appear only where the layout really changes. Handlers that do not care call ``conv.plain``.

The batch: the model is traced at a batch size of ``TRACE_BATCH`` (97, a prime that model widths
rarely share); a dimension divisible by it is the (symbolic) batch. Constants folded at trace time that
are constant along such a dimension are cut to size 1 there, so they broadcast at any batch size.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np
from jax._src import source_info_util
from jax.extend import core as jcore
from onnx import TensorProto, helper, numpy_helper

from gmm_quant.formats.onnx_export import units
from gmm_quant.formats.onnx_export.values import Narrow, Sym, WeightRef, identity
from gmm_quant.surgery.unit_flow import called_jaxpr

TRACE_BATCH = 97
HANDLERS: dict = {}
NARROW_AWARE: set = set()  # handlers that accept a units.Narrow (a value with dead units removed)
_PASS = {"copy", "copy_p", "stop_gradient", "optimization_barrier", "reduce_precision", "sharding_constraint"}
_DTYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.bool_): TensorProto.BOOL,
    np.dtype(np.uint8): TensorProto.UINT8,
}


def register(*names, narrow: bool = False):
    """Decorator: ``fn(conv, eqn, *args)`` converts the primitives ``names``; ``narrow`` says it
    accepts ``units.Narrow`` arguments (others get them restored to full width first)."""

    def wrap(fn):
        for name in names:
            HANDLERS[name] = fn
            if narrow:
                NARROW_AWARE.add(name)
        return fn

    return wrap


def host(value):
    """A folded constant as numpy; random-number keys (an eval-mode model's unused Dropout streams)
    stay JAX arrays, which numpy cannot hold, and never reach the graph."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return value
    return np.asarray(value)


# Half precision: the graph computes in float32 and rounds where the model rounds (``Cast`` to the
# half type and back, see ``ops_elementwise.convert_element_type``), so its tensors are float32.
HALF = {np.dtype(jax.numpy.bfloat16): TensorProto.BFLOAT16, np.dtype(np.float16): TensorProto.FLOAT16}


def onnx_dtype(dtype) -> int:
    """The ONNX type of a graph tensor holding a JAX value of ``dtype`` (half precision: FLOAT)."""
    dtype = np.dtype(dtype)
    if dtype in HALF:
        return TensorProto.FLOAT
    if dtype not in _DTYPES:
        raise NotImplementedError(f"ONNX export does not support the dtype {dtype}")
    return _DTYPES[dtype]


_LIBRARIES = ("/flax/", "/jax/", "/optax/", "/equinox/", "/gmm_quant/")


def _where(eqn) -> str:
    """Where in the user's model an equation comes from: Flax's name stack and the innermost source
    line outside flax, jax and gmm_quant (the user's line that called a library layer)."""
    stack = str(eqn.source_info.name_stack)
    frames = source_info_util.user_frames(eqn.source_info.traceback)
    frame = next((f for f in frames if not any(lib in f.file_name for lib in _LIBRARIES)), None)
    if frame is None:  # inside a library's jitted function: the caller (``Converter._calls``) says
        return ""
    line = f"{frame.file_name}:{frame.start_line} ({frame.function_name})"
    return f"{stack} ({line})" if stack else line


class Converter:
    """Walks a jaxpr, emitting ONNX nodes through the registered handlers."""

    def __init__(self, batch: int = TRACE_BATCH, remove_dead_units: bool = True):
        self.batch, self.remove_dead_units = batch, remove_dead_units
        self.nodes, self.initializers, self.count = [], [], 0
        self._memo, self._calls = {}, []  # the call sites of the nested jaxprs being walked
        self.half = set()  # the half-precision dtypes the model computes in

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, hint="const") -> str:
        """A constant as an initializer; one that repeats along some axes (a causal mask broadcast
        over heads, a fill value) is stored once per distinct slice and Expanded back; equal constants
        share one initializer."""
        arr = np.asarray(value)
        if arr.dtype in HALF:
            arr = arr.astype(np.float32)
        small = arr
        for axis in range(arr.ndim if arr.size >= 256 else 0):  # small constants: stored as they are
            if small.shape[axis] > 1 and np.all(small == np.take(small, [0], axis=axis)):
                small = np.take(small, [0], axis=axis)
        if arr.size >= 256 and small.size * 4 <= arr.size:
            shape = self.const(np.asarray(arr.shape, np.int64), "shape")
            return self.node("Expand", [self.const(small, hint), shape], hint=hint)
        key = ("C", arr.dtype.str, arr.shape, hashlib.sha256(arr.tobytes()).digest())
        if key not in self._memo:  # equal constants (a shared layer's bias, used twice) stored once
            self._memo[key] = self.fresh(hint)
            self.initializers.append(numpy_helper.from_array(arr, self._memo[key]))
        return self._memo[key]

    def node(self, op, inputs, hint=None, **attrs) -> str:
        out = self.fresh(hint or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def nodes_out(self, op, inputs, count, **attrs) -> list[str]:
        outs = [self.fresh(op.lower()) for _ in range(count)]
        self.nodes.append(helper.make_node(op, inputs, outs, **attrs))
        return outs

    def layout(self, sym: Sym, perm) -> str:
        """ONNX name of ``sym`` in layout ``perm`` (a Transpose, reused if already emitted)."""
        perm = tuple(perm)
        if sym.perm == perm:
            return sym.name
        key = ("T", sym.name, perm)
        if key not in self._memo:
            rel = tuple(sym.perm.index(p) for p in perm)
            self._memo[key] = self.node("Transpose", [sym.name], perm=list(rel))
        return self._memo[key]

    def plain(self, value) -> str:
        """ONNX name of a value (Sym, WeightRef or constant) in the JAX layout."""
        value = self.full(value)
        if isinstance(value, (Sym, WeightRef)):
            sym = self.sym(value)
            return self.layout(sym, identity(len(sym.shape)))
        return self.const(self.broadcastable(np.asarray(value)))

    def full(self, value):
        """``value`` with a Narrow (dead units removed) restored to its full width."""
        if not isinstance(value, Narrow):
            return value
        return units.materialise(self, value)

    def sym(self, value) -> Sym:
        value = self.full(value)
        if isinstance(value, WeightRef):
            return value.materialise(self, identity(len(value.shape)))
        if isinstance(value, Sym):
            return value
        arr = self.broadcastable(np.asarray(value))
        return Sym(self.const(arr), identity(arr.ndim), arr.shape)

    def broadcastable(self, arr: np.ndarray) -> np.ndarray:
        """A folded constant cut to size 1 along batch-sized axes it is constant along."""
        for axis, size in enumerate(arr.shape):
            if size == self.batch and arr.size and np.all(arr == np.take(arr, [0], axis=axis)):
                arr = np.take(arr, [0], axis=axis)
        return arr

    def is_batch(self, size: int) -> bool:
        return size > 0 and size % self.batch == 0

    def batch_size(self) -> str:
        """A 1-element INT64 tensor holding the runtime batch size (Shape of the input, axis 0)."""
        if "batch" not in self._memo:
            self._memo["batch"] = self.node("Shape", ["input"], hint="batch", start=0, end=1)
        return self._memo["batch"]

    def shape_tensor(self, shape, batch_as=-1) -> str:
        """An INT64 shape for Reshape/Expand: batch-sized dims become ``batch_as`` (or the runtime size)."""
        if batch_as != "runtime":
            dims = [batch_as if self.is_batch(s) else s for s in shape]
            if sum(d == -1 for d in dims) > 1:
                raise NotImplementedError(f"ONNX export: shape {shape} has more than one batch-sized axis")
            return self.const(np.asarray(dims, np.int64), "shape")
        parts, run = [], []
        for s in shape:
            if self.is_batch(s):
                if run:
                    parts.append(self.const(np.asarray(run, np.int64), "shape"))
                    run = []
                scale = s // self.batch
                b = self.batch_size()
                parts.append(b if scale == 1 else self.node("Mul", [b, self.const(np.asarray([scale]))]))
            else:
                run.append(s)
        if run:
            parts.append(self.const(np.asarray(run, np.int64), "shape"))
        return parts[0] if len(parts) == 1 else self.node("Concat", parts, axis=0)

    # -- the walk ---------------------------------------------------------------------------------
    def run(self, jaxpr, env_in: list, consts=()):
        env = dict(zip(jaxpr.constvars, consts, strict=True))

        def read(v):
            return np.asarray(v.val) if isinstance(v, jcore.Literal) else env[v]

        for var, value in zip(jaxpr.invars, env_in, strict=True):
            env[var] = value
        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn, [read(v) for v in eqn.invars])
            for var, out in zip(eqn.outvars, outs, strict=True):
                env[var] = out
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, args):
        name = eqn.primitive.name
        self.half.update(v.aval.dtype for v in eqn.outvars if getattr(v.aval, "dtype", None) in HALF)
        if all(not isinstance(a, (Sym, WeightRef, Narrow)) for a in args):  # fold constants
            out = eqn.primitive.bind(*args, **eqn.params)
            return [host(o) for o in out] if eqn.primitive.multiple_results else [host(out)]
        called = called_jaxpr(eqn)
        if called is not None:
            inner, consts = called[0], [host(c) for c in called[1]]
            self._calls.append(_where(eqn))
            try:
                return self.run(inner, args, consts)
            finally:
                self._calls.pop()
        if name in _PASS:
            return [args[0]]
        if name not in NARROW_AWARE:
            args = [self.full(a) for a in args]
        handler = HANDLERS.get(name)
        if handler is None:
            where = next((w for w in [_where(eqn), *reversed(self._calls)] if w), "an unknown place")
            raise NotImplementedError(f"ONNX export does not support the JAX primitive {name!r} at {where}")
        out = handler(self, eqn, *args)
        return out if isinstance(out, list) else [out]
