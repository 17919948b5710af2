"""Convolutions as matrix products (im2col) and max-pooling as a reshape, for training on CPU, where
XLA's own convolutions and the pooling's backward pass (select-and-scatter) are slow.

``as_matmuls(fn)`` is ``fn`` with every ``conv_general_dilated`` it runs (inside jit, remat and the
like too) computed as one ``dot_general`` over the input's patches: the patches are the input's
``kh * kw`` shifted (strided) slices side by side, so the backward pass is slices and pads and one
more product, which XLA's CPU backend runs about 1.7x faster than its convolution and its transposes
(LeNet-5-Caffe, BENCHMARKS.md "Training speed"). The model's code is unchanged: the function is
traced once to a jaxpr and evaluated again with the convolutions replaced; every other primitive is
bound as it was (custom derivatives included). Grouped, dilated and very large convolutions (patches
above ``MAX_PATCHES`` elements) are left to XLA. A max-pool whose windows tile the input (window ==
stride, no padding: ``nnx.max_pool(x, (2, 2), strides=(2, 2))``) becomes a reshape and a max, whose
gradient is an elementwise mask instead of select-and-scatter.

Only for the CPU backend (``enabled()``): on GPU and TPU the vendor convolutions are the fast path.
"""

from __future__ import annotations

import functools
import itertools

import jax
import numpy as np
from jax.extend import core as jcore

MAX_PATCHES = 1 << 26  # elements of one layer's patch matrix (256 MB in float32)
_CALLS = {"pjit", "jit", "closed_call", "remat", "remat2", "checkpoint"}


def enabled() -> bool:
    """Whether convolutions are rewritten: on the CPU backend only."""
    return jax.default_backend() == "cpu"


def as_matmuls(fn):
    """``fn`` with its convolutions as im2col matrix products (see the module docstring)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        call = lambda a, k: fn(*a, **k)  # noqa: E731
        closed, shape = jax.make_jaxpr(call, return_shape=True)(args, kwargs)
        if not has_rewrites(closed.jaxpr):
            return fn(*args, **kwargs)
        out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves((args, kwargs)))
        return jax.tree.unflatten(jax.tree.structure(shape), out)

    return wrapped


def has_rewrites(jaxpr) -> bool:
    """Whether ``jaxpr`` (or a call inside it) holds a convolution or max-pool ``REWRITES`` knows."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in REWRITES:
            return True
        if eqn.primitive.name in _CALLS and has_rewrites(_inner(eqn)[0]):
            return True
    return False


def _inner(eqn):
    """(jaxpr, consts) of a call-like equation."""
    inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    return getattr(inner, "jaxpr", inner), getattr(inner, "consts", ())


def _eval(jaxpr, consts, args):
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in REWRITES and REWRITES[name][0](eqn):
            outs = [REWRITES[name][1](*invals, **eqn.params)]
        elif name in _CALLS and has_rewrites(_inner(eqn)[0]):
            outs = _eval(*_inner(eqn), invals)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)  # as jax's own eval_jaxpr
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def _rewritable(eqn) -> bool:
    p = eqn.params
    plain = (p["feature_group_count"] == 1 and p["batch_group_count"] == 1
             and all(d == 1 for d in p["lhs_dilation"]) and all(d == 1 for d in p["rhs_dilation"])
             and all(lo >= 0 and hi >= 0 for lo, hi in p["padding"]))  # fmt: skip
    if not plain:
        return False
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    dn = p["dimension_numbers"]
    window = int(np.prod([rhs.shape[d] for d in dn.rhs_spec[2:]])) * rhs.shape[dn.rhs_spec[1]]
    positions = int(np.prod(out.shape)) // out.shape[dn.out_spec[1]]
    return positions * window <= MAX_PATCHES


def conv_as_matmul(lhs, rhs, *, window_strides, padding, dimension_numbers, precision=None,
                   preferred_element_type=None, **_):  # fmt: skip
    """``lax.conv_general_dilated`` (no dilation, no groups) as patches @ kernel."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    x = jax.numpy.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # [N, *spatial, C]
    w = jax.numpy.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # [*window, C, O]
    x = jax.numpy.pad(x, ((0, 0), *padding, (0, 0)))
    window, strides = w.shape[:-2], tuple(window_strides)
    sizes = [(x.shape[1 + d] - window[d]) // strides[d] + 1 for d in range(len(window))]
    slices = []
    for offset in itertools.product(*(range(k) for k in window)):
        start = (0, *offset, 0)
        limit = (x.shape[0], *(o + (n - 1) * s + 1 for o, n, s in zip(offset, sizes, strides, strict=True)),
                 x.shape[-1])  # fmt: skip
        slices.append(jax.lax.slice(x, start, limit, (1, *strides, 1)))
    patches = jax.numpy.concatenate(slices, axis=-1)  # [N, *out spatial, prod(window) * C]
    kernel = w.reshape(-1, w.shape[-1])
    out = jax.lax.dot_general(patches, kernel, (((patches.ndim - 1,), (0,)), ((), ())),
                              precision=precision, preferred_element_type=preferred_element_type)  # fmt: skip
    ours = (0, patches.ndim - 1, *range(1, patches.ndim - 1))  # [N, O, *spatial] in out_spec's roles
    perm = [0] * out.ndim
    for role, axis in enumerate(out_spec):
        perm[axis] = ours[role]
    return jax.numpy.transpose(out, perm)


def _tiling(eqn) -> bool:
    p = eqn.params
    return (tuple(p["window_dimensions"]) == tuple(p["window_strides"])
            and all(lo == 0 and hi == 0 for lo, hi in p["padding"])
            and all(d == 1 for d in (*p["base_dilation"], *p["window_dilation"])))  # fmt: skip


def max_pool_as_reshape(x, *, window_dimensions, **_):
    """``reduce_window_max`` with windows tiling the input (window == stride, VALID) as reshape + max."""
    kept = tuple(slice(0, n - n % w) for n, w in zip(x.shape, window_dimensions, strict=True))
    x = x[kept]
    split = [d for n, w in zip(x.shape, window_dimensions, strict=True) for d in (n // w, w)]
    return x.reshape(split).max(axis=tuple(range(1, 2 * x.ndim, 2)))


# primitive -> (whether this equation can be rewritten, its rewrite)
REWRITES = {
    "conv_general_dilated": (_rewritable, conv_as_matmul),
    "reduce_window_max": (_tiling, max_pool_as_reshape),
}
