"""A codebook per slice of a stacked leaf (issue 24, part 3): ``Rule(per_slice=True)`` gives every
block of an ``nnx.vmap`` stack its own surviving centres, pruned and fine-tuned on its own; the Han
count, the ``.gqz`` and the ONNX graph follow the choice."""

import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
import pytest
from test_storage import _rewrite_header
from test_train_mode import X_TEST, X_TRAIN, Y_TRAIN, ScannedStack

import gmm_quant as gq
from gmm_quant.core import codebook as cbm
from gmm_quant.core import mixture as mx
from gmm_quant.core.accounting import layer_cost
from gmm_quant.formats import storage
from gmm_quant.run import config as cfgm
from gmm_quant.run.plan import build_plan
from gmm_quant.training import modes

CFG = mx.MixtureConfig(num_components=5, pi_zero=0.5)
MEANS = [-0.5, -0.2, 0.3, 0.6]
# slice 0 sits near 0, -0.5 and 0.3; slice 1 near 0, 0.3 and 0.6, with one weight near -0.2
STACK = np.asarray(
    [[0.01, -0.02, -0.48, -0.52, 0.31, 0.29, 0.0, 0.02],
     [0.0, 0.03, 0.32, 0.28, 0.61, 0.58, -0.21, -0.01]], np.float32,
)  # fmt: skip


def _state():
    return mx.MixtureState(
        means=jnp.asarray(MEANS, jnp.float32),
        log_precisions=jnp.full((5,), -2 * np.log(0.05), jnp.float32),
        mixing_logits=jnp.zeros((5,), jnp.float32),
    )


def _compress(per_slice, threshold=0):
    rules = (gq.Rule(".*", per_slice=per_slice, prune_threshold=threshold),)
    plan = gq.make_plan({"k": STACK}, rules=rules, mixture=CFG)
    return gq.compress(plan, {"shared": _state()}, {"k": STACK})


def _nearest(w, centres):
    centres = np.asarray(centres, np.float32)
    return centres[np.abs(w[:, None] - centres).argmin(1)]


@pytest.mark.parametrize("threshold", [0, 1])
def test_each_slice_keeps_and_snaps_to_its_own_surviving_centres(threshold):
    codebooks, snapped = _compress(True, threshold)
    cb = codebooks["k"]
    members = [np.bincount(np.abs(w[:, None] - np.r_[0.0, MEANS]).argmin(1), minlength=5) for w in STACK]
    expected = [
        [0.0, *(m for m, n in zip(MEANS, count[1:], strict=True) if n > threshold)] for count in members
    ]
    assert cb.slices == 2 and cb.centres.shape == (2, max(map(len, expected)))
    for s, own in enumerate(expected):
        row = cb.centres[s]
        assert row[0] == 0.0 and sorted(cbm.row_centres(row).tolist()) == pytest.approx(sorted(own))
        assert not row[len(own) :].any()  # padding: zeros at the end, never pointed at
        assert cb.indices[s].max() < len(own)
        np.testing.assert_array_equal(np.asarray(snapped["k"])[s], _nearest(STACK[s], own))
    assert cb.indices.dtype == np.uint8 and cb.shape == STACK.shape
    np.testing.assert_array_equal(cb.dequantize(), np.asarray(snapped["k"]))
    again = cbm.make_sliced(cb.dequantize(), cb.centres)  # snapping twice changes nothing
    np.testing.assert_array_equal(again.indices, cb.indices)
    np.testing.assert_array_equal(again.centres, cb.centres)


def test_one_codebook_for_the_stack_is_the_default():
    cb = _compress(False)[0]["k"]
    assert cb.slices == 1 and sorted(cb.centres.tolist()) == pytest.approx(sorted([0.0, *MEANS]))


def test_han_count_pays_one_codebook_per_slice():
    sliced, stack = _compress(True)[0]["k"], _compress(False)[0]["k"]
    for cb in (sliced, stack):
        assert layer_cost("k", cb).codebook_bits == 32 * cb.slices * (cb.k - 1)
    assert layer_cost("k", sliced).codebook_bits == 32 * 2 * 3


