"""Validation of a ``.gqz`` header (see ``storage``): every key and type the loader relies on, so
that a damaged or hostile file is a ``CorruptFile`` naming the problem, never a KeyError or silently
wrong weights."""

from __future__ import annotations

import math

_MAX_WEIGHTS = 1 << 33  # per layer; v1 layers are bounded by their exact byte counts instead


class CorruptFile(ValueError):
    """A compressed file that does not parse, fails its checksum, or does not fit the model."""


def bits_for(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


def require(cond: bool, path, problem: str) -> None:
    if not cond:
        raise CorruptFile(f"{path}: malformed header: {problem}")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_span(entry, path, where: str, nbytes: int) -> None:
    require(isinstance(entry, dict), path, f"{where} is not an object")
    require(_is_count(entry.get("offset")), path, f"{where} has no valid offset")
    size = entry.get("nbytes")
    require(size == nbytes, path, f"{where} holds {size!r} bytes, needs {nbytes}")


def _check_leaf(leaf, path) -> None:
    require(isinstance(leaf, dict) and isinstance(leaf.get("path"), str), path, "a leaf without a path")
    name, shape = leaf["path"], leaf.get("shape")
    require(isinstance(shape, list) and all(map(_is_count, shape)), path, f"{name}: invalid shape {shape!r}")
    count = math.prod(shape)
    slices = leaf.get("slices", 1)
    if leaf.get("kind") in ("codebook", "sparse", "ranged"):
        ok = _is_count(slices) and slices >= 1 and (slices == 1 or (shape and shape[0] == slices))
        require(ok, path, f"{name}: {slices!r} codebooks per slice for shape {shape}")
    if leaf.get("kind") == "codebook":
        k, bits = leaf.get("k"), leaf.get("bits")
        require(_is_count(k) and k >= 1, path, f"{name}: invalid codebook size {k!r}")
        require(bits == bits_for(k), path, f"{name}: {bits!r} bits per index for {k} centres")
        _check_span(leaf.get("centres"), path, f"{name} centres", 4 * k * slices)
        _check_span(leaf.get("indices"), path, f"{name} indices", (count * bits + 7) // 8)
    elif leaf.get("kind") == "sparse":
        require(count <= _MAX_WEIGHTS, path, f"{name}: {count} weights exceed the {_MAX_WEIGHTS} supported")
        k, nnz, raw = leaf.get("k"), leaf.get("nnz"), leaf.get("gaps_raw")
        require(_is_count(k) and 1 <= k <= 256, path, f"{name}: invalid codebook size {k!r}")
        require(_is_count(nnz) and nnz <= count, path, f"{name}: invalid non-zero count {nnz!r}")
        require(_is_count(raw) and nnz <= raw <= 10 * nnz, path, f"{name}: invalid gap stream length {raw!r}")
        _check_span(leaf.get("centres"), path, f"{name} centres", 4 * k * slices)
        for stream in ("gaps", "values"):  # entropy-coded: any size, checked when decoded
            entry = leaf.get(stream)
            size = entry.get("nbytes") if isinstance(entry, dict) else None
            require(_is_count(size), path, f"{name} {stream} has no valid size")
            require(_is_count(entry.get("offset")), path, f"{name} {stream} has no valid offset")
    elif leaf.get("kind") == "ranged":
        require(count <= _MAX_WEIGHTS, path, f"{name}: {count} weights exceed the {_MAX_WEIGHTS} supported")
        k, nnz = leaf.get("k"), leaf.get("nnz")
        require(_is_count(k) and 1 <= k <= 256, path, f"{name}: invalid codebook size {k!r}")
        require(
            _is_count(nnz) and nnz <= count and (k > 1 or nnz == 0),
            path,
            f"{name}: invalid non-zero count {nnz!r}",
        )
        _check_span(leaf.get("centres"), path, f"{name} centres", 4 * (k - 1) * slices)
        entry = leaf.get("data")
        ok = isinstance(entry, dict) and _is_count(entry.get("nbytes")) and _is_count(entry.get("offset"))
        require(ok, path, f"{name} data has no valid size")
    elif leaf.get("kind") == "coded":
        bits, scale, zero_point = leaf.get("bits"), leaf.get("scale"), leaf.get("zero_point")
        require(_is_count(bits) and 2 <= bits <= 8, path, f"{name}: invalid code width {bits!r}")
        finite = isinstance(scale, float) and math.isfinite(scale) and scale > 0
        require(finite, path, f"{name}: invalid scale {scale!r}")
        valid = _is_count(zero_point) and zero_point <= 2**bits - 1
        require(valid, path, f"{name}: invalid zero point {zero_point!r}")
        _check_span(leaf.get("data"), path, f"{name} codes", (count * bits + 7) // 8)
    else:
        require(leaf.get("kind") == "float", path, f"{name}: unknown kind {leaf.get('kind')!r}")
        _check_span(leaf.get("data"), path, f"{name} data", 4 * count)


def check_header(meta, path) -> None:
    """Every key and type the loader relies on, so that damage is a ``CorruptFile``, never a KeyError."""
    require(isinstance(meta, dict), path, "not a JSON object")
    require(isinstance(meta.get("payload_sha256"), str), path, "no payload checksum")
    require(isinstance(meta.get("leaves"), list), path, "no list of leaves")
    require(meta.get("model") is None or isinstance(meta["model"], str), path, "model is not a string")
    require(meta.get("config") is None or isinstance(meta["config"], dict), path, "config is not an object")
    _check_activations(meta.get("activations"), path)
    _check_reuse(meta.get("reuse", []), path)
    for leaf in meta["leaves"]:
        _check_leaf(leaf, path)
    names = [leaf["path"] for leaf in meta["leaves"]]
    require(len(set(names)) == len(names), path, "a leaf is listed twice")
    if "state" in meta:
        require(meta.get("version", 0) >= 3, path, "state in a file of version < 3")
        _check_state(meta["state"], path)


STATE_ITEM_BYTES = {
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "int16": 2, "int32": 4,
    "int64": 8, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1,
}  # fmt: skip


def _check_state(entries, path) -> None:
    require(isinstance(entries, list), path, "state is not a list")
    for entry in entries:
        require(
            isinstance(entry, dict) and isinstance(entry.get("path"), str), path, "a state entry has no path"
        )
        name, shape = entry["path"], entry.get("shape")
        require(
            isinstance(shape, list) and all(_is_count(d) for d in shape), path, f"state {name}: invalid shape"
        )
        dtype = entry.get("dtype")
        require(dtype in STATE_ITEM_BYTES, path, f"state {name}: unknown dtype {dtype!r}")
        _check_span(entry.get("data"), path, f"state {name}", STATE_ITEM_BYTES[dtype] * math.prod(shape))
    names = [entry["path"] for entry in entries]
    require(len(set(names)) == len(names), path, "a state entry is listed twice")


def _check_activations(acts, path) -> None:
    if acts is None:
        return
    require(isinstance(acts, dict), path, "activations is not an object")
    for name, v in acts.items():
        ok = isinstance(v, list) and len(v) == 3 and isinstance(v[0], float) and math.isfinite(v[0])
        ok = ok and v[0] > 0 and _is_count(v[1]) and v[2] == 8 and v[1] <= 255
        require(ok, path, f"activation quantisation of {name}: invalid (scale, zero point, bits) {v!r}")


def _check_reuse(links, path) -> None:
    require(isinstance(links, list), path, "reuse is not a list")
    for v in links:
        ok = isinstance(v, list) and len(v) == 3 and all(isinstance(s, str) for s in v[:2])
        ok = ok and _is_count(v[2])
        require(ok, path, f"reuse: invalid (target, source, rank) {v!r}")
