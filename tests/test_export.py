"""ONNX export: outputs equal JAX's on real MNIST images, files hold packed indices, bad input refused."""

import numpy as np
import onnx
import pytest
from flax import nnx

import gmm_quant as gq
import models
from gmm_quant.cli import export as export_cli
from gmm_quant.core import grid
from gmm_quant.formats import export, storage
from gmm_quant.training import data


@pytest.fixture(scope="module")
def mnist_test(mnist_dir):
    return data.load_mnist(mnist_dir).x_test[:1000]


def _kernels(params):
    return [p for p in gq.core.rules.flatten(params) if p.endswith("kernel")]


def _compressed(name, on_grid):
    graphdef, params = nnx.split(models.create(name), nnx.Param)
    # a 16-component mixture per layer: 9..16 codes per layer, i.e. 4 bits both packed and in UINT4
    own = gq.MixtureConfig(num_components=16)
    rules = (gq.Rule("bias$", keep_float=True), *(gq.Rule(f"^{p}$", mixture=own) for p in _kernels(params)))
    plan = gq.make_plan(params, rules=rules)
    codebooks, _ = gq.compress(plan, gq.init_mixtures(plan, params), params)
    if on_grid:
        codebooks = {p: grid.to_grid(cb, bits=4) for p, cb in codebooks.items()}
    snapped = gq.dequantize(codebooks, params)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    return apply_fn, snapped, codebooks


@pytest.mark.parametrize("name", ["lenet300_100", "lenet5_caffe"])
@pytest.mark.parametrize("encoding", ["codebook", "grid"])
def test_onnx_matches_jax_on_mnist(name, encoding, mnist_test):
    apply_fn, params, codebooks = _compressed(name, on_grid=encoding == "grid")
    model = export.to_onnx(apply_fn, params, codebooks, mnist_test[:1], encoding=encoding)
    ops = [n.op_type for n in model.graph.node]
    assert ("DequantizeLinear" in ops) == (encoding == "grid") and ("Gather" in ops) == (
        encoding == "codebook"
    )
    # batch dimension is symbolic
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    # no duplicate nodes, no dead nodes
    signatures = [(n.op_type, tuple(n.input), str(n.attribute)) for n in model.graph.node]
    assert len(set(signatures)) == len(signatures)
    used = {i for n in model.graph.node for i in n.input} | {"output"}
    assert all(o in used for n in model.graph.node for o in n.output)
    # quantised weights are stored as 4-bit codes, never as float matrices
    floats = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert max(int(np.prod(i.dims)) for i in floats) <= 500  # biases and codebooks only
    for batch in (1, 7, 256):
        for start in range(0, 1000, batch * 4 if batch < 256 else batch):
            x = mnist_test[start : start + batch]
            if len(x) == batch:
                diff = np.abs(export.run_onnx(model, x) - np.asarray(apply_fn(params, x))).max()
                assert diff <= 1e-5, (batch, diff)
    # the file is at most 1.1x the plain packed size of its weights plus float leaves
    packed = sum(storage.bits_for(len(cb.centres)) * cb.indices.size / 8 for cb in codebooks.values())
    floats = 4 * sum(np.size(v) for k, v in gq.core.rules.flatten(params).items() if k not in codebooks)
    assert len(model.SerializeToString()) <= 1.1 * (packed + floats)


def test_export_refuses_to_write_when_outputs_differ(tmp_path, mnist_test, monkeypatch):
    apply_fn, params, codebooks = _compressed("lenet300_100", on_grid=False)
    run = export.run_onnx
    off = lambda model, x: run(model, x) * 1.001 + 2e-4  # noqa: E731  a runtime 0.1% off
    monkeypatch.setattr(export, "run_onnx", off)
    out = tmp_path / "m.onnx"
    with pytest.raises(export.ExportMismatch, match="file not written"):
        export.export_onnx(apply_fn, params, codebooks, mnist_test[:16], out)
    assert not out.exists()


def test_grid_encoding_refuses_off_grid_centres(mnist_test):
    apply_fn, params, codebooks = _compressed("lenet300_100", on_grid=False)
    with pytest.raises(ValueError, match="not on an evenly spaced grid"):
        export.to_onnx(apply_fn, params, codebooks, mnist_test[:1], encoding="grid")


def test_export_command_from_a_compressed_file(tmp_path, mnist_test):
    apply_fn, params, codebooks = _compressed("lenet5_caffe", on_grid=False)
    storage.save_compressed(tmp_path / "model.gqz", codebooks, params, model="lenet5_caffe")
    assert export_cli.main([str(tmp_path), "-o", str(tmp_path / "m.onnx")]) == 0
    model = onnx.load(tmp_path / "m.onnx")
    np.testing.assert_allclose(
        export.run_onnx(model, mnist_test[:32]), np.asarray(apply_fn(params, mnist_test[:32])), atol=1e-5
    )


