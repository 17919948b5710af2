"""Float leaves (biases, LayerNorm, embeddings: the leaves outside the prior) stored as ``bits``-bit codes.

A leaf becomes ``codes`` on an affine grid of its own, ONNX's ``DequantizeLinear`` convention::

    value = float32(codes - zero_point) * scale

``fit`` chooses the grid from the leaf's range (widened to contain 0, so that 0 stays exact);
``encode`` puts values on a given grid; ``project`` rounds onto it with a straight-through gradient
(fine-tuning with the grid fixed, as ``codebook_tuning`` does for grid codebooks). In a model whose
float leaves are a few thousand values next to a few hundred thousand quantised weights, these 32-bit
values can be most of the compressed size; at 8 bits they cost a quarter (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class FloatCode(NamedTuple):
    """One float leaf as codes on an affine grid.

    Invariants (checked by the tests and, for files, by ``header_checks``):
      * ``codes`` is uint8 with the leaf's shape and every code in ``0 .. 2**bits - 1``;
      * ``2 <= bits <= 8``, ``0 <= zero_point <= 2**bits - 1`` and ``scale`` is a finite float32 > 0;
      * ``dequantize()`` is ``float32(codes - zero_point) * scale``, bit for bit what ONNX Runtime's
        ``DequantizeLinear`` computes, and code ``zero_point`` is exactly 0.0.
    """

    codes: np.ndarray
    scale: np.float32
    zero_point: int
    bits: int

    def dequantize(self) -> np.ndarray:
        return (self.codes.astype(np.int32) - self.zero_point).astype(np.float32) * np.float32(self.scale)


def grid_of(values, bits: int) -> tuple[np.float32, int]:
    """(scale, zero_point) of the ``bits``-bit grid spanning [min(values, 0), max(values, 0)]."""
    x = np.asarray(values, np.float32)
    top = 2**bits - 1
    low, high = min(float(x.min(initial=0.0)), 0.0), max(float(x.max(initial=0.0)), 0.0)
    if high - low <= 0 or not np.isfinite(high - low):
        return np.float32(1.0), 0
    scale = np.float32((high - low) / top)
    zero_point = int(np.clip(np.round(-low / scale), 0, top))
    return scale, zero_point


def encode(values, scale, zero_point: int, bits: int) -> FloatCode:
    """``values`` rounded onto the grid (scale, zero_point), clipped to its ``bits``-bit range."""
    x = np.asarray(values, np.float32)
    codes = np.clip(np.round(x / np.float32(scale)) + zero_point, 0, 2**bits - 1).astype(np.uint8)
    return FloatCode(codes, np.float32(scale), int(zero_point), int(bits))


def fit(values, bits: int) -> FloatCode:
    """``values`` on the ``bits``-bit grid spanning their range and 0."""
    return encode(values, *grid_of(values, bits), bits)


def project(values, scale, zero_point: int, bits: int):
    """``values`` as the grid represents them; the gradient passes straight through (jnp, traceable)."""
    codes = jnp.clip(jnp.round(values / scale) + zero_point, 0, 2**bits - 1)
    snapped = (codes - zero_point) * jnp.float32(scale)
    return values + jax.lax.stop_gradient(snapped.astype(values.dtype) - values)


def code_leaves(float_leaves: dict, bits: int) -> dict:
    """{path: FloatCode} of every float leaf ({path: array}) on a grid of its own."""
    return {path: fit(np.asarray(leaf), bits) for path, leaf in float_leaves.items()}


def grids(codes: dict) -> dict:
    """{path: (scale, zero_point, bits)} of ``codes``: what fine-tuning keeps fixed."""
    return {path: (c.scale, c.zero_point, c.bits) for path, c in codes.items()}


def cost_bits(code: FloatCode) -> int:
    """Bits the leaf costs in the Han count: its codes, a float32 scale and a ``bits``-bit zero point."""
    return code.bits * int(code.codes.size) + 32 + code.bits


def code_float_leaves(codebooks: dict, params, bits: int):
    """``(codes, params)``: every leaf of ``params`` outside ``codebooks`` as ``bits``-bit codes, and
    ``params`` with those leaves replaced by the codes' values; pass ``codes`` on as
    ``save_compressed(..., float_codes=codes)`` and ``summarize(..., float_codes=codes)``."""
    from gmm_quant._util.hosts import to_local
    from gmm_quant.core.rules import flatten

    floats = {p: v for p, v in flatten(params).items() if p not in codebooks}
    codes = code_leaves(to_local(floats), bits)  # several processes: a sharded float leaf gathered
    return codes, _with_codes(params, codes)


def recode(codes: dict, params):
    """``(codes, params)`` with the leaves of ``params`` that ``codes`` names put back on the same
    grids (after fine-tuning moved them)."""
    from gmm_quant._util.hosts import to_local
    from gmm_quant.core.rules import flatten

    leaves = to_local({p: v for p, v in flatten(params).items() if p in codes})
    codes = {p: encode(np.asarray(leaves[p]), *g) for p, g in grids(codes).items()}
    return codes, _with_codes(params, codes)


def _with_codes(params, codes: dict):
    from gmm_quant.core.rules import replace_leaves

    return replace_leaves(params, {p: c.dequantize() for p, c in codes.items()})