@pytest.mark.parametrize("version", [1, 2])
def test_the_file_stores_every_slice_codebook(tmp_path, version):
    codebooks, snapped = _compress(True)
    path = tmp_path / "m.gqz"
    gq.save_compressed(path, codebooks, snapped, version=version)
    loaded = gq.load_compressed(path)
    np.testing.assert_array_equal(loaded.codebooks["k"].centres, codebooks["k"].centres)
    np.testing.assert_array_equal(loaded.codebooks["k"].indices, codebooks["k"].indices)
    np.testing.assert_array_equal(np.asarray(loaded.params({"k": STACK})["k"]), np.asarray(snapped["k"]))


def test_a_slice_count_that_does_not_fit_the_shape_is_refused(tmp_path):
    codebooks, snapped = _compress(True)
    gq.save_compressed(tmp_path / "m.gqz", codebooks, snapped)

    def edit(meta):
        meta["leaves"][0]["slices"] = 4
        return meta

    with pytest.raises(storage.CorruptFile, match="4 codebooks per slice for shape"):
        gq.load_compressed(_rewrite_header(tmp_path / "m.gqz", tmp_path, edit))


def test_a_leaf_without_a_stack_axis_is_refused():
    plan = gq.make_plan({"k": STACK[0]}, rules=(gq.Rule(".*", per_slice=True),), mixture=CFG)
    with pytest.raises(ValueError, match="layer k: per_slice needs a stacked leaf"):
        gq.compress(plan, {"shared": _state()}, {"k": STACK[0]})


def test_grid_centres_are_refused_per_slice():
    codebooks, snapped = _compress(True)
    with pytest.raises(ValueError, match=r"per slice .* has no grid form"):
        gq.finetune(lambda p, x: x @ p["k"].T, codebooks, snapped, (STACK[:, :8].T, np.zeros(8, int)),
                    epochs=1, batch_size=8, grid_bits=4)  # fmt: skip


def test_the_config_names_stacked_leaves_coded_per_slice():
    params = {"blocks": {"kernel": np.zeros((3, 4, 4), np.float32)}, "out": {"kernel": np.zeros((4, 2))}}
    plan = build_plan(cfgm.Config(per_slice=("blocks/",)), params)
    assert plan.rules["blocks/kernel"].per_slice and not plan.rules["out/kernel"].per_slice


@pytest.mark.parametrize("encoding", ["codebook", "sparse"])
def test_a_scanned_stack_fine_tunes_saves_and_exports_per_slice(tmp_path, encoding):
    apply_fn, params = gq.from_nnx(_stack(0))
    train = (X_TRAIN, Y_TRAIN)
    params = gq.pretrain(apply_fn, params, train, epochs=4, batch_size=32)
    plan = gq.make_plan(params, rules=(gq.Rule("blocks/lin/kernel", per_slice=True), *gq.DEFAULT_RULES))
    mixtures, params = gq.retrain(apply_fn, params, train, plan, epochs=4, batch_size=32)
    codebooks, snapped = gq.compress(plan, mixtures, params)
    before = codebooks["blocks/lin/kernel"]
    codebooks, params = gq.finetune(apply_fn, codebooks, snapped, train, epochs=2, batch_size=32)
    cb = codebooks["blocks/lin/kernel"]
    assert cb.slices == 3 and codebooks["embed/kernel"].slices == 1
    np.testing.assert_array_equal(cb.indices != 0, before.indices != 0)  # indices fixed, zero stays 0
    assert (cb.centres[:, 0] == 0).all()
    free = [cbm.row_centres(row)[1:] for row in cb.centres]  # each slice's centres moved on their own
    assert len({tuple(f.tolist()) for f in free}) == 3

    path = tmp_path / "m.gqz"
    gq.save_compressed(path, codebooks, params, state=modes.state_of(apply_fn))
    reloaded_fn, reloaded = gq.from_nnx(gq.load_model(path, model=_stack(1)))
    expected = np.asarray(apply_fn(params, X_TEST))
    np.testing.assert_array_equal(np.asarray(reloaded_fn(reloaded, X_TEST)), expected)

    gq.export_onnx(apply_fn, params, codebooks, X_TEST[:64], tmp_path / "m.onnx", encoding=encoding)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for batch in (1, 7, 64):
        out = session.run(None, {"input": np.asarray(X_TEST[:batch], np.float32)})[0]
        np.testing.assert_allclose(out, expected[:batch], atol=1e-5 * max(1.0, np.abs(expected).max()))


