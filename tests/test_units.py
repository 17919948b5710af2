"""Dead units removed at export (onnx_export/units.py): exactly the all-zero rows and columns go, the
outputs stay those of JAX, constant units are folded into the next layer's bias."""

import jax
import numpy as np
import onnx
import pytest

import gmm_quant as gq
from gmm_quant.formats import export
from gmm_quant.formats.onnx_export.names import compact_names

CENTRES = np.array([0.0, -0.5, 0.25, 0.75], np.float32)


def _mlp():
    """6 -> 5 -> 4 -> 3 with ReLU. Layer 1: hidden units 1 and 3 have no incoming weights (but a bias,
    so they are constants); layer 2: unit 0's outgoing row is zero, output unit 2 has no incoming
    weights; layer 3 dense."""
    rng = np.random.default_rng(0)
    idx = [rng.integers(1, 4, size=s).astype(np.uint8) for s in ((6, 5), (5, 4), (4, 3))]
    idx[0][:, [1, 3]] = 0
    idx[1][0, :] = 0
    idx[1][:, 2] = 0
    codebooks = {f"l{i}/kernel": gq.Codebook(CENTRES, ix) for i, ix in enumerate(idx)}
    params = {}
    for i, cb in enumerate(codebooks.values()):
        bias = rng.normal(size=cb.indices.shape[1]).astype(np.float32)
        params[f"l{i}"] = {"kernel": cb.dequantize(), "bias": bias}

    def apply_fn(p, x):
        h = jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"])
        h = jax.nn.gelu(h @ p["l1"]["kernel"] + p["l1"]["bias"], approximate=False)
        return h @ p["l2"]["kernel"] + p["l2"]["bias"]

    return apply_fn, params, codebooks


def _index_shapes(model):
    return {
        i.name.split("_indices")[0]: tuple(i.dims) for i in model.graph.initializer if "_indices" in i.name
    }


@pytest.mark.parametrize("encoding", ["codebook", "sparse", "grid"])
def test_exactly_the_all_zero_units_are_removed_and_outputs_are_unchanged(encoding):
    apply_fn, params, codebooks = _mlp()
    x = np.random.default_rng(1).normal(size=(64, 6)).astype(np.float32)
    model = export.to_onnx(apply_fn, params, codebooks, x[:8], encoding=encoding)
    kept = export.to_onnx(apply_fn, params, codebooks, x[:8], encoding=encoding, remove_dead_units=False)
    for batch in (1, 7, 64):
        ref = np.asarray(apply_fn(params, x[:batch]))
        np.testing.assert_allclose(export.run_onnx(model, x[:batch]), ref, atol=1e-5)
        np.testing.assert_allclose(export.run_onnx(kept, x[:batch]), ref, atol=1e-5)
    if encoding == "codebook":
        # layer 0 loses columns 1, 3; layer 1 keeps rows {2, 4} (live {0, 2, 4} minus zero row 0) and
        # loses column 2; layer 2 keeps rows {0, 1, 3}
        shapes = _index_shapes(model)
        assert sorted(shapes.values()) == sorted([(6, 3), (2, 3), (3, 3)])
        assert sorted(_index_shapes(kept).values()) == sorted([(6, 5), (5, 4), (4, 3)])
    onnx.checker.check_model(model, full_check=True)


def test_float_kernels_lose_their_dead_units_too():
    apply_fn, params, _codebooks = _mlp()
    x = np.random.default_rng(2).normal(size=(7, 6)).astype(np.float32)
    model = export.to_onnx(apply_fn, params, {}, x)
    mats = sorted(tuple(i.dims) for i in model.graph.initializer if len(i.dims) == 2 and i.dims[0] > 1)
    assert mats == sorted([(6, 3), (2, 3), (3, 3)])
    np.testing.assert_allclose(export.run_onnx(model, x), np.asarray(apply_fn(params, x)), atol=1e-5)


def test_a_dead_unit_feeding_a_non_matmul_is_restored_to_full_width():
    apply_fn, params, codebooks = _mlp()

    def wide(p, x):  # the hidden layer is also an output: its dead units must come back as constants
        h = jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"])
        return jax.numpy.concatenate([h, apply_fn(p, x)], axis=-1)

    x = np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32)
    model = export.to_onnx(wide, params, codebooks, x, encoding="sparse")
    np.testing.assert_allclose(export.run_onnx(model, x), np.asarray(wide(params, x)), atol=1e-5)


def test_the_written_file_keeps_dead_units_exactly_when_removing_them_would_restore_order(tmp_path):
    """A chain of layers loses its dead units; a model that needs its narrowed features back in order
    (here: also an output) keeps them, and no order-restoring Gather is left in the file."""
    apply_fn, params, codebooks = _mlp()

    def wide(p, x):
        h = jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"])
        return jax.numpy.concatenate([h, apply_fn(p, x)], axis=-1)

    x = np.random.default_rng(4).normal(size=(16, 6)).astype(np.float32)
    for fn, removed in ((apply_fn, True), (wide, False)):
        removing = export.to_onnx(fn, params, codebooks, x[:8], encoding="sparse")
        assert export.restores_units(removing) != removed
        info = export.export_onnx(fn, params, codebooks, x, tmp_path / "m.onnx", encoding="sparse")
        model = onnx.load(tmp_path / "m.onnx")
        assert info["dead_units_removed"] == removed and not export.restores_units(model)
        expected = export.to_onnx(fn, params, codebooks, x[:8], encoding="sparse", remove_dead_units=removed)
        compact_names(expected)  # as the file holds it
        assert info["bytes"] == len(expected.SerializeToString())
        np.testing.assert_allclose(export.run_onnx(model, x), np.asarray(fn(params, x)), atol=1e-5)
