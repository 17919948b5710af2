"""The unit prior (core/unit_prior.py): its value and gradient against a hand computation, its place
in the complexity and the config, and a unit it drives to zero gone from the file and the ONNX graph
with the outputs unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gmm_quant as gq
from gmm_quant.core import objective, unit_prior
from gmm_quant.formats import export
from gmm_quant.run import config as cfgm
from gmm_quant.run.plan import build_plan
from gmm_quant.training import data

FLOOR = 1e-3


def _hand_value_and_grad(w: np.ndarray, floor: float):
    """Sum over output units (all axes but the last) and input units (all but the one before it)."""
    w = w.astype(np.float64)
    value, grad = 0.0, np.zeros_like(w)
    for axis in (w.ndim - 1, w.ndim - 2):
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)  # [units, members]
        mean_square = (moved**2).mean(axis=1)
        d = moved.shape[1]
        value += sum(0.5 * d * np.log(m + floor**2) for m in mean_square)
        scale = 1.0 / (mean_square + floor**2)  # d/dw of d/2 log(mean(w^2) + f^2) = w / (mean + f^2)
        shape = [1] * w.ndim
        shape[axis] = -1
        grad += w * scale.reshape(shape)
    return value, grad


@pytest.mark.parametrize("shape", [(6, 4), (3, 3, 2, 5)])
def test_value_and_gradient_equal_a_hand_computation(shape):
    w = np.random.default_rng(0).normal(scale=0.05, size=shape).astype(np.float32)
    w[..., 1] = 0.0  # a dead output unit: finite value, zero gradient
    value, grad = jax.value_and_grad(unit_prior.neg_log_prob)(jnp.asarray(w), FLOOR)
    want_value, want_grad = _hand_value_and_grad(w, FLOOR)
    np.testing.assert_allclose(float(value), want_value, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grad)[..., 1] == 0)


def test_a_vector_has_no_units_and_live_units_counts_the_non_zero_slices():
    assert float(unit_prior.neg_log_prob(jnp.ones(7))) == 0.0
    w = np.zeros((5, 4), np.float32)
    w[0, 1], w[3, 1], w[3, 2] = 1.0, -2.0, 0.5
    assert unit_prior.live_units(w) == (2, 2)  # outputs 1, 2; inputs 0, 3
    assert unit_prior.live_units(np.ones(3)) == ()


def _mlp_params():
    rng = np.random.default_rng(1)

    def layer(n_in, n_out):
        return {
            "kernel": rng.normal(scale=0.1, size=(n_in, n_out)).astype(np.float32),
            "bias": np.zeros(n_out),
        }

    return {"fc1": layer(8, 6), "fc2": layer(6, 3)}


def test_the_config_puts_the_strength_of_the_first_matching_item_into_the_complexity():
    params = _mlp_params()
    cfg = cfgm.validate(cfgm.Config(unit_prior=("fc1/kernel=0.5", "kernel=2.0")))
    plan = build_plan(cfg, params)
    assert plan.rules["fc1/kernel"].unit_prior == 0.5
    assert plan.rules["fc2/kernel"].unit_prior == 2.0
    assert plan.rules["fc1/bias"].keep_float
    plain = build_plan(cfgm.Config(), params)
    mixtures = objective.init_mixtures(plain, params)
    extra = objective.complexity(plan, mixtures, params) - objective.complexity(plain, mixtures, params)
    want = 0.5 * _hand_value_and_grad(params["fc1"]["kernel"], FLOOR)[0]
    want += 2.0 * _hand_value_and_grad(params["fc2"]["kernel"], FLOOR)[0]
    np.testing.assert_allclose(float(extra), want, rtol=1e-4)


@pytest.mark.parametrize("item", ["fc1", "fc1=-1", "fc1=nan", "(=1", "fc1=lots"])
def test_a_bad_unit_prior_item_is_refused_naming_the_field(item):
    with pytest.raises(cfgm.ConfigError, match="unit_prior"):
        cfgm.validate(cfgm.Config(unit_prior=(item,)))


@pytest.mark.parametrize("strength", [-1.0, float("inf"), float("nan")])
def test_a_rule_refuses_a_negative_or_infinite_strength(strength):
    with pytest.raises(ValueError, match="unit_prior"):
        gq.Rule("x", unit_prior=strength)


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(64, 48, rngs=rngs)
        self.out = nnx.Linear(48, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


@pytest.fixture(scope="module")
def trained():
    """A 64-48-10 MLP on digits, pretrained, then retrained with and without the unit prior."""
    ds = data.load_digits()
    train = (ds.x_train, ds.y_train)
    graphdef, params = nnx.split(_Net(nnx.Rngs(0)), nnx.Param)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    params = gq.pretrain(apply_fn, params, train, epochs=15, batch_size=32)
    out = {}
    for strength in (0.0, 10.0):
        rules = (gq.Rule("bias", keep_float=True), gq.Rule("hidden", unit_prior=strength), gq.Rule(".*"))
        plan = gq.make_plan(params, rules)
        mixtures, retrained = gq.retrain(apply_fn, params, train, plan, tau=0.05, epochs=12, batch_size=32)
        out[strength] = gq.compress(plan, mixtures, retrained)
    return apply_fn, out, ds


def test_the_unit_prior_kills_hidden_units_the_plain_prior_keeps(trained):
    _, out, _ = trained
    live = {
        s: unit_prior.live_units(np.asarray(cb["hidden/kernel"].dequantize())) for s, (cb, _) in out.items()
    }
    assert live[10.0][0] <= live[0.0][0] - 8, live  # at least 8 of 48 hidden units more are all zero
    assert live[10.0][1] < live[0.0][1], live  # and input pixels: dead rows


def test_a_dead_unit_is_gone_from_the_onnx_graph_and_the_outputs_are_unchanged(trained, tmp_path):
    apply_fn, out, ds = trained
    codebooks, snapped = out[10.0]
    hidden = np.asarray(codebooks["hidden/kernel"].dequantize())
    live_out = unit_prior.live_units(hidden)[0]
    assert live_out < 48
    x = ds.x_test[:64]
    model = export.to_onnx(apply_fn, snapped, codebooks, x[:8], encoding="codebook")
    dims = {
        i.name.split("_indices")[0]: tuple(i.dims) for i in model.graph.initializer if "_indices" in i.name
    }
    # the hidden kernel keeps its live columns; the output kernel at most the rows of live hidden units
    assert sorted(d[1] for d in dims.values()) == [10, live_out], dims
    assert sorted(d[0] for d in dims.values())[0] <= live_out, dims
    np.testing.assert_allclose(export.run_onnx(model, x), np.asarray(apply_fn(snapped, x)), atol=1e-4)
    sparse = export.to_onnx(apply_fn, snapped, codebooks, x[:8])  # the default encoding, smaller still
    kept = export.to_onnx(apply_fn, snapped, codebooks, x[:8], remove_dead_units=False)
    assert sparse.ByteSize() < kept.ByteSize()
    np.testing.assert_allclose(export.run_onnx(sparse, x), np.asarray(apply_fn(snapped, x)), atol=1e-4)
    gq.save_compressed(tmp_path / "m.gqz", codebooks, snapped)
    loaded = gq.load_compressed(tmp_path / "m.gqz").params(snapped)
    np.testing.assert_array_equal(np.asarray(apply_fn(loaded, x)), np.asarray(apply_fn(snapped, x)))


def test_weights_reading_dead_units_leave_the_model_the_han_count_and_the_file(trained, tmp_path):
    apply_fn, out, ds = trained
    codebooks, snapped = out[10.0]
    done = gq.disconnect_dead_units(apply_fn, snapped, codebooks, ds.x_train[:16])
    hidden = np.asarray(codebooks["hidden/kernel"].indices)
    dead = np.flatnonzero(~hidden.any(axis=0))
    before, after = (
        np.asarray(codebooks["out/kernel"].indices),
        np.asarray(done.codebooks["out/kernel"].indices),
    )
    assert np.count_nonzero(before[dead]) > 0 and not after[dead].any()  # every row reading a dead unit
    live = np.setdiff1d(np.arange(48), dead)
    np.testing.assert_array_equal(after[live], before[live])
    assert done.weights == {"out/kernel": int(np.count_nonzero(before[dead]))}
    x = ds.x_test
    np.testing.assert_allclose(
        np.asarray(apply_fn(done.params, x)), np.asarray(apply_fn(snapped, x)), atol=1e-4
    )
    han = [gq.summarize(cb, p)["han_bits"] for cb, p in ((codebooks, snapped), (done.codebooks, done.params))]
    assert han[1] < han[0], han
    sizes = {}
    for name, (cb, p) in {"kept": (codebooks, snapped), "cut": (done.codebooks, done.params)}.items():
        gq.save_compressed(tmp_path / f"{name}.gqz", cb, p)
        sizes[name] = (tmp_path / f"{name}.gqz").stat().st_size
    assert sizes["cut"] < sizes["kept"], sizes
    loaded = gq.load_compressed(tmp_path / "cut.gqz").params(snapped)
    np.testing.assert_array_equal(np.asarray(apply_fn(loaded, x)), np.asarray(apply_fn(done.params, x)))
    model = export.to_onnx(apply_fn, done.params, done.codebooks, x[:8])
    np.testing.assert_allclose(export.run_onnx(model, x), np.asarray(apply_fn(snapped, x)), atol=1e-4)
