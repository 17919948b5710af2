import numpy as np
import pytest
from flax import nnx

import gmm_quant as gq
import models
from gmm_quant.formats import gqz_layout, storage


@pytest.fixture(scope="module", params=[1, 2, 4], ids=["v1", "v2", "v4"])
def compressed_model(tmp_path_factory, request):
    _graphdef, params = nnx.split(models.create("lenet5_caffe"), nnx.Param)
    plan = gq.make_plan(params)
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    path = tmp_path_factory.mktemp("gqz") / "model.gqz"
    storage.save_compressed(
        path, codebooks, snapped, model="lenet5_caffe", config={"seed": 0}, version=request.param
    )
    return path, codebooks, snapped


def test_round_trip_is_bit_identical(compressed_model):
    path, codebooks, snapped = compressed_model
    loaded = gq.load_compressed(path)
    assert loaded.model == "lenet5_caffe" and loaded.config == {"seed": 0}
    like = nnx.split(models.create("lenet5_caffe", seed=1), nnx.Param)[1]
    restored = gq.core.rules.flatten(loaded.params(like))
    for name, leaf in gq.core.rules.flatten(snapped).items():
        np.testing.assert_array_equal(restored[name], np.asarray(leaf))
        assert restored[name].dtype == np.float32
    for name, cb in codebooks.items():
        np.testing.assert_array_equal(loaded.codebooks[name].indices, cb.indices)


def test_indices_are_bit_packed(compressed_model):
    path, codebooks, snapped = compressed_model
    if _version(path) > 1:
        pytest.skip("versions 2 and 4 entropy-code the indices (tests/test_storage.py::test_v2_*, test_v4_*)")
    packed = sum(storage.bits_for(len(cb.centres)) * cb.indices.size for cb in codebooks.values()) / 8
    floats = 4 * sum(np.size(v) for k, v in gq.core.rules.flatten(snapped).items() if k not in codebooks)
    assert path.stat().st_size < 1.05 * (packed + floats) + 4096


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
def test_pack_unpack(bits):
    values = np.random.default_rng(bits).integers(0, 2**bits, 1001)
    np.testing.assert_array_equal(
        gqz_layout.unpack_bits(gqz_layout.pack_bits(values, bits), bits, 1001), values
    )


def _corrupt(path, tmp_path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        raw = raw[: len(raw) // 2]
    elif how == "flipped payload byte":
        raw[-100] ^= 0x01
    elif how == "flipped header byte":
        raw[60] ^= 0x01
    elif how == "version":
        raw[4] = 99
    elif how == "not ours":
        raw[:4] = b"PK\x03\x04"
    out = tmp_path / f"{how}.gqz"
    out.write_bytes(bytes(raw))
    return out


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "checksum mismatch"),
        ("flipped payload byte", "payload checksum mismatch"),
        ("flipped header byte", "header checksum mismatch"),
        ("version", "format version 99"),
        ("not ours", "not a gmm_quant compressed file"),
    ],
)
def test_corrupt_files_are_refused_with_the_reason(compressed_model, tmp_path, how, message):
    path = _corrupt(compressed_model[0], tmp_path, how)
    with pytest.raises(storage.CorruptFile, match=message):
        gq.load_compressed(path)


def test_tiny_file_is_refused(tmp_path):
    path = tmp_path / "empty.gqz"
    path.write_bytes(b"GMM")
    with pytest.raises(storage.CorruptFile, match="truncated"):
        gq.load_compressed(path)


def test_shape_mismatch_is_refused(compressed_model):
    loaded = gq.load_compressed(compressed_model[0])
    other = nnx.split(models.create("lenet300_100"), nnx.Param)[1]
    with pytest.raises(storage.ModelMismatch, match="does not fit the model"):
        loaded.params(other)
    like = nnx.split(models.create("lenet5_caffe"), nnx.Param)[1]
    bad = loaded._replace(float_leaves={**loaded.float_leaves, "fc2/bias": np.zeros(11, np.float32)})
    with pytest.raises(storage.ModelMismatch, match="shape mismatch for fc2/bias"):
        bad.params(like)