def _stack(seed):
    from flax import nnx

    return ScannedStack(nnx.Rngs(seed))


@pytest.mark.parametrize("encoding", ["codebook", "sparse"])
def test_onnx_gathers_each_slice_from_its_own_row(tmp_path, encoding):
    """A sparse stack of three [16, 16] blocks with different centres: both encodings decode every
    block from its own row (the sparse one from the non-zeros' positions), as ONNX Runtime shows."""
    rng = np.random.default_rng(0)
    rows = [np.asarray([0.0, -0.5, 0.25]), np.asarray([0.0, 0.7]), np.asarray([0.0, -0.1, 0.2, 0.9])]
    values = np.stack([rng.choice(r, (16, 16)) * (rng.random((16, 16)) < 0.1) for r in rows])
    cb = cbm.make_sliced(values.astype(np.float32), rows)
    params = {"k": cb.dequantize()}

    def apply_fn(p, x):
        for s in range(3):
            x = jnp.tanh(x @ p["k"][s])
        return x

    x = rng.normal(size=(64, 16)).astype(np.float32)
    gq.export_onnx(apply_fn, params, {"k": cb}, x, tmp_path / "m.onnx", encoding=encoding)
    ops = {n.op_type for n in __import__("onnx").load(tmp_path / "m.onnx").graph.node}
    assert ("ScatterElements" in ops) == (encoding == "sparse")
    out = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(out, np.asarray(apply_fn(params, x)), atol=1e-6)


@pytest.mark.parametrize("encoding", ["codebook", "sparse"])
def test_rows_coded_apart_survive_dead_unit_removal_and_flattened_contractions(tmp_path, encoding):
    """A codebook per row of a dense kernel whose dead input rows the exporter drops, and a [3, 4, 5]
    kernel contracted over its first two axes (flattened to 2-D offline): ONNX Runtime matches JAX."""
    rng = np.random.default_rng(3)
    hidden = np.where(rng.random((12, 8)) < 0.5, rng.normal(0, 0.5, (12, 8)), 0.0).astype(np.float32)
    hidden[:, 2] = 0.0  # a hidden unit without incoming weights: a dead row of the next kernel
    rows = [np.asarray([0.0, -0.3 - 0.1 * r, 0.2 + 0.05 * r], np.float32) for r in range(8)]
    blocks = [np.asarray([0.0, -0.4 + 0.1 * s, 0.3 + 0.1 * s], np.float32) for s in range(3)]
    out = np.stack([rng.choice(r, 4) for r in rows]).astype(np.float32)
    stack = np.stack([rng.choice(b, (4, 5)) for b in blocks]).astype(np.float32)
    codebooks = {"out": cbm.make_sliced(out, rows), "stack": cbm.make_sliced(stack, blocks)}
    params = {"hidden": hidden, **{p: cb.dequantize() for p, cb in codebooks.items()}}

    def apply_fn(p, x):
        h = jnp.maximum(x @ p["hidden"], 0.0) @ p["out"]
        return h + jnp.einsum("nla,lab->nb", x.reshape(-1, 3, 4), p["stack"])[:, :4]

    x = rng.normal(size=(32, 12)).astype(np.float32)
    gq.export_onnx(apply_fn, params, codebooks, x, tmp_path / "m.onnx", encoding=encoding)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, np.asarray(apply_fn(params, x)), atol=1e-5)
