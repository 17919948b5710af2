"""Fake quantisation of activations: one JAX primitive, ``fake_quant``, exported as ONNX QDQ.

``fake_quant(x, scale, zero_point, bits)`` is ``(clip(round(x / scale) + zero_point, 0, 2**bits - 1)
- zero_point) * scale``: what ``DequantizeLinear(QuantizeLinear(x))`` computes with an unsigned
``bits``-bit type (round half to even, as ONNX does). Its gradient is straight-through inside the
representable range and zero outside (the clipped values do not move). Being a primitive of its own,
it stays visible in the traced graph, so the ONNX converter emits exactly a QuantizeLinear /
DequantizeLinear pair for it.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.extend import core
from jax.interpreters import ad, batching, mlir

fake_quant_p = core.Primitive("gq_fake_quant")


def fake_quant(x, scale: float, zero_point: int, bits: int = 8):
    """``x`` quantised to ``bits``-bit unsigned codes with ``scale``/``zero_point`` and back."""
    return fake_quant_p.bind(x, scale=float(scale), zero_point=int(zero_point), bits=int(bits))


def _impl(x, *, scale, zero_point, bits):
    q = jnp.clip(jnp.round(x / scale) + zero_point, 0, 2**bits - 1)
    return ((q - zero_point) * scale).astype(x.dtype)


def _jvp(primals, tangents, *, scale, zero_point, bits):
    (x,), (t,) = primals, tangents
    lo, hi = (0 - zero_point) * scale, (2**bits - 1 - zero_point) * scale
    inside = (x >= lo) & (x <= hi)
    t = ad.instantiate_zeros(t)
    return fake_quant(x, scale, zero_point, bits), jnp.where(inside, t, jnp.zeros_like(t))


def _batch(args, dims, **params):
    return fake_quant_p.bind(args[0], **params), dims[0]


fake_quant_p.def_impl(_impl)
fake_quant_p.def_abstract_eval(lambda x, **_: x)  # same shape and dtype
mlir.register_lowering(fake_quant_p, mlir.lower_fun(_impl, multiple_results=False))
ad.primitive_jvps[fake_quant_p] = _jvp
batching.primitive_batchers[fake_quant_p] = _batch


def range_params(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """(scale, zero_point) of unsigned ``bits``-bit codes covering [lo, hi] (widened to include 0,
    so that 0 is exactly representable, as ONNX Runtime's integer kernels need)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = 2**bits - 1
    scale = (hi - lo) / levels if hi > lo else 1.0
    zero_point = round(-lo / scale)
    return scale, max(0, min(levels, zero_point))


__all__ = ["fake_quant", "fake_quant_p", "range_params"]
