"""Han et al.'s count of one layer (Deep Compression, 2016): Huffman-coded codebook indices and
position gaps of the non-zeros in Caffe's order, plus the width of a stored index. Pure numpy; the
whole-model summary is ``accounting``, a layer sharded over a mesh is counted by ``sharded``."""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

import numpy as np


def index_dtype(k: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds 0..k-1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if k - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"too many centres: {k}")


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
    return huffman_cost(count_symbols(symbols))


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


def cost_from_counts(name, num_weights, k, nonzero, fillers, code_counts: dict, diff_counts: dict,
                     slices: int = 1):  # fmt: skip
    """``LayerCost`` from the counts of stored codebook indices and position differences (fillers
    included): what both the host count and the sharded one (``scale.compression``) produce. A layer
    coded per slice pays ``slices`` codebooks of ``k`` centres (padding included, as stored)."""
    codebook_bits = 32 * slices * (k - 1)
    return LayerCost(
        name=name, num_weights=int(num_weights), nonzero=int(nonzero), centres=k, fillers=int(fillers),
        index_bits=huffman_cost(code_counts), diff_bits=huffman_cost(diff_counts),
        codebook_bits=codebook_bits,
        packed_bits=int(num_weights) * max(1, math.ceil(math.log2(k))) + codebook_bits,
    )  # fmt: skip


def count_symbols(symbols: np.ndarray) -> dict:
    values, counts = np.unique(symbols, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))