def test_user_defined_model_with_unsupported_op_names_the_primitive(mnist_test):
    import jax.numpy as jnp

    graphdef, params = nnx.split(models.create("lenet300_100"), nnx.Param)

    def apply_fn(p, x):
        return jnp.sort(nnx.merge(graphdef, p)(x), axis=-1)

    with pytest.raises(NotImplementedError, match="sort"):
        export.to_onnx(apply_fn, params, {}, mnist_test[:1])


def _sparse(name, density, seed=0):
    """``_compressed`` with all but ``density`` of each kernel's weights set to the zero centre."""
    apply_fn, params, codebooks = _compressed(name, on_grid=False)
    rng = np.random.default_rng(seed)
    sparse = {}
    for path, cb in codebooks.items():
        keep = rng.random(cb.indices.shape) < density
        sparse[path] = gq.Codebook(cb.centres, np.where(keep, cb.indices, 0).astype(cb.indices.dtype))
    return apply_fn, gq.dequantize(sparse, params), sparse


@pytest.mark.parametrize("name", ["lenet300_100", "lenet5_caffe"])
def test_sparse_onnx_matches_jax_on_mnist_and_stores_only_the_non_zeros(name, mnist_test):
    apply_fn, params, codebooks = _sparse(name, density=0.04)
    model = export.to_onnx(apply_fn, params, codebooks, mnist_test[:8], encoding="sparse")
    assert "ScatterElements" in [n.op_type for n in model.graph.node]
    session = export.session(model)
    for batch in (1, 7, 256):
        for start in range(0, 1000, batch * 4 if batch < 256 else batch):
            x = mnist_test[start : start + batch]
            if len(x) == batch:
                diff = np.abs(session.run(None, {"input": x})[0] - np.asarray(apply_fn(params, x))).max()
                assert diff <= 1e-5, (batch, diff)
    # per non-zero at most a byte of gap (fillers included) and a byte of index, plus float leaves
    nnz = sum(int(np.count_nonzero(cb.indices)) for cb in codebooks.values())
    floats = 4 * sum(np.size(v) for k, v in gq.core.rules.flatten(params).items() if k not in codebooks)
    dense = export.to_onnx(apply_fn, params, codebooks, mnist_test[:8], encoding="codebook")
    size = len(model.SerializeToString())
    assert size <= 1.6 * nnz + floats + 4096 and size < 0.5 * len(dense.SerializeToString())


@pytest.mark.parametrize("density", [0.0005, 1.0])
def test_sparse_encoding_exports_very_sparse_and_dense_layers(density, mnist_test):
    """Gaps far beyond a byte (fillers) and a layer without zeros (stored densely) both decode right."""
    apply_fn, params, codebooks = _sparse("lenet300_100", density=density, seed=3)
    model = export.to_onnx(apply_fn, params, codebooks, mnist_test[:8], encoding="sparse")
    x = mnist_test[:64]
    np.testing.assert_allclose(export.run_onnx(model, x), np.asarray(apply_fn(params, x)), atol=1e-5)


def test_fillers_bridge_long_gaps_and_point_at_zero():
    from gmm_quant.formats.onnx_export.encodings import _gaps_with_fillers

    flat = np.zeros(1000, np.uint8)
    flat[[3, 40, 999]] = [2, 1, 5]
    gaps, idx = _gaps_with_fillers(flat, 15)
    assert gaps.max() <= 15 and gaps.min() >= 1
    positions = np.cumsum(gaps) - 1
    rebuilt = np.zeros(1000, np.uint8)
    rebuilt[positions] = idx
    np.testing.assert_array_equal(rebuilt, flat)
    assert np.count_nonzero(idx) == 3  # every extra entry is a filler pointing at the zero centre


def test_the_written_file_has_short_names_and_computes_exactly_as_the_readable_graph(tmp_path, mnist_test):
    """export_onnx writes tensor names as base-36 counters (in a small model the converter's readable
    names are a large part of the file): same outputs bit for bit, inputs and outputs keep their names."""
    import onnxruntime as ort

    apply_fn, params, codebooks = _compressed("lenet300_100", on_grid=False)
    readable = export.to_onnx(apply_fn, params, codebooks, mnist_test[:8])
    export.export_onnx(apply_fn, params, codebooks, mnist_test[:64], tmp_path / "m.onnx")
    written = onnx.load(tmp_path / "m.onnx")
    assert [v.name for v in written.graph.input] == ["input"] and [v.name for v in written.graph.output] == [
        "output"
    ]
    inner = [n for node in written.graph.node for n in node.output if n != "output"]
    assert inner and max(map(len, inner + [i.name for i in written.graph.initializer])) <= 2
    assert len(written.SerializeToString()) < len(readable.SerializeToString())
    x = mnist_test[:64].astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, {"input": x})[0]  # noqa: E731
    np.testing.assert_array_equal(run(written), run(readable))
