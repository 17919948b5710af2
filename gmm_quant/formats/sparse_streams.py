"""A quantised layer as two byte streams, as the Han count stores it: where the non-zeros are (gaps
between successive non-zero positions) and which centre each one takes — then entropy-coded.

``split(indices)`` -> ``(gaps, values, nnz)``: over the C-order flattening of ``indices``, ``gaps`` are
the distances between successive non-zero positions (the first counted from position -1), each minus
one and written as LEB128 (7 bits per byte, high bit = more bytes follow: one byte below 128);
``values`` are the non-zero indices minus one, one byte each (a codebook has at most 256 centres).
``join(gaps, values, nnz, shape)`` inverts it exactly, raising ``ValueError`` on any inconsistency.

``pack`` / ``unpack`` entropy-code a stream with LZMA2 in raw mode (no container header). Measured on
the best LeNet-300-100 (BENCHMARKS.md, "Files"): the streams' order-0 entropy, the bound for a static
Huffman code, is 9,605 bytes; LZMA2 10,493, zlib 11,287, bz2 11,509. A Huffman coder of our own would
save at most 0.9 KB (8%) for about a hundred lines and a per-symbol Python decoding loop; with LZMA2
the whole file is already below the Han count, so the standard library's coder it is.
"""

from __future__ import annotations

import lzma

import numpy as np

_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _leb128(values: np.ndarray) -> bytes:
    values = np.asarray(values, np.uint64)
    nbytes = np.ones(values.shape, np.int64)
    for shift in range(7, 64, 7):
        nbytes += values >= (np.uint64(1) << np.uint64(shift))
    out = np.empty(int(nbytes.sum()), np.uint8)
    starts = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
    for j in range(int(nbytes.max(initial=0))):
        live = nbytes > j
        chunk = (values[live] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[live] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[live] + j] = (chunk | more).astype(np.uint8)
    return out.tobytes()


def _unleb128(data: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size != count or (raw.size and ends[-1] != raw.size - 1):
        raise ValueError(f"gap stream holds {ends.size} values, expected {count}")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.size and lengths.max() > 9:
        raise ValueError("gap stream holds a value of more than 63 bits")
    out = np.zeros(count, np.uint64)
    for j in range(int(lengths.max(initial=0))):
        live = lengths > j
        out[live] |= (raw[starts[live] + j].astype(np.uint64) & np.uint64(0x7F)) << np.uint64(7 * j)
    return out


def split(indices) -> tuple[bytes, bytes, int]:
    flat = np.asarray(indices).ravel()
    positions = np.flatnonzero(flat)
    gaps = np.diff(positions, prepend=-1) - 1
    values = flat[positions].astype(np.int64) - 1
    if values.size and values.max() > 255:
        raise ValueError("a codebook of more than 256 centres cannot be stored in the sparse format")
    return _leb128(gaps), values.astype(np.uint8).tobytes(), int(positions.size)


def join(gaps: bytes, values: bytes, nnz: int, shape, dtype) -> np.ndarray:
    size = int(np.prod(shape))
    positions = np.cumsum(_unleb128(gaps, nnz).astype(np.int64) + 1) - 1
    vals = np.frombuffer(values, np.uint8)
    if vals.size != nnz:
        raise ValueError(f"value stream holds {vals.size} values, expected {nnz}")
    if positions.size and (positions[-1] >= size or positions[0] < 0):
        raise ValueError("a non-zero position lies outside the layer")
    flat = np.zeros(size, dtype)
    flat[positions] = vals.astype(dtype) + 1
    return flat.reshape(shape)


def pack(stream: bytes) -> bytes:
    return lzma.compress(stream, format=lzma.FORMAT_RAW, filters=_FILTERS) if stream else b""


def unpack(data: bytes, max_length: int) -> bytes:
    """Decode at most ``max_length`` bytes (a damaged stream cannot inflate without bound)."""
    if not data:
        return b""
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_FILTERS)
    try:
        out = decoder.decompress(data, max_length=max_length + 1)
    except lzma.LZMAError as err:
        raise ValueError(f"entropy-coded stream does not decode ({err})") from None
    if len(out) > max_length:
        raise ValueError("entropy-coded stream decodes to more than its layer can hold")
    return out
