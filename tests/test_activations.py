"""Activation quantisation: fake_quant against ONNX Runtime's QDQ, the ViT exports (codebook and W8A8)
against JAX on MNIST, the integer kernels ONNX Runtime picks, each mode end to end, bad input."""

import json
import subprocess
import sys
from collections import Counter

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from flax import nnx
from onnx import TensorProto, helper

import gmm_quant as gq
from gmm_quant.core import grid
from gmm_quant.core.fake_quant import fake_quant, range_params
from gmm_quant.formats import export, storage
from gmm_quant.run.plan import build_plan
from gmm_quant.surgery import activations as points
from gmm_quant.training import data
from models.vit import vit_mnist
from tests.cli_runs import ROOT, one_line


def test_fake_quant_is_what_onnx_runtime_quantize_dequantize_computes():
    scale, zero_point = range_params(-1.3, 2.1)
    rng = np.random.default_rng(0)
    halves = (np.arange(-20, 20) + 0.5 - zero_point) * np.float32(scale)  # exact ties: round half to even
    x = np.concatenate([rng.normal(0, 1.5, 2000), halves, [-9.0, 9.0, 0.0]]).astype(np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.size])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
         helper.make_tensor("z", TensorProto.UINT8, [], [zero_point])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(
        np.asarray(fake_quant(x, scale, zero_point)), session.run(None, {"x": x})[0]
    )


def test_the_gradient_passes_straight_through_inside_the_range_only():
    scale, zero_point = range_params(-1.0, 1.0)
    x = np.array([-3.0, -0.99, -0.2, 0.0, 0.4, 0.99, 3.0], np.float32)
    grad = jax.grad(lambda v: (fake_quant(v, scale, zero_point) * np.arange(7)).sum())(x)
    np.testing.assert_array_equal(grad, [0, 1, 2, 3, 4, 5, 0])


@pytest.fixture(scope="module")
def vit(mnist_dir):
    """vit_mnist trained briefly on 4,096 training images, weights snapped to the initial mixture."""
    ds = data.load("mnist", mnist_dir.parent)
    graphdef, params = nnx.split(vit_mnist(rngs=nnx.Rngs(0)), nnx.Param)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    params = gq.pretrain(apply_fn, params, (ds.x_train[:4096], ds.y_train[:4096]), epochs=1, batch_size=64)
    plan = build_plan(gq.Config(keep_float=("^(embed|cls|position)",)), params)
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    return graphdef, snapped, codebooks, ds.x_test[:1000], ds.x_train[:512]


