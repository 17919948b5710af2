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
import heapq
import math
from typing import NamedTuple

import numpy as np

from gmm_quant.float_codes import cost_bits
from gmm_quant.rules import flatten


def huffman_lengths(counts: dict) -> dict:
    """Code length of each symbol of a Huffman code for ``{symbol: count}`` (counts > 0)."""
    counts = {s: c for s, c in counts.items() if c > 0}
    if len(counts) == 1:
        return dict.fromkeys(counts, 1)
    heap = [(c, i, (s,)) for i, (s, c) in enumerate(sorted(counts.items()))]
    heapq.heapify(heap)
    lengths = dict.fromkeys(counts, 0)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def huffman_bits(symbols: np.ndarray) -> int:
    """Total bits of ``symbols`` under a Huffman code built from their own counts."""
    return huffman_cost(_counts(symbols))


def huffman_cost(counts: dict) -> int:
    """Total bits of symbols occurring ``{symbol: count}`` times under their Huffman code."""
    counts = {s: int(c) for s, c in counts.items() if c > 0}
    if not counts:
        return 0
    lengths = huffman_lengths(counts)
    return int(sum(lengths[s] * c for s, c in counts.items()))


def sparse_entries(indices: np.ndarray, diff_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codebook index, position difference) of every stored entry, fillers included.

    Entries come non-zeros first, then fillers (order does not change Huffman-coded sizes).
    """
    flat = np.asarray(indices).ravel()
    positions = np.flatnonzero(flat)
    max_diff = 1 << diff_bits
    gaps = np.diff(positions, prepend=-1)
    fillers = (gaps - 1) // max_diff
    num_fillers = int(fillers.sum())
    codes = np.concatenate([flat[positions].astype(np.int64), np.zeros(num_fillers, np.int64)])
    diffs = np.concatenate([gaps - fillers * max_diff, np.full(num_fillers, max_diff)])
    return codes, diffs


class LayerCost(NamedTuple):
    name: str
    num_weights: int
    nonzero: int
    centres: int  # codebook size k, zero included
    fillers: int
    index_bits: int  # Huffman-coded codebook indices
    diff_bits: int  # Huffman-coded position differences
    codebook_bits: int
    packed_bits: int  # dense ceil(log2 k)-bit indices + codebook

    @property
    def han_bits(self) -> int:
        return self.index_bits + self.diff_bits + self.codebook_bits

    @property
    def bits_per_index(self) -> int:
        return max(1, math.ceil(math.log2(self.centres)))


CAFFE_PERM = {2: (1, 0), 4: (3, 2, 0, 1)}  # Flax [in, out] / [h, w, in, out] -> Caffe's axes


def caffe_order(indices: np.ndarray) -> np.ndarray:
    """Flax kernel indices in Caffe's layout: [in, out] -> [out, in]; [h, w, in, out] -> [out, in, h, w]."""
    perm = CAFFE_PERM.get(indices.ndim)
    return indices if perm is None else indices.transpose(perm)


def diff_field_bits(ndim: int) -> int:
    """Bits of the position-difference field: 8 for conv layers (4-d kernels), 5 otherwise."""
    return 8 if ndim == 4 else 5


def cost_from_counts(name, num_weights, k, nonzero, fillers, code_counts: dict, diff_counts: dict):
    """``LayerCost`` from the counts of stored codebook indices and position differences (fillers
    included): what both the host count and the sharded one (``scale.compression``) produce."""
    codebook_bits = 32 * (k - 1)
    return LayerCost(
        name=name, num_weights=int(num_weights), nonzero=int(nonzero), centres=k, fillers=int(fillers),
        index_bits=huffman_cost(code_counts), diff_bits=huffman_cost(diff_counts),
        codebook_bits=codebook_bits,
        packed_bits=int(num_weights) * max(1, math.ceil(math.log2(k))) + codebook_bits,
    )  # fmt: skip


def layer_cost(name: str, codebook) -> LayerCost:
    """Han et al.'s storage cost of one quantised layer (conv layers: 4-d kernels, 8-bit diffs).

    A layer whose indices are sharded over a mesh is counted where its shards live
    (``scale.compression.layer_cost``)."""
    from gmm_quant.scale import compression

    if compression.sharded_axis(codebook.indices) is not None:
        return compression.layer_cost(name, len(codebook.centres), codebook.indices)
    indices = caffe_order(np.asarray(codebook.indices))
    codes, diffs = sparse_entries(indices, diff_field_bits(indices.ndim))
    nonzero = int(np.count_nonzero(indices))
    return cost_from_counts(name, indices.size, len(codebook.centres), nonzero, len(codes) - nonzero,
                            _counts(codes), _counts(diffs))  # fmt: skip


def _counts(symbols: np.ndarray) -> dict:
    values, counts = np.unique(symbols, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def gzip_ratio(params_flat: dict) -> float:
    """float32 bytes of all leaves / gzip -9 of them (what TF Model Optimization users measure)."""
    raw = b"".join(np.asarray(v, "<f4").tobytes() for v in params_flat.values())
    return len(raw) / len(gzip.compress(raw, 9))


def summarize(codebooks: dict, params, removed: int = 0, float_codes: dict | None = None) -> dict:
    """Per-layer costs and totals: ``compression_ratio`` (Han), ``packed_ratio``, float bits.

    ``params``: the model's parameter pytree (or any {path: array}); leaves not in ``codebooks`` count
    as float32, or as their codes when in ``float_codes`` ({path: FloatCode}: ``bits`` per value plus
    a float32 scale and a zero point). ``removed``: parameters removed structurally before compression
    (pruned attention heads, the kernels and biases of layers that reuse another's): they count in the
    original size and cost nothing.
    """
    float_codes = float_codes or {}
    float_leaves = {p: v for p, v in flatten(params).items() if p not in codebooks}
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
