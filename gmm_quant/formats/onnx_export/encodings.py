"""How a quantised weight is stored in the ONNX file and decoded inside the graph (folded by ONNX
Runtime at load time, so inference runs plain dense kernels).

* ``codebook`` (any centres): every index as a UINT4 (k <= 16) or UINT8 initializer, then
  ``Cast(to=INT32) -> Gather(centres)``.
* ``grid`` (centres exactly ``scale * (q - zero_point)``, see ``grid.py``): ``DequantizeLinear`` of
  UINT4 (or UINT8) codes. Refused with a clear error when a layer's centres are not on a grid.
* ``sparse``: only the non-zeros, as the Han count stores them: position gaps (UINT4 or UINT8, a gap
  too long for its type bridged by filler entries that point at the zero centre; the first one less
  by one) and UINT4/UINT8 centre indices; ``CumSum(gaps) -> ScatterElements(zeros, positions,
  Gather(centres, indices)) -> Reshape``, one vector of zeros per layer size. Per layer the smallest
  of the sparse forms and the dense ``codebook`` form is used.

A stacked leaf coded per slice (centres [slices, k]) gathers from its centres flattened, each index
offset by ``k`` times its slice: a constant added in the graph (``codebook``), or computed from the
non-zero's position (``sparse``), so the stored indices keep their width. It has no ``grid`` form.

An encoder is ``make(codebook) -> encode(conv, path, perm) -> name``: the ONNX name of the weight in
layout ``perm`` (the indices are permuted offline, so no Transpose is decoded at load).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import TensorProto, numpy_helper

from gmm_quant.core import float_codes, grid


def _codes_initializer(name, codes, bits_max):
    dtype = ml_dtypes.uint4 if bits_max <= 16 else np.uint8
    return numpy_helper.from_array(np.ascontiguousarray(codes).astype(dtype), name)


def codebook_encoder(codebook):
    def encode(conv, path, perm):
        base = f"{path.replace('/', '_')}"
        idx = np.transpose(np.asarray(codebook.indices), perm)
        conv.initializers.append(_codes_initializer(conv.fresh(base + "_indices"), idx, codebook.k))
        idx_name = conv.initializers[-1].name
        centres = conv.const(np.asarray(codebook.centres, np.float32).ravel(), base + "_centres")
        as_int = conv.node("Cast", [idx_name], hint=base + "_idx32", to=TensorProto.INT32)
        if codebook.slices > 1:  # row s of the flattened centres starts at s * k
            shape = [1] * idx.ndim
            shape[list(perm).index(0)] = codebook.slices
            offsets = (np.arange(codebook.slices, dtype=np.int32) * codebook.k).reshape(shape)
            as_int = conv.node("Add", [as_int, conv.const(offsets, base + "_slice_offsets")])
        return conv.node("Gather", [centres, as_int], hint=base)

    return encode


def grid_encoder(codebook):
    g = grid.fit(codebook.centres) if codebook.slices == 1 else None
    if g is None:
        raise ValueError(
            "centres are not on an evenly spaced grid containing zero; use the codebook encoding"
        )
    scale, zero_point, levels = g

    def encode(conv, path, perm):
        base = f"{path.replace('/', '_')}"
        codes = (levels[np.transpose(np.asarray(codebook.indices), perm)] + zero_point).astype(np.uint8)
        limit = 16 if codes.max() < 16 and zero_point < 16 else 256
        conv.initializers.append(_codes_initializer(conv.fresh(base + "_q"), codes, limit))
        q_name = conv.initializers[-1].name
        scale_name = conv.const(np.float32(scale), base + "_scale")
        conv.initializers.append(_codes_initializer(conv.fresh(base + "_zp"), np.asarray(zero_point), limit))
        return conv.node("DequantizeLinear", [q_name, scale_name, conv.initializers[-1].name], hint=base)

    return encode


def _gaps_with_fillers(flat_idx: np.ndarray, limit: int):
    """(gaps, indices) of the non-zeros of ``flat_idx``; gaps above ``limit`` are split by fillers
    (entries with index 0, the zero centre, which write a zero where one already is)."""
    positions = np.flatnonzero(flat_idx)
    gaps = np.diff(positions, prepend=-1)
    fillers = (gaps - 1) // limit  # extra entries before each non-zero
    total = positions.size + int(fillers.sum())
    out_gaps, out_idx = np.full(total, limit, np.int64), np.zeros(total, np.int64)
    ends = np.cumsum(fillers + 1) - 1  # where each real non-zero lands
    out_gaps[ends] = gaps - fillers * limit
    out_idx[ends] = flat_idx[positions]
    return out_gaps, out_idx


def _nbytes(count: int, limit: int) -> float:
    return count * (0.5 if limit <= 15 else 1.0)


def _zeros(conv, size: int) -> str:
    """A float32 vector of ``size`` zeros, one per size in the graph (layers of one size share it)."""
    key = ("zeros", size)
    if key not in conv._memo:
        size_name = conv.const(np.asarray([size], np.int64))
        conv._memo[key] = conv.node("Expand", [conv.const(np.zeros(1, np.float32)), size_name])
    return conv._memo[key]


def sparse_encoder(codebook):
    dense = codebook_encoder(codebook)
    k = codebook.k

    def encode(conv, path, perm):
        base = f"{path.replace('/', '_')}"
        if codebook.slices > 1 and tuple(perm)[:1] != (0,):  # slices no longer contiguous: dense form
            return dense(conv, path, perm)
        flat = np.transpose(np.asarray(codebook.indices), perm).ravel()
        options = {limit: _gaps_with_fillers(flat, limit) for limit in (15, 255)}
        sizes = {limit: _nbytes(g.size, limit) + _nbytes(g.size, k) for limit, (g, _i) in options.items()}
        limit = min(sizes, key=sizes.get)
        if sizes[limit] >= _nbytes(flat.size, k) or not options[limit][0].size:
            return dense(conv, path, perm)
        gaps, idx = options[limit]
        gaps[0] -= 1  # positions = CumSum(gaps) - 1: the -1 folded into the first gap (always >= 1)
        conv.initializers.append(_codes_initializer(conv.fresh(base + "_gaps"), gaps, limit + 1))
        gaps64 = conv.node("Cast", [conv.initializers[-1].name], to=TensorProto.INT64)
        positions = conv.node("CumSum", [gaps64, conv.const(np.asarray(0, np.int64))])
        conv.initializers.append(_codes_initializer(conv.fresh(base + "_indices"), idx, k))
        as_int = conv.node("Cast", [conv.initializers[-1].name], to=TensorProto.INT64)
        if codebook.slices > 1:  # + k * (position // slice size): the row of the non-zero's slice
            per_slice = conv.const(np.asarray(flat.size // codebook.slices, np.int64))
            row = conv.node("Div", [positions, per_slice])
            as_int = conv.node("Add", [as_int, conv.node("Mul", [row, conv.const(np.asarray(k, np.int64))])])
        centres = conv.const(np.asarray(codebook.centres, np.float32).ravel(), base + "_centres")
        values = conv.node("Gather", [centres, as_int])
        empty = _zeros(conv, flat.size)
        flat_w = conv.node("ScatterElements", [empty, positions, values], axis=0)
        shape = np.asarray(np.transpose(np.asarray(codebook.indices), perm).shape, np.int64)
        return conv.node("Reshape", [flat_w, conv.const(shape, "shape")], hint=base)

    return encode


ENCODERS = {"codebook": codebook_encoder, "grid": grid_encoder, "sparse": sparse_encoder}


def code_float_initializers(model, grids, min_values: int = 16) -> int:
    """Store every float32 initializer whose values all lie on one of ``grids`` ({(scale, zero_point,
    bits)}: the float leaves' codes, ``float_codes``) as those codes and a ``DequantizeLinear``
    producing the same name: the same values bit for bit, 4-16x fewer bytes. The converter may have
    transposed, reshaped or sliced a leaf; exact values survive that, so matching by value is exact.
    Returns how many initializers were coded."""
    from onnx import helper

    coded, kept = 0, []
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init) if init.data_type == TensorProto.FLOAT else None
        match = None if arr is None or arr.size < min_values else _on_grid(arr, grids)
        if match is None:
            kept.append(init)
            continue
        codes, scale, zero_point = match
        dtype = ml_dtypes.uint4 if codes.max() < 16 and zero_point < 16 else np.uint8
        q, s, z = (f"{init.name}_{suffix}" for suffix in ("q", "scale", "zp"))
        kept += [numpy_helper.from_array(codes.astype(dtype), q), numpy_helper.from_array(scale, s),
                 numpy_helper.from_array(np.asarray(zero_point).astype(dtype), z)]  # fmt: skip
        model.graph.node.insert(0, helper.make_node("DequantizeLinear", [q, s, z], [init.name]))
        coded += 1
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return coded


def _on_grid(arr: np.ndarray, grids):
    """(codes, scale, zero_point) of the first grid reproducing ``arr`` exactly, or None."""
    if not np.all(np.isfinite(arr)):  # a mask of -inf is no leaf
        return None
    for grid_params in grids:
        code = float_codes.encode(arr, *grid_params)  # clipped: values off the grid do not reproduce
        if np.array_equal(code.dequantize(), arr):
            return code.codes, code.scale, code.zero_point
    return None