def test_write_is_atomic(compressed_model, tmp_path, monkeypatch):
    _path, codebooks, snapped = compressed_model
    target = tmp_path / "m.gqz"
    target.write_bytes(b"previous good file")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", boom)  # the write fails before the rename
    with pytest.raises(OSError, match="disk full"):
        storage.save_compressed(target, codebooks, snapped)
    assert target.read_bytes() == b"previous good file"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gqz"]  # no temporary file left behind


def _version(path):
    return gqz_layout.PREFIX.unpack_from(path.read_bytes())[1]


def _rewrite_header(path, tmp_path, edit, name="edited.gqz"):
    """A copy of ``path`` whose header JSON is ``edit(meta)`` (or raw bytes), checksums recomputed."""
    import hashlib
    import json

    from gmm_quant.formats import sparse_streams

    raw = path.read_bytes()
    _magic, version, length, _digest = gqz_layout.PREFIX.unpack_from(raw)
    header = raw[gqz_layout.PREFIX.size : gqz_layout.PREFIX.size + length]
    if version > 1:
        header = sparse_streams.unpack(header, 1 << 24)
    payload = raw[gqz_layout.PREFIX.size + length :]
    new = edit(json.loads(header))
    new = new if isinstance(new, bytes) else json.dumps(new).encode()
    if version > 1:
        new = sparse_streams.pack(new)
    prefix = gqz_layout.PREFIX.pack(gqz_layout.MAGIC, version, len(new), hashlib.sha256(new).digest())
    out = tmp_path / name
    out.write_bytes(prefix + new + payload)
    return out


def _drop(key):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def _centre_bytes(leaf):  # v4 ("ranged") implies the zero centre
    return 4 * (leaf["k"] - (leaf["kind"] == "ranged"))


def _first_leaf(change):
    def edit(meta):  # the first quantised leaf
        i = next(
            i for i, leaf in enumerate(meta["leaves"]) if leaf["kind"] in ("codebook", "sparse", "ranged")
        )
        meta["leaves"][i] = change(dict(meta["leaves"][i]))
        return meta

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda meta: b"{not json", "header is not valid JSON"),
        (lambda meta: b"\xff\xfe\x00", "header is not valid JSON"),
        (lambda meta: [1, 2], "not a JSON object"),
        (_drop("leaves"), "no list of leaves"),
        (_drop("payload_sha256"), "no payload checksum"),
        (_first_leaf(lambda leaf: {**leaf, "shape": [-5, 2]}), "invalid shape"),
        (_first_leaf(lambda leaf: {**leaf, "shape": [10**12]}), "needs|exceed the"),
        (_first_leaf(lambda leaf: {k: v for k, v in leaf.items() if k != "path"}), "a leaf without a path"),
        (_first_leaf(lambda leaf: {**leaf, "kind": "pickle"}), "unknown kind"),
        (_first_leaf(lambda leaf: {**leaf, "k": 0}), "invalid codebook size"),
        (_first_leaf(lambda leaf: {**leaf, "bits": 7}), "v1: bits per index"),
        (_first_leaf(lambda leaf: {**leaf, "nnz": 10**9}), "v2: invalid non-zero count"),
        (_first_leaf(lambda leaf: {**leaf, "gaps_raw": 0, "nnz": 5}), "v2: invalid gap stream length"),
        (
            _first_leaf(lambda leaf: {**leaf, "gaps": {"offset": 0, "nbytes": -3}}),
            "v2: gaps has no valid size",
        ),
        (lambda meta: {**meta, "version": 3}, "header says version 3"),
        (
            _first_leaf(lambda leaf: {**leaf, "centres": {"offset": -1, "nbytes": _centre_bytes(leaf)}}),
            "offset",
        ),
        (
            _first_leaf(lambda leaf: {**leaf, "centres": {"offset": 10**9, "nbytes": _centre_bytes(leaf)}}),
            "outside",
        ),
        (lambda meta: {**meta, "leaves": meta["leaves"] + meta["leaves"][:1]}, "listed twice"),
        (lambda meta: {**meta, "model": 5}, "model is not a string"),
    ],
)
def test_malformed_header_with_valid_checksums_is_refused(compressed_model, tmp_path, edit, message):
    version = _version(compressed_model[0])
    if message.startswith(("v1: ", "v2: ")):
        if message[:2] != f"v{version}":
            pytest.skip(f"a field of version {message[1]} files")
        message = message[4:]
    path = _rewrite_header(compressed_model[0], tmp_path, edit)
    with pytest.raises(storage.CorruptFile, match=message):
        gq.load_compressed(path)


