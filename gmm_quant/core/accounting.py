"""Compression ratio as Han et al. (Deep Compression, 2016) count it, plus plainer measures.

Per quantised layer, weights flattened in Caffe's layout as in the paper (dense ``[out, in]``, conv
``[out, in, h, w]``: Flax's ``[in, out]`` and ``[h, w, in, out]`` kernels are transposed first):

* sparse storage: each non-zero weight stores its codebook index and the difference to the previous
  non-zero's position, in ``diff_bits`` bits (5 for dense layers, 8 for conv layers). A gap larger
  than ``2**diff_bits`` is bridged by filler entries (a zero weight at the largest difference);
* the codebook indices and the position differences are each Huffman-coded (a real Huffman code built
  from this layer's counts; the code tables themselves are not counted, as in the paper);
* the codebook costs 32 bits per non-zero centre.

Float leaves (biases, ``keep_float`` layers) cost 32 bits per value, or stored as codes (``float_bits``,
``float_codes``) their code width per value plus 32 bits of scale and a zero point; reported separately.
``CR = 32 * all parameters / (quantised bits + float bits)``. The *packed* measure stores every index
densely at ceil(log2 k) bits plus the codebook, which is what the compressed file holds.
"""

from __future__ import annotations

import gzip

import numpy as np

from gmm_quant.core import sharded
from gmm_quant.core.float_codes import cost_bits
from gmm_quant.core.han import (
    LayerCost,
    caffe_order,
    cost_from_counts,
    count_symbols,
    diff_field_bits,
    sparse_entries,
)
from gmm_quant.core.rules import flatten, is_random_key


def layer_cost(name: str, codebook) -> LayerCost:
    """Han et al.'s storage cost of one quantised layer (conv layers: 4-d kernels, 8-bit diffs).

    A layer whose indices are sharded over a mesh is counted where its shards live
    (``sharded.layer_cost``)."""
    if sharded.sharded_axis(codebook.indices) is not None:
        return sharded.layer_cost(name, codebook.k, codebook.indices)
    indices = caffe_order(np.asarray(codebook.indices))
    codes, diffs = sparse_entries(indices, diff_field_bits(indices.ndim))
    nonzero = int(np.count_nonzero(indices))
    return cost_from_counts(name, indices.size, codebook.k, nonzero, len(codes) - nonzero,
                            count_symbols(codes), count_symbols(diffs), codebook.slices)  # fmt: skip


def gzip_ratio(params_flat: dict) -> float:
    """float32 bytes of all leaves / gzip -9 of them (what TF Model Optimization users measure)."""
    raw = b"".join(np.asarray(v, "<f4").tobytes() for v in params_flat.values())
    return len(raw) / len(gzip.compress(raw, 9))


def summarize(codebooks: dict, params, removed: int = 0, float_codes: dict | None = None, state=None) -> dict:
    """Per-layer costs and totals: ``compression_ratio`` (Han), ``packed_ratio``, float bits.

    ``params``: the model's parameter pytree (or any {path: array}); leaves not in ``codebooks`` count
    as float32, or as their codes when in ``float_codes`` ({path: FloatCode}: ``bits`` per value plus
    a float32 scale and a zero point). ``removed``: parameters removed structurally before compression
    (pruned attention heads, the kernels and biases of layers that reuse another's): they count in the
    original size and cost nothing. ``state``: the model's other variables as stored with it
    (BatchNorm statistics, ``save_compressed(state=...)``); each value counts as a float32, like a
    float leaf, in both the original and the compressed size.
    """
    float_codes = float_codes or {}
    float_leaves = {p: v for p, v in flatten(params).items() if p not in codebooks}
    if state is not None:
        float_leaves.update({f"state:{p}": v for p, v in flatten(state).items() if not is_random_key(v)})
    layers = [layer_cost(name, cb) for name, cb in codebooks.items()]
    float_values = sum(int(np.size(v)) for v in float_leaves.values())
    float_bits = sum(cost_bits(float_codes[p]) if p in float_codes else 32 * int(np.size(v))
                     for p, v in float_leaves.items())  # fmt: skip
    quantised = sum(c.num_weights for c in layers)
    original = 32 * (quantised + float_values + removed)
    han = sum(c.han_bits for c in layers) + float_bits
    packed = sum(c.packed_bits for c in layers) + float_bits
    nonzero = sum(c.nonzero for c in layers)
    return {
        "layers": layers,
        "num_weights": quantised,
        "nonzero": nonzero,
        "nonzero_fraction": nonzero / max(quantised, 1),
        "float_values": float_values,
        "float_bits": float_bits,
        "float_code_bits": sorted({c.bits for c in float_codes.values()}),
        "original_bits": original,
        "han_bits": han,
        "packed_bits": packed,
        "compression_ratio": original / han,
        "packed_ratio": original / packed,
    }