def run_batches(session, x, batch):
    outs = [session.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def test_vit_codebook_export_matches_jax_on_1000_mnist_test_images(vit):
    graphdef, params, codebooks, x, _ = vit

    def apply_fn(p, v):
        return nnx.merge(graphdef, p)(v)

    session = export.session(export.to_onnx(apply_fn, params, codebooks, x[:8], encoding="sparse"))
    ref = np.asarray(apply_fn(params, x))
    for batch in (1, 7, 256):
        ours = run_batches(session, x, batch)
        assert np.abs(ours - ref).max() <= 1e-4, batch
        assert np.array_equal(ours.argmax(1), ref.argmax(1)), batch


def test_the_library_session_runs_integer_kernels_exactly_when_activations_are_quantised(vit, tmp_path):
    """What the latency benchmarks time: W8A8 through ONNX Runtime's integer kernels (as a plain
    session runs the file), weight-only grids decoded once at load (no DequantizeLinear left)."""
    graphdef, params, codebooks, x, calibration = vit
    codebooks = {p: grid.to_grid(cb, 8) for p, cb in codebooks.items()}
    params = gq.dequantize(codebooks, params)
    model = nnx.merge(graphdef, params)
    weights_only = export.to_onnx(
        lambda p, v: nnx.merge(graphdef, p)(v), params, codebooks, x[:8], encoding="grid"
    )
    points.attach(model, points.calibrate(model, "blocks", [calibration[:256]], 8))
    gd, ps = nnx.split(model, nnx.Param)
    w8a8 = export.to_onnx(lambda p, v: nnx.merge(gd, p)(v), ps, codebooks, x[:8], encoding="grid")
    kernels = {}
    for name, proto in (("weights only", weights_only), ("w8a8", w8a8)):
        export.session(proto, optimized_path=tmp_path / f"{name}.onnx").run(None, {"input": x[:2]})
        kernels[name] = Counter(n.op_type for n in onnx.load(tmp_path / f"{name}.onnx").graph.node)
    assert kernels["w8a8"]["MatMulIntegerToFloat"] == 24 and kernels["w8a8"]["MatMul"] < 24
    assert (
        kernels["weights only"]["DequantizeLinear"] == 0
        and kernels["weights only"]["MatMulIntegerToFloat"] == 0
    )


def test_w8a8_export_runs_integer_kernels_and_matches_the_fake_quantised_model(vit, tmp_path):
    graphdef, params, codebooks, x, calibration = vit
    codebooks = {p: grid.to_grid(cb, 8) for p, cb in codebooks.items()}
    model = nnx.merge(graphdef, gq.dequantize(codebooks, params))
    scales = points.calibrate(model, "blocks", [calibration[:256], calibration[256:]], 8)
    points.attach(model, scales)
    graphdef, params = nnx.split(model, nnx.Param)

    def apply_fn(p, v):
        return nnx.merge(graphdef, p)(v)

    onnx.save(export.to_onnx(apply_fn, params, codebooks, x[:8], encoding="grid"), tmp_path / "w8a8.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    session = ort.InferenceSession(str(tmp_path / "w8a8.onnx"), options, providers=["CPUExecutionProvider"])
    kernels = Counter(n.op_type for n in onnx.load(tmp_path / "optimised.onnx").graph.node)
    assert kernels["MatMulIntegerToFloat"] + kernels["QLinearMatMul"] == len(scales) == 24
    ref = np.asarray(apply_fn(params, x))
    step = (ref.max() - ref.min()) / 255  # one step of the logits quantised to 8 bits per tensor
    for batch in (1, 7, 256):
        ours = run_batches(session, x, batch)
        # an activation a float32 rounding away from a code boundary (ONNX Runtime computes LayerNorm
        # in another order) may land on the neighbouring code; that image may then differ by more
        within = np.abs(ours - ref).max(axis=1) <= step
        assert within.mean() >= 0.999, (batch, float(np.abs(ours - ref).max()), step)
        assert np.mean(ours.argmax(1) == ref.argmax(1)) >= 0.999, batch


def test_activation_ranges_survive_the_file_and_damage_is_refused(vit, tmp_path):
    graphdef, params, codebooks, _, calibration = vit
    scales = points.calibrate(nnx.merge(graphdef, params), "mlp", [calibration], 8)
    gq.save_compressed(tmp_path / "m.gqz", codebooks, params, model="vit_mnist", activations=scales)
    loaded = storage.load_compressed(tmp_path / "m.gqz")
    assert loaded.activations == scales
    attached = points.points(loaded.build_model(), "mlp")
    assert {p: layer.act_quant for p, layer in attached.items()} == scales


def vit_tiny(tmp_path, *extra):
    cmd = [sys.executable, "-m", "gmm_quant.train", "--config", "vit_tiny", "--workdir", str(tmp_path / "w"),
           "--no-progress", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode", ["w8a8", "w4a8", "w4a16"])
def test_each_mode_runs_end_to_end_on_a_tiny_vit(tmp_path, mode):
    proc = vit_tiny(tmp_path, "--activation-mode", mode)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert metrics["onnx"]["encoding"] == "grid"  # exported and verified against JAX (export.verify)
    if mode == "w4a16":  # no activation quantisation: float parity
        assert metrics["onnx"]["max_abs_diff"] <= 1e-4
    assert ("error_activations_quantised" in metrics) == (mode != "w4a16")
    centres = [len(layer["name"]) and layer["centres"] for layer in metrics["layers"]]
    assert max(centres) <= 2 ** int(mode[1]) - 1  # a signed grid of the mode's weight bits


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--activation-mode", "w3a3"], "invalid config field 'activation_mode' = 'w3a3'"),
        (["--activation-mode", "w8a8", "--grid-bits", "4"], "conflicts with activation_mode 'w8a8'"),
        (["--head-ratio", "0.9"], "would remove every one of the 4 heads of attention layer 'blocks/0/attn'"),
        (["--activation-mode", "w8a8", "--activation-layers", "nothing_matches"], "matches no Linear"),
    ],
)
def test_bad_transformer_settings_are_refused_before_training(tmp_path, extra, message):
    proc = vit_tiny(tmp_path, *extra)
    assert proc.returncode in (1, 2) and message in one_line(proc.stderr)
    assert not (tmp_path / "w").exists()
