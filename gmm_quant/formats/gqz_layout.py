"""The bytes of a ``.gqz`` file: prefix, header, stream placement, bit packing and the decoding of
one leaf's streams (``storage`` holds the model side: what a leaf is, saving and loading).

Layout (little-endian)::

    b"GMMQ"  u16 version  u32 header_length  32-byte sha256(header)  header (UTF-8 JSON)  payload

``read_header`` checks the magic, the version and both checksums and, for version 4, turns the
stream sizes the header lists (or implies) into offsets; ``check_header`` then checks every entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct

import numpy as np

from gmm_quant.formats import range_streams, sparse_streams
from gmm_quant.formats.header_checks import STATE_ITEM_BYTES, CorruptFile, check_header, require

MAGIC = b"GMMQ"
RANGED_VERSION = 4
VERSIONS = (1, 2, 3, 4)
# v4 stores only the size of each range-coded stream: streams follow one another in the order listed
# here, leaf by leaf, then the state's; offsets and the other sizes follow from the header
STREAMS = {"ranged": ("centres", "data"), "coded": ("data",), "float": ("data",)}
IMPLIED = {"ranged": "centres", "coded": "data", "float": "data"}  # sizes the header implies
MAX_HEADER = 1 << 24
PREFIX = struct.Struct("<4sHI32s")


def short_float32(value) -> float:
    """The double with the shortest decimal form that still reads back as ``value``'s float32 exactly
    (``0.00024079463`` rather than ``0.00024079463037196547``: a header of many scales is smaller)."""
    exact = np.float32(value)
    short = float(repr(exact).removeprefix("np.float32(").removesuffix(")"))
    return short if np.float32(short) == exact else float(exact)


def pack_bits(indices: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers < 2**bits into a little-endian bit stream."""
    flat = np.asarray(indices, np.uint32).ravel()
    planes = ((flat[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little", count=count * bits)
    weights = (1 << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    return planes.reshape(count, bits).astype(np.uint32) @ weights


def state_bytes(value: np.ndarray) -> bytes:
    if value.dtype.name == "bfloat16":  # ml_dtypes: stored as its 16-bit pattern
        value = value.view(np.uint16)
    return np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()


def state_value(entry: dict, payload: bytes, path) -> np.ndarray:
    name, shape, dtype = entry["path"], tuple(entry["shape"]), entry["dtype"]
    raw = slice_of(payload, entry["data"], path, name)
    if dtype == "bfloat16":
        import ml_dtypes

        return np.frombuffer(raw, "<u2").view(ml_dtypes.bfloat16).reshape(shape).copy()
    return np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)


def read_header(raw: bytes, path) -> tuple[dict, bytes]:
    if len(raw) < PREFIX.size:
        raise CorruptFile(f"{path}: truncated ({len(raw)} bytes), not a gmm_quant compressed file")
    magic, version, length, digest = PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise CorruptFile(f"{path}: not a gmm_quant compressed file (magic {magic!r})")
    if version not in VERSIONS:
        raise CorruptFile(f"{path}: format version {version}, this gmm_quant reads versions {VERSIONS}")
    header = raw[PREFIX.size : PREFIX.size + length]
    if len(header) != length or hashlib.sha256(header).digest() != digest:
        raise CorruptFile(f"{path}: header checksum mismatch (file truncated or corrupt)")
    payload = raw[PREFIX.size + length :]
    try:
        text = sparse_streams.unpack(header, MAX_HEADER) if version > 1 else header
        meta = json.loads(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise CorruptFile(f"{path}: header is not valid JSON ({err})") from None
    if version >= RANGED_VERSION and isinstance(meta, dict):
        place_streams(meta)
    check_header(meta, path)
    require(meta.get("version") == version, path, f"header says version {meta.get('version')!r}")
    if hashlib.sha256(payload).hexdigest() != meta["payload_sha256"]:
        raise CorruptFile(f"{path}: payload checksum mismatch (file truncated or corrupt)")
    return meta, payload


def place_streams(meta: dict) -> None:
    """v4: turn every stream's size into ``{"offset", "nbytes"}`` from the order of the streams; an
    entry that is no size is left for ``check_header`` to name."""
    offset = 0

    def place(owner, key, implied=None):
        nonlocal offset
        size = owner.get(key, implied)
        if _is_size(size):
            owner[key] = {"offset": offset, "nbytes": size}
            offset += size

    leaves, state = meta.get("leaves"), meta.get("state")
    for leaf in leaves if isinstance(leaves, list) else ():
        kind = leaf.get("kind") if isinstance(leaf, dict) else None
        for key in STREAMS.get(kind, ()) if isinstance(kind, str) else ():
            place(leaf, key, _implied_size(leaf) if key == IMPLIED[kind] else None)
    for entry in state if isinstance(state, list) else ():
        if isinstance(entry, dict):
            count, item = _count(entry.get("shape")), STATE_ITEM_BYTES.get(str(entry.get("dtype")))
            place(entry, "data", None if count is None or item is None else count * item)


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count(shape):
    ok = isinstance(shape, list) and all(map(_is_size, shape))
    return math.prod(shape) if ok else None


def _implied_size(leaf: dict):
    """The size of a v4 leaf's stream that its header fields imply (None: they are not valid)."""
    count, kind = _count(leaf.get("shape")), leaf["kind"]
    if kind == "ranged":
        k, slices = leaf.get("k"), leaf.get("slices", 1)
        return 4 * (k - 1) * slices if _is_size(k) and k >= 1 and _is_size(slices) else None
    if count is None:
        return None
    bits = leaf.get("bits")
    if kind == "coded":
        return (count * bits + 7) // 8 if _is_size(bits) and bits <= 64 else None
    return 4 * count


def slice_of(payload: bytes, entry: dict, path, name) -> bytes:
    start, size = entry["offset"], entry["nbytes"]
    if start + size > len(payload):
        raise CorruptFile(f"{path}: leaf {name} points outside the payload")
    return payload[start : start + size]


def indices_of(leaf, payload, path, count) -> np.ndarray:
    name, shape = leaf["path"], tuple(leaf["shape"])
    if leaf["kind"] == "codebook":
        return unpack_bits(slice_of(payload, leaf["indices"], path, name), leaf["bits"], count)
    try:
        if leaf["kind"] == "ranged":
            return range_streams.decode(
                slice_of(payload, leaf["data"], path, name), leaf["nnz"], leaf["k"], count
            )
        gaps = sparse_streams.unpack(slice_of(payload, leaf["gaps"], path, name), leaf["gaps_raw"])
        values = sparse_streams.unpack(slice_of(payload, leaf["values"], path, name), leaf["nnz"])
        return sparse_streams.join(gaps, values, leaf["nnz"], shape, np.uint32).ravel()
    except MemoryError:
        raise CorruptFile(f"{path}: {name}: {math.prod(shape)} weights do not fit in memory") from None
    except ValueError as err:
        raise CorruptFile(f"{path}: {name}: {err}") from None