def test_fuzzed_files_raise_only_corrupt_file(compressed_model, tmp_path):
    """Random truncations, byte flips and header mutations (checksums recomputed): CorruptFile or a
    correct load, never another exception."""
    import json

    rng = np.random.default_rng(0)
    raw = compressed_model[0].read_bytes()
    target = tmp_path / "fuzz.gqz"
    values = [None, True, -1, 0, 1, 3, 2**40, 1.5, "x", [], {}, [-1], [3, 4]]

    def mutate(meta):
        leaf = meta["leaves"][rng.integers(len(meta["leaves"]))]
        holder = leaf if rng.random() < 0.7 else meta
        key = list(holder)[rng.integers(len(holder))]
        holder[key] = values[rng.integers(len(values))]
        return meta

    cases = 0
    for i in range(3000):
        kind = i % 3
        if kind == 0:
            target.write_bytes(raw[: rng.integers(len(raw))])
        elif kind == 1:
            data = bytearray(raw)
            for pos in rng.integers(len(data), size=rng.integers(1, 4)):
                data[pos] ^= 1 << rng.integers(8)
            target.write_bytes(bytes(data))
        else:
            _rewrite_header(
                compressed_model[0], tmp_path, lambda meta: mutate(json.loads(json.dumps(meta))), "fuzz.gqz"
            )
        try:
            gq.load_compressed(target)
        except storage.CorruptFile:
            cases += 1
    assert cases > 2500  # nearly every case is damage that must be detected


@pytest.fixture(scope="module")
def sparse_model():
    """LeNet-300-100 with ~4% non-zeros in a few clusters, as after retraining with the prior."""
    _graphdef, params = nnx.split(models.create("lenet300_100"), nnx.Param)
    rng = np.random.default_rng(0)
    flat = gq.core.rules.flatten(params)
    centres = np.array([0.0, -0.2, -0.1, 0.08, 0.15], np.float32)
    codebooks = {}
    for path, leaf in flat.items():
        if path.endswith("kernel"):
            idx = np.where(rng.random(leaf.shape) < 0.04, rng.integers(1, 5, leaf.shape), 0).astype(np.uint8)
            codebooks[path] = gq.Codebook(centres, idx)
    return codebooks, gq.dequantize(codebooks, params)


def test_v2_round_trip_is_bit_identical_and_v1_files_still_load(sparse_model, tmp_path):
    codebooks, params = sparse_model
    for version in (1, 2):
        path = tmp_path / f"v{version}.gqz"
        storage.save_compressed(path, codebooks, params, model="lenet300_100", version=version)
        loaded = gq.load_compressed(path)
        for name, cb in codebooks.items():
            np.testing.assert_array_equal(loaded.codebooks[name].indices, cb.indices)
            np.testing.assert_array_equal(loaded.codebooks[name].centres, cb.centres)
        restored = gq.core.rules.flatten(loaded.params())
        for name, leaf in gq.core.rules.flatten(params).items():
            np.testing.assert_array_equal(restored[name], np.asarray(leaf))
    assert (tmp_path / "v2.gqz").stat().st_size < 0.25 * (tmp_path / "v1.gqz").stat().st_size


def test_v2_stays_near_the_entropy_of_its_streams(sparse_model, tmp_path):
    """Per non-zero: the entropy of its centre index plus that of its gap (an i.i.d. lower bound here)."""
    codebooks, params = sparse_model
    path = tmp_path / "m.gqz"
    storage.save_compressed(path, codebooks, params, version=2)
    bits = 0.0
    for cb in codebooks.values():
        flat = cb.indices.ravel()
        nz = np.flatnonzero(flat)
        for symbols in (flat[nz], np.minimum(np.diff(nz, prepend=-1), 128)):
            p = np.bincount(symbols) / symbols.size
            bits += -symbols.size * np.sum(p[p > 0] * np.log2(p[p > 0]))
    floats = 4 * sum(np.size(v) for k, v in gq.core.rules.flatten(params).items() if k not in codebooks)
    assert path.stat().st_size <= 1.08 * (bits / 8 + floats) + 1024


