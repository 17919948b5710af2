"""The compressed model file (``.gqz``): one file, versioned, checksummed, no pickle.

Layout (little-endian)::

    b"GMMQ"  u16 version  u32 header_length  32-byte sha256(header)  header (UTF-8 JSON)  payload

The header lists every leaf: quantised leaves as ``centres`` (float32 [k], or [slices, k] with
``slices`` for a stacked leaf coded per slice) and their indices: bit-packed at ceil(log2 k) bits per
weight (version 1), as LZMA2-coded gap and value streams (2 and 3), or range-coded at the entropy of
the layer's non-zero mask and indices with the zero centre implied (4, written by default:
``range_streams``; a v4 header lists only the sizes it cannot imply, offsets follow from the order);
float leaves as raw float32, or (``coded``) as codes of 2-8 bits bit-packed with their ``scale`` and
``zero_point`` (``float_codes``). It also records the model name, the config (v4: the fields that
differ from the defaults) and the payload's sha256, and which layers reuse another's weights
(``reuse``: each shared matrix is stored once, at its source's path; a reusing layer stores only its
transform). A model's variables other than its parameters (``state``: BatchNorm statistics, any
``nnx.Variable`` type, a Linen collection) are stored by path in their own dtype (from version 3);
random-number keys are not stored (a rebuilt model keeps its own). Loading checks the magic, the
version, both checksums, every offset and every shape, and raises ``CorruptFile`` naming the problem;
it never returns silently wrong weights. Files are written atomically (temporary file, then rename).
The bytes side (prefix, header, stream placement, bit packing) is ``gqz_layout``.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from typing import NamedTuple

import numpy as np

from gmm_quant._util.files import write_atomic
from gmm_quant.core.codebook import Codebook, index_dtype
from gmm_quant.core.float_codes import FloatCode
from gmm_quant.core.rules import flatten, is_random_key, replace_leaves
from gmm_quant.formats import gqz_layout as layout
from gmm_quant.formats import range_streams, sparse_streams
from gmm_quant.formats.gqz_layout import (
    MAGIC,
    RANGED_VERSION,
    VERSIONS,
    pack_bits,
    short_float32,
    unpack_bits,
)
from gmm_quant.formats.header_checks import STATE_ITEM_BYTES, CorruptFile, bits_for

VERSION = 4  # written; 1, 2, 3 and 4 are read
STATE_VERSION = 3


class Compressed(NamedTuple):
    """What a ``.gqz`` file holds."""

    codebooks: dict  # {path: Codebook}
    float_leaves: dict  # {path: float32 array}
    model: str | None
    config: dict | None
    activations: dict | None = None  # {layer: (scale, zero_point, bits)} of activation quantisation
    reuse: tuple = ()  # reuse.layers.Link of every layer computing another's output transformed
    float_codes: dict | None = None  # {path: FloatCode} of the float leaves stored as codes
    state: dict | None = None  # {path: array} of the model's non-parameter variables (None: none stored)

    def params(self, like=None, *, trust_model: bool = False):
        """The file's weights as a params pytree shaped like ``like``; by default the ``nnx.Param``
        state of the model the file names (see ``model_spec``; ``trust_model`` as for ``build_model``)."""
        if like is None:
            like = self._template(trust_model)
        flat = flatten(like)
        stored = {**{p: cb.dequantize() for p, cb in self.codebooks.items()}, **self.float_leaves}
        missing = sorted(set(flat) - set(stored))
        extra = sorted(set(stored) - set(flat))
        if missing or extra:
            raise ModelMismatch(f"file does not fit the model: missing {missing}, unexpected {extra}")
        for path, leaf in flat.items():
            if tuple(np.shape(leaf)) != stored[path].shape:
                raise ModelMismatch(
                    f"shape mismatch for {path}: file has {stored[path].shape}, model has {np.shape(leaf)}"
                )
        return replace_leaves(like, stored)

    def _template(self, trust_model: bool):
        from flax import nnx

        if self.model is None:
            raise ValueError("the file does not name its model; pass a params pytree of the right structure")
        return nnx.split(self.build_model(trust_model=trust_model), nnx.Param, ...)[1]

    def restore_state(self, rest, ignored=()):
        """``rest`` (the model's non-parameter variables, e.g. ``nnx.split(module, nnx.Param, ...)[2]``)
        with the file's state put in, leaf by leaf; random-number keys stay ``rest``'s own, and file
        entries at the paths ``ignored`` (a model's random streams, kept out of ``rest``) are passed
        over. A file that holds no state (written before gmm_quant stored it, or saved without
        ``state=``) leaves ``rest`` as it is, with a warning when the model has statistics that the
        file therefore lacks."""
        wanted = {p: v for p, v in flatten(rest).items() if not is_random_key(v)}
        if self.state is None:
            if wanted:
                named = f"{sorted(wanted)[:3]}{' ...' if len(wanted) > 3 else ''}"
                warnings.warn(
                    f"the file holds no model state, so {named} "
                    "keep the rebuilt model's initial values (BatchNorm statistics: predictions will differ "
                    "from the saved model's); save with state= to store them",
                    stacklevel=3,
                )
            return rest
        stored = set(self.state) - set(ignored)
        missing, extra = sorted(set(wanted) - stored), sorted(stored - set(wanted))
        if missing or extra:
            raise ModelMismatch(
                f"the file's state does not fit the model: missing {missing}, unexpected {extra}"
            )
        for p, v in wanted.items():
            if tuple(np.shape(v)) != self.state[p].shape:
                raise ModelMismatch(
                    f"state {p}: file has shape {self.state[p].shape}, model has {np.shape(v)}"
                )
        return replace_leaves(rest, {p: self.state[p] for p in wanted})

    def shapes(self) -> dict:
        """{path: shape} of every stored leaf."""
        return {**{p: tuple(cb.indices.shape) for p, cb in self.codebooks.items()},
                **{p: tuple(np.shape(v)) for p, v in self.float_leaves.items()}}  # fmt: skip

    def build_model(self, spec: str | None = None, *, trust_model: bool = False):
        """A fresh module of the model the file names (or ``spec``), its attention layers cut to the
        heads the file stores (a model whose heads were pruned), its reusing layers re-linked.

        A file never runs code on its own: a factory it names (``package.module:factory``) is imported
        and called only with ``trust_model=True``; the project's own model names and a ``spec`` the
        caller passes are trusted (``model_spec.check_trusted``)."""
        from gmm_quant.surgery import heads
        from gmm_quant.surgery.model_spec import check_trusted, make_model

        if spec is None:
            check_trusted(self.model, trust_model)
        module = make_model(spec or self.model)
        heads.fit_heads(module, self.shapes())
        if self.reuse:
            from gmm_quant.surgery.reuse.layers import attach

            attach(module, self.reuse, fitted=False)
        if self.activations:
            from gmm_quant.surgery import activations as points

            points.attach(module, self.activations)
        return module

    def variables(self, like: dict) -> dict:
        """A Linen ``variables`` dict with the file's weights and state, shaped as ``like`` (the
        module's own ``variables``, e.g. from ``module.init``): ``{"params": ..., "batch_stats": ...}``."""
        rest = {k: v for k, v in like.items() if k != "params"}
        return {"params": self.params(like["params"]), **self.restore_state(rest)}

    def load_model(self, model=None, *, trust_model: bool = False):
        """The Flax NNX module (``model``, or the one the file names) with the file's weights and state,
        in eval mode (BatchNorm on its stored statistics, Dropout off; ``.train()`` switches back)."""
        from flax import nnx

        if model is not None and not isinstance(model, nnx.Module):
            raise TypeError(
                f"load_model rebuilds an nnx.Module, not a {type(model).__name__}: for a Linen module use "
                "gq.load_compressed(path).variables(variables) with variables = module.init(...)"
            )
        if model is None and self.model:
            model = self.build_model(trust_model=trust_model)
        if model is None:
            raise ValueError("the file does not name its model; pass model=<an nnx.Module of that model>")
        graphdef, like, rngs, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
        state = self.restore_state(rest, ignored=flatten(rngs))  # random streams: the model's own
        module = nnx.merge(graphdef, self.params(like), rngs, state)
        module.eval()
        return module


class ModelMismatch(ValueError):
    """A sound file whose leaves or state do not fit the model it is loaded into."""


def load_model(path, model=None, *, trust_model: bool = False):
    """The Flax NNX module stored in a ``.gqz`` file, rebuilt from the model name it records (a
    ``package.module:factory`` only with ``trust_model=True``: see ``Compressed.build_model``)."""
    return load_compressed(path).load_model(model, trust_model=trust_model)


def _codebook_entry(cb, add, version: int) -> dict:
    k, per_slice = cb.k, {"slices": cb.slices} if cb.slices > 1 else {}
    if version >= RANGED_VERSION:  # the zero centre is implied; indices range-coded
        nonzero = np.asarray(cb.centres, "<f4")[..., 1:]
        nnz = int(np.count_nonzero(np.asarray(cb.indices)))
        return {**per_slice, "kind": "ranged", "k": k, "nnz": nnz, "centres": add(nonzero.tobytes()),
                "data": add(range_streams.encode(np.asarray(cb.indices), k))}  # fmt: skip
    centres = add(np.asarray(cb.centres, "<f4").tobytes())
    if version == 1:
        bits = bits_for(k)
        return {
            **per_slice,
            "kind": "codebook",
            "k": k,
            "bits": bits,
            "centres": centres,
            "indices": add(pack_bits(cb.indices, bits)),
        }
    gaps, values, nnz = sparse_streams.split(cb.indices)
    return {
        **per_slice, "kind": "sparse", "k": k, "nnz": nnz, "gaps_raw": len(gaps), "centres": centres,
        "gaps": add(sparse_streams.pack(gaps)), "values": add(sparse_streams.pack(values)),
    }  # fmt: skip


def save_compressed(
    path,
    codebooks: dict,
    params,
    *,
    model: str | None = None,
    config: dict | None = None,
    activations: dict | None = None,
    reuse=(),
    float_codes: dict | None = None,
    state=None,
    version: int | None = None,
):
    """Write quantised leaves (``codebooks``) and all other leaves of ``params`` to ``path``.

    ``model`` names the model so the file can be loaded without a template: a project model name or
    ``"package.module:factory"`` (see ``model_spec``). ``version`` 4 (the default) range-codes each
    layer's non-zero mask and centre indices at their entropy (``range_streams``); 2 and 3 (what
    earlier gmm_quant reads) code them with LZMA2 (``sparse_streams``); 1 bit-packs every index.
    ``activations`` ({layer: (scale, zero_point, bits)}) records activation quantisation, re-attached
    when the file's model is rebuilt; ``reuse`` (``reuse.layers.Link``s) the layers that reuse
    another's weights, re-linked likewise; ``float_codes`` ({path: FloatCode}) the float leaves stored
    as codes (their values in ``params`` must be the codes' values). ``state`` (a pytree:
    ``nnx.split(module, nnx.Param, ...)[2]``, a Linen ``{"batch_stats": ...}``) holds the model's other
    variables, stored exactly in their own dtypes (random-number keys are skipped), from version 3 on.
    """
    state_leaves = _state_leaves(state)
    version = version or VERSION
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version}")
    if state_leaves and version < STATE_VERSION:
        raise ValueError(
            f"a model's state is stored from version {STATE_VERSION} on, not in version {version}"
        )
    chunks, leaves, offset = [], [], 0

    def add(data: bytes):
        nonlocal offset
        chunks.append(data)
        entry = {"offset": offset, "nbytes": len(data)}
        offset += len(data)
        return len(data) if version >= RANGED_VERSION else entry

    for name, leaf in flatten(params).items():
        if name in codebooks:
            entry = _codebook_entry(codebooks[name], add, version)
        elif float_codes and name in float_codes:
            c = float_codes[name]
            scale = short_float32(c.scale) if version >= RANGED_VERSION else float(c.scale)
            entry = {"kind": "coded", "bits": c.bits, "scale": scale, "zero_point": c.zero_point,
                     "data": add(pack_bits(c.codes, c.bits))}  # fmt: skip
        else:
            entry = {"kind": "float", "data": add(np.asarray(leaf, "<f4").tobytes())}
        leaves.append({"path": name, "shape": list(np.shape(leaf)), **entry})
    stored_state = [
        {"path": name, "shape": list(v.shape), "dtype": v.dtype.name, "data": add(layout.state_bytes(v))}
        for name, v in state_leaves.items()
    ]
    if version >= RANGED_VERSION:  # sizes the header implies are not written
        for entry in leaves:
            entry.pop(layout.IMPLIED.get(entry["kind"]), None)
        for entry in stored_state:
            entry.pop("data")
    payload = b"".join(chunks)
    header = json.dumps(
        {
            **({"format": "gmm_quant"} if version < RANGED_VERSION else {}),  # v4: the magic says it
            "version": version,
            "model": model,
            "config": config,
            **({"activations": {k: list(v) for k, v in activations.items()}} if activations else {}),
            **({"reuse": [[r.target, r.source, r.rank] for r in reuse]} if reuse else {}),
            "leaves": leaves,
            **({"state": stored_state} if stored_state else {}),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
        },
        separators=(",", ":") if version > 1 else None,
    ).encode()
    if version > 1:
        header = sparse_streams.pack(header)
    prefix = layout.PREFIX.pack(MAGIC, version, len(header), hashlib.sha256(header).digest())
    write_atomic(path, prefix + header + payload)


def _state_leaves(state) -> dict:
    """{path: host array} of ``state``'s leaves that are values, not random-number keys."""
    if state is None:
        return {}
    out = {}
    for name, leaf in flatten(state).items():
        if is_random_key(leaf):
            continue
        value = np.asarray(leaf)
        if value.dtype.name not in STATE_ITEM_BYTES:
            raise ValueError(
                f"state {name}: dtype {value.dtype} cannot be stored (one of {list(STATE_ITEM_BYTES)})"
            )
        out[name] = value
    return out


def load_compressed(path) -> Compressed:
    """Read a ``.gqz`` file; raises ``CorruptFile`` with the reason if anything is wrong."""
    with open(path, "rb") as f:
        raw = f.read()
    meta, payload = layout.read_header(raw, path)
    codebooks, floats, coded = {}, {}, {}
    for leaf in meta["leaves"]:
        name, shape = leaf["path"], tuple(leaf["shape"])
        count = math.prod(shape)
        if leaf["kind"] in ("codebook", "sparse", "ranged"):
            centres = np.frombuffer(layout.slice_of(payload, leaf["centres"], path, name), "<f4").astype(
                np.float32
            )
            centres = centres.reshape(leaf.get("slices", 1), -1)
            if leaf["kind"] == "ranged":  # the zero centre is implied
                centres = np.concatenate([np.zeros((centres.shape[0], 1), np.float32), centres], axis=1)
            centres = centres if "slices" in leaf else centres[0]
            indices = layout.indices_of(leaf, payload, path, count)
            if indices.size and indices.max() >= leaf["k"]:
                raise CorruptFile(f"{path}: indices of {name} exceed its codebook")
            codebooks[name] = Codebook(centres, indices.astype(index_dtype(leaf["k"])).reshape(shape))
        elif leaf["kind"] == "coded":
            codes = unpack_bits(layout.slice_of(payload, leaf["data"], path, name), leaf["bits"], count)
            coded[name] = FloatCode(codes.astype(np.uint8).reshape(shape), np.float32(leaf["scale"]),
                                    leaf["zero_point"], leaf["bits"])  # fmt: skip
            floats[name] = coded[name].dequantize()
        else:
            data = np.frombuffer(layout.slice_of(payload, leaf["data"], path, name), "<f4")
            if data.size != count:
                raise CorruptFile(f"{path}: {name} holds {data.size} values, shape {shape} needs {count}")
            floats[name] = data.astype(np.float32).reshape(shape)
    acts = {k: tuple(v) for k, v in meta.get("activations", {}).items()}
    from gmm_quant.surgery.reuse.links import Link

    links = tuple(Link(*v) for v in meta.get("reuse", []))
    state = (
        {e["path"]: layout.state_value(e, payload, path) for e in meta["state"]} if "state" in meta else None
    )
    return Compressed(
        codebooks, floats, meta.get("model"), meta.get("config"), acts or None, links, coded, state
    )
