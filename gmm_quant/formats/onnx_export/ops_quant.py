"""Activation quantisation: ``gq_fake_quant`` -> QuantizeLinear + DequantizeLinear (uint8, per tensor).

ONNX Runtime recognises DequantizeLinear on both inputs of a MatMul (the activation's here, the
weight's from the ``grid`` encoding) and runs the product on integer kernels; see BENCHMARKS.md for
which kernels it picks.
"""

from __future__ import annotations

import numpy as np

from gmm_quant.formats.onnx_export.converter import register
from gmm_quant.formats.onnx_export.values import Sym, identity


@register("gq_fake_quant")
def fake_quant(conv, eqn, x):
    params, shape = eqn.params, tuple(eqn.outvars[0].aval.shape)
    if params["bits"] != 8:
        raise NotImplementedError(f"ONNX export: activation quantisation to {params['bits']} bits (8 only)")
    scale = conv.const(np.float32(params["scale"]), "act_scale")
    zero_point = conv.const(np.uint8(params["zero_point"]), "act_zero_point")
    q = conv.node("QuantizeLinear", [conv.plain(x), scale, zero_point], hint="act_q")
    dq = conv.node("DequantizeLinear", [q, scale, zero_point], hint="act_dq")
    return Sym(dq, identity(len(shape)), shape)