@pytest.mark.parametrize(
    "shape, density", [((7,), 1.0), ((300, 100), 0.0), ((5, 5, 20, 50), 0.3), ((1, 1), 1.0)]
)
def test_sparse_streams_invert_exactly(shape, density):
    from gmm_quant.formats import sparse_streams

    rng = np.random.default_rng(1)
    idx = np.where(rng.random(shape) < density, rng.integers(1, 200, shape), 0).astype(np.uint8)
    gaps, values, nnz = sparse_streams.split(idx)
    gaps = sparse_streams.unpack(sparse_streams.pack(gaps), len(gaps))
    values = sparse_streams.unpack(sparse_streams.pack(values), nnz)
    back = sparse_streams.join(gaps, values, nnz, shape, np.uint8)
    np.testing.assert_array_equal(back, idx)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_v2_and_v4_round_trip_for_every_model(name, tmp_path):
    _graphdef, params = nnx.split(models.create(name), nnx.Param)
    plan = gq.make_plan(params)
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    for version in (2, 4):
        path = tmp_path / f"v{version}.gqz"
        storage.save_compressed(path, codebooks, snapped, model=name, version=version)
        restored = gq.core.rules.flatten(gq.load_compressed(path).params())
        for key, leaf in gq.core.rules.flatten(snapped).items():
            np.testing.assert_array_equal(restored[key], np.asarray(leaf))


def test_v4_is_written_by_default_and_comes_within_a_percent_of_the_entropy(sparse_model, tmp_path):
    """v4 range-codes each layer's non-zero mask (i.i.d. bits at the layer's density) and its centre
    indices: the file is the entropy of those two (computed here with numpy) plus the float leaves,
    the implied-zero centres and a header of a few hundred bytes; and smaller than v2."""
    codebooks, params = sparse_model
    for version in (None, 2):
        storage.save_compressed(tmp_path / f"v{version}.gqz", codebooks, params, version=version)
    path = tmp_path / "vNone.gqz"
    assert _version(path) == 4
    bits = 0.0
    for cb in codebooks.values():
        flat = cb.indices.ravel()
        density = np.count_nonzero(flat) / flat.size
        bits += flat.size * -(density * np.log2(density) + (1 - density) * np.log2(1 - density))
        p = np.bincount(flat[flat != 0]) / np.count_nonzero(flat)
        bits += -np.count_nonzero(flat) * np.sum(p[p > 0] * np.log2(p[p > 0]))
    floats = 4 * sum(np.size(v) for k, v in gq.core.rules.flatten(params).items() if k not in codebooks)
    centres = 4 * sum(cb.k - 1 for cb in codebooks.values())
    assert path.stat().st_size <= 1.01 * bits / 8 + floats + centres + 600
    assert path.stat().st_size < (tmp_path / "v2.gqz").stat().st_size
    loaded = gq.load_compressed(path)
    for name, cb in codebooks.items():
        np.testing.assert_array_equal(loaded.codebooks[name].indices, cb.indices)
        np.testing.assert_array_equal(loaded.codebooks[name].centres, cb.centres)


@pytest.mark.parametrize(
    "shape, density, k",
    [((7,), 1.0, 5), ((300, 100), 0.0, 1), ((300, 100), 0.0, 9), ((5, 5, 20, 50), 0.3, 256), ((1, 1), 1.0, 2),
     ((4096,), 0.5, 2)],
)  # fmt: skip
def test_range_streams_invert_exactly(shape, density, k):
    from gmm_quant.formats import range_streams

    rng = np.random.default_rng(1)
    idx = (
        np.where(rng.random(shape) < density, rng.integers(1, max(k, 2), shape), 0)
        if k > 1
        else np.zeros(shape)
    )
    data = range_streams.encode(idx, k)
    back = range_streams.decode(data, int(np.count_nonzero(idx)), k, idx.size)
    np.testing.assert_array_equal(back.reshape(shape), idx)


def test_a_damaged_range_stream_is_refused():
    from gmm_quant.formats import range_streams

    idx = np.where(np.random.default_rng(2).random(500) < 0.2, 3, 0)
    data = range_streams.encode(idx, 5)
    nnz = int(np.count_nonzero(idx))
    for bad, message in [(data[:-3], "wrong length"), (b"\0" * 4 + data[4:], "empty table"),
                         (data, "non-zeros, expected")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            range_streams.decode(bad, nnz + (message == "non-zeros, expected"), 5, 500)
