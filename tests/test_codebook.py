import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gmm_quant as gq
from gmm_quant.core import codebook as cbm
from gmm_quant.core import mixture as mx

CFG = mx.MixtureConfig(num_components=5, pi_zero=0.5)


def _state(means, std=0.05):
    return mx.MixtureState(
        means=jnp.asarray(means, jnp.float32),
        log_precisions=jnp.full((len(means) + 1,), -2 * np.log(std), jnp.float32),
        mixing_logits=jnp.zeros((len(means) + 1,), jnp.float32),
    )


def _hand_layer():
    """Members by nearest centre (0, -0.5, -0.2, 0.3, 0.6): 6, 3, 1, 2, 0."""
    w = [0.0, 0.01, -0.02, 0.04, -0.05, 0.08, -0.5, -0.45, -0.55, -0.2, 0.3, 0.33]
    return np.asarray(w, np.float32), _state([-0.5, -0.2, 0.3, 0.6])


@pytest.mark.parametrize(
    "threshold, survivors",
    [(0, [0.0, -0.5, -0.2, 0.3]), (1, [0.0, -0.5, 0.3]), (2, [0.0, -0.5]), (3, [0.0]), (0.2, [0.0, -0.5])],
)
def test_pruning_removes_exactly_the_components_at_or_below_threshold(threshold, survivors):
    w, state = _hand_layer()
    plan = gq.make_plan({"k": w}, rules=(gq.Rule(".*", prune_threshold=threshold),), mixture=CFG)
    codebooks, snapped = gq.compress(plan, {"shared": state}, {"k": w})
    centres = codebooks["k"].centres
    assert centres[0] == 0.0 and np.dtype(centres.dtype) == np.float32
    assert sorted(centres.tolist()) == pytest.approx(sorted(survivors))
    # every weight sits on its nearest surviving centre
    nearest = np.asarray(survivors, np.float32)[np.abs(w[:, None] - np.asarray(survivors)).argmin(1)]
    np.testing.assert_array_equal(np.asarray(snapped["k"]), nearest)


def test_responsibility_assignment_uses_pi_weighted_likelihood():
    state = _state([0.1, 0.3], std=0.1)._replace(mixing_logits=jnp.array([0.0, 5.0, -5.0], jnp.float32))
    cfg = mx.MixtureConfig(num_components=3, pi_zero=0.5)
    w = np.array([0.22, 0.28], np.float32)
    assert cbm.assign(cfg, state, w, "nearest").tolist() == [2, 2]
    assert cbm.assign(cfg, state, w, "responsibility").tolist() == [1, 1]


def test_codebook_invariants():
    rng = np.random.default_rng(0)
    params = {
        "a": {"kernel": rng.normal(0, 0.3, (40, 30)).astype(np.float32), "bias": np.ones(30, np.float32)}
    }
    plan = gq.make_plan(params, mixture=mx.MixtureConfig(num_components=9))
    mixtures = gq.init_mixtures(plan, params)
    codebooks, snapped = gq.compress(plan, mixtures, params)
    assert list(codebooks) == ["a/kernel"]  # biases are not quantised by default
    cb = codebooks["a/kernel"]
    assert cb.centres[0] == 0.0 and len(set(cb.centres.tolist())) == len(cb.centres)
    assert cb.indices.dtype == np.uint8 and cb.shape == (40, 30)
    # dequantize reproduces the snapped params bit for bit
    np.testing.assert_array_equal(np.asarray(snapped["a"]["kernel"]), cb.dequantize())
    np.testing.assert_array_equal(
        np.asarray(gq.dequantize(codebooks, params)["a"]["kernel"]), cb.dequantize()
    )
    np.testing.assert_array_equal(np.asarray(snapped["a"]["bias"]), params["a"]["bias"])
    # snapping twice changes nothing
    np.testing.assert_array_equal(gq.snap(cb.dequantize(), cb.centres), cb.indices)
    _, snapped2 = gq.compress(plan, mixtures, snapped)
    np.testing.assert_array_equal(np.asarray(snapped2["a"]["kernel"]), np.asarray(snapped["a"]["kernel"]))


def test_index_dtype_is_smallest_that_fits():
    assert cbm.index_dtype(2) == np.uint8 and cbm.index_dtype(256) == np.uint8
    assert cbm.index_dtype(257) == np.uint16


def test_merge_joins_close_components_and_keeps_zero():
    means = np.array([0.0, 0.001, 0.5, 0.5001])
    merged = cbm.merge(means, np.full(4, 0.01), np.full(4, 0.25), max_kl=1e-2)
    assert merged.tolist() == pytest.approx([0.0, 0.50005])


def test_unknown_assignment_rule_is_rejected():
    w, state = _hand_layer()
    plan = gq.make_plan({"k": w}, rules=(gq.Rule(".*"),), mixture=CFG)
    with pytest.raises(ValueError, match="assignment"):
        gq.compress(plan, {"shared": state}, {"k": w}, assignment="map")


def test_finetuning_moves_centres_never_indices_and_keeps_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    true = rng.normal(size=(8, 3)).astype(np.float32)
    y = np.argmax(x @ true, 1).astype(np.int32)
    params = {"dense": {"kernel": jnp.asarray(true + rng.normal(0, 0.3, true.shape), jnp.float32)}}

    def apply(p, x):
        return x @ p["dense"]["kernel"]

    plan = gq.make_plan(params, mixture=mx.MixtureConfig(num_components=5))
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    tuned, tuned_params = gq.finetune(
        apply, codebooks, snapped, (x, y), epochs=5, batch_size=32, learning_rate=1e-2
    )
    before, after = codebooks["dense/kernel"], tuned["dense/kernel"]
    np.testing.assert_array_equal(before.indices, after.indices)
    assert after.centres[0] == 0.0
    assert np.abs(after.centres[1:] - before.centres[1:]).min() > 0
    np.testing.assert_array_equal(np.asarray(tuned_params["dense"]["kernel"]), after.dequantize())
    loss = gq.cross_entropy(apply)
    assert loss(tuned_params, x, y)[0] < loss(snapped, x, y)[0]
    assert jax.tree.structure(tuned_params) == jax.tree.structure(params)


def test_nan_in_training_stops_with_a_clear_error():
    x = np.ones((64, 3), np.float32)
    y = np.zeros(64, np.int32)
    params = {"dense": {"kernel": jnp.full((3, 2), jnp.nan)}}

    def apply(p, x):
        return x @ p["dense"]["kernel"]

    with pytest.raises(FloatingPointError, match=r"diverged in pretrain epoch 1: non-finite loss"):
        gq.pretrain(apply, params, (x, y), epochs=2, batch_size=32)
