"""Float leaves stored as codes (``--float-bits``): the grid's invariants, the file, the Han count, ONNX."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import nnx

import gmm_quant as gq
import models
from gmm_quant.core import accounting, float_codes
from gmm_quant.formats import export, storage
from gmm_quant.training import data
from tests.cli_runs import ROOT, one_line, run_cli
from tests.test_storage import _rewrite_header

LEAVES = {
    "mixed": np.random.default_rng(0).normal(0.1, 0.5, (7, 9)).astype(np.float32),
    "positive (a LayerNorm scale)": np.random.default_rng(1).uniform(0.6, 1.4, 64).astype(np.float32),
    "negative": -np.random.default_rng(2).uniform(0.01, 3.0, 50).astype(np.float32),
    "one value": np.full(5, 0.37, np.float32),
    "zeros": np.zeros(12, np.float32),
}


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("name", list(LEAVES))
def test_a_fitted_code_keeps_its_invariants(name, bits):
    x = LEAVES[name]
    code = float_codes.fit(x, bits)
    assert code.codes.dtype == np.uint8 and code.codes.shape == x.shape
    assert code.codes.max() <= 2**bits - 1 and 0 <= code.zero_point <= 2**bits - 1 and code.bits == bits
    assert np.isfinite(code.scale) and code.scale > 0 and code.scale.dtype == np.float32
    # DequantizeLinear's formula, computed by hand; zero is exact; every value within half a step
    by_hand = np.array([np.float32(int(q) - code.zero_point) * code.scale for q in code.codes.ravel()])
    np.testing.assert_array_equal(code.dequantize().ravel(), by_hand)
    assert float_codes.encode(np.zeros(1), code.scale, code.zero_point, bits).dequantize()[0] == 0.0
    assert np.abs(code.dequantize() - x).max() <= code.scale / 2 * (1 + 1e-5)


def test_projection_rounds_like_the_code_and_passes_the_gradient_straight_through():
    x = LEAVES["mixed"]
    code = float_codes.fit(x, 4)
    grid = (code.scale, code.zero_point, 4)
    np.testing.assert_allclose(
        np.asarray(float_codes.project(jnp.asarray(x), *grid)), code.dequantize(), atol=1e-7
    )
    grad = jax.grad(lambda v: jnp.sum(3.0 * float_codes.project(v, *grid)))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad), np.full(x.shape, 3.0, np.float32))


@pytest.fixture(scope="module")
def coded_file(tmp_path_factory):
    _graphdef, params = nnx.split(models.create("lenet5_caffe"), nnx.Param)
    rng = np.random.default_rng(3)  # biases as trained ones are: not all zero
    biases = {p: rng.normal(0, 0.1, np.shape(v)).astype(np.float32)
              for p, v in gq.core.rules.flatten(params).items() if p.endswith("bias")}  # fmt: skip
    params = gq.core.rules.replace_leaves(params, biases)
    plan = gq.make_plan(params)
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    codes, snapped = gq.code_float_leaves(codebooks, snapped, 6)
    folder = tmp_path_factory.mktemp("coded")
    storage.save_compressed(folder / "plain.gqz", codebooks, snapped, model="lenet5_caffe")
    storage.save_compressed(folder / "coded.gqz", codebooks, snapped, model="lenet5_caffe", float_codes=codes)
    return folder, codebooks, snapped, codes


def test_coded_leaves_round_trip_bit_exactly_and_cost_their_bits(coded_file):
    folder, codebooks, snapped, codes = coded_file
    loaded = gq.load_compressed(folder / "coded.gqz")
    assert set(loaded.float_codes) == set(codes)
    for path, code in codes.items():
        got = loaded.float_codes[path]
        np.testing.assert_array_equal(got.codes, code.codes)
        assert (got.scale, got.zero_point, got.bits) == (code.scale, code.zero_point, 6)
    like = nnx.split(models.create("lenet5_caffe", seed=1), nnx.Param)[1]
    restored = gq.core.rules.flatten(loaded.params(like))
    for path, leaf in gq.core.rules.flatten(snapped).items():
        np.testing.assert_array_equal(restored[path], np.asarray(leaf))
    values = sum(c.codes.size for c in codes.values())
    saved = (folder / "plain.gqz").stat().st_size - (folder / "coded.gqz").stat().st_size
    assert saved >= 4 * values - (6 * values + 7) // 8 - 64 * len(codes)  # header entries aside
    # the Han count: each coded leaf costs 6 bits per value + a float32 scale + a 6-bit zero point
    plain = accounting.summarize(codebooks, snapped)
    coded = accounting.summarize(codebooks, snapped, float_codes=codes)
    assert plain["float_bits"] == 32 * values
    assert coded["float_bits"] == 6 * values + len(codes) * (32 + 6)
    assert plain["han_bits"] - coded["han_bits"] == plain["float_bits"] - coded["float_bits"]


@pytest.mark.parametrize(
    "key, value, message",
    [("bits", 9, "invalid code width 9"), ("scale", -0.5, "invalid scale -0.5"),
     ("scale", "1", "invalid scale '1'"), ("zero_point", 64, "invalid zero point 64")],
)  # fmt: skip
def test_a_damaged_coded_leaf_is_refused_with_the_reason(coded_file, tmp_path, key, value, message):
    def edit(meta):
        leaf = next(leaf for leaf in meta["leaves"] if leaf["kind"] == "coded")
        leaf[key] = value
        return meta

    with pytest.raises(storage.CorruptFile, match=message):
        gq.load_compressed(_rewrite_header(coded_file[0] / "coded.gqz", tmp_path, edit))


def test_onnx_stores_coded_constants_as_codes_and_matches_jax(coded_file):
    folder, *_ = coded_file
    apply_fn, params, codebooks, compressed = export.load_model_file(folder / "coded.gqz")
    x = data.random_inputs("mnist", 16)
    plain = export.to_onnx(apply_fn, params, codebooks, x[:8], encoding="sparse", remove_dead_units=False)
    coded = export.to_onnx(apply_fn, params, codebooks, x[:8], encoding="sparse", remove_dead_units=False,
                           float_codes=compressed.float_codes)  # fmt: skip
    dq = [n for n in coded.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == sum(c.codes.size >= 16 for c in compressed.float_codes.values()) > 0
    assert len(coded.SerializeToString()) < len(plain.SerializeToString())
    out = export.session(coded).run(None, {"input": x})[0]
    np.testing.assert_allclose(out, np.asarray(apply_fn(params, jnp.asarray(x))), atol=1e-4)
    onnx.checker.check_model(coded, full_check=True)


def vit_tiny(tmp_path, *extra):
    cmd = [sys.executable, "-m", "gmm_quant.train", "--config", "vit_tiny", "--workdir", str(tmp_path / "w"),
           "--no-progress", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_run_with_float_codes_reports_what_its_file_holds(tmp_path):
    work = tmp_path / "w"
    code, _out, err = run_cli(work, "--float-bits", "8")
    assert code == 0, err
    metrics = json.loads((work / "metrics.json").read_text())
    loaded = gq.load_compressed(work / "model.gqz")
    floats = {p for p in loaded.float_leaves}
    assert floats and set(loaded.float_codes) == floats  # every leaf outside the prior is coded
    assert metrics["float_code_bits"] == [8] and metrics["float_values"] == sum(
        c.codes.size for c in loaded.float_codes.values()
    )
    assert metrics["float_bytes"] == sum(accounting.cost_bits(c) for c in loaded.float_codes.values()) / 8
    # the reported error is the reloaded file's (trained vs reloaded)
    ds = data.load("digits")
    model = loaded.load_model()
    error = float(np.mean(np.argmax(np.asarray(model(jnp.asarray(ds.x_test))), -1) != ds.y_test))
    assert error == pytest.approx(metrics["error_finetuned"], abs=1e-6)
    nodes = onnx.load(work / "model.onnx").graph.node
    assert any(n.op_type == "DequantizeLinear" for n in nodes) and metrics["onnx"]["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("bits", ["9", "1", "-8"])
def test_an_impossible_code_width_is_refused_before_training(tmp_path, bits):
    proc = vit_tiny(tmp_path, "--float-bits", bits)
    assert proc.returncode in (1, 2) and "float_bits" in one_line(proc.stderr)
    assert not (tmp_path / "w").exists()


def test_folding_decodes_exactly_the_constants_no_integer_kernel_takes():
    from onnx import TensorProto, helper, numpy_helper

    from gmm_quant.formats.onnx_export.runtime import fold_constant_dequantize

    rng = np.random.default_rng(5)
    bias, weight = float_codes.fit(rng.normal(size=4), 6), float_codes.fit(rng.normal(size=(4, 3)), 8)
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("bq", bias.codes), ("bs", bias.scale), ("bz", np.uint8(bias.zero_point)),
        ("wq", weight.codes), ("ws", weight.scale), ("wz", np.uint8(weight.zero_point)))]  # fmt: skip
    nodes = [
        helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
        helper.make_node("Add", ["input", "b"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["output"]),
    ]
    shapes = (("input", [2, 4]), ("output", [2, 3]))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes]
    graph = helper.make_graph(nodes, "g", io[:1], io[1:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    folded = fold_constant_dequantize(model)
    assert [n.op_type for n in folded.graph.node] == ["DequantizeLinear", "Add", "MatMul"]
    np.testing.assert_array_equal(
        numpy_helper.to_array(next(i for i in folded.graph.initializer if i.name == "b")), bias.dequantize()
    )
    x = rng.normal(size=(2, 4)).astype(np.float32)
    expected = (x + bias.dequantize()) @ weight.dequantize()
    for proto in (model, folded):
        out = export.session(proto, integer_kernels=False).run(None, {"input": x})[0]
        np.testing.assert_allclose(out, expected, rtol=1e-6)
