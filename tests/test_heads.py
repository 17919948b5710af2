"""Attention heads: scores, selection, masking vs structural pruning, reload, the pipeline."""

import jax
import numpy as np
import pytest
from flax import nnx

import gmm_quant as gq
from gmm_quant.core.rules import flatten
from gmm_quant.surgery import heads
from models.vit import vit_digits


@pytest.fixture
def vit():
    return vit_digits(rngs=nnx.Rngs(0))


def x_batch(n=6):
    return jax.random.normal(jax.random.PRNGKey(1), (n, 8, 8, 1))


def test_selection_keeps_exactly_the_heads_at_or_above_the_threshold():
    scores = {"a": np.array([1.0, 0.49, 0.5, 0.2]), "b": np.array([0.3, 0.3, 0.3, 0.3])}
    assert heads.select_heads(scores, threshold=0.5) == {"a": [0, 2], "b": [0, 1, 2, 3]}
    assert heads.select_heads(scores, ratio=0.5) == {"a": [0, 2], "b": [2, 3]}  # ties: first ones go
    with pytest.raises(ValueError, match="every head of attention layer 'a'"):
        heads.select_heads({"a": np.zeros(4)}, threshold=0.5)
    with pytest.raises(ValueError, match="every head of attention layer 'b'"):
        heads.select_heads({"b": scores["b"]}, ratio=0.9)


def test_weight_scores_are_the_norms_of_each_heads_qkv_slices(vit):
    attn = vit.blocks[1].attn
    q, k, v = (np.asarray(getattr(attn, n).kernel[...]) for n in ("query", "key", "value"))
    by_hand = [np.sqrt(np.sum(q[:, h] ** 2) + np.sum(k[:, h] ** 2) + np.sum(v[:, h] ** 2)) for h in range(4)]
    np.testing.assert_allclose(heads.weight_scores(vit)["blocks/1/attn"], by_hand, rtol=1e-6)


def test_the_pruned_model_equals_the_masked_model(vit):
    keep = {"blocks/0/attn": [1, 3], "blocks/1/attn": [0, 1, 2]}
    masked, pruned = nnx.clone(vit), nnx.clone(vit)
    heads.mask_heads(masked, {"blocks/0/attn": [0, 2], "blocks/1/attn": [3]})
    heads.prune_heads(pruned, keep)
    x = x_batch()
    assert np.abs(np.asarray(masked(x) - vit(x))).max() > 1e-2  # masking changes the model...
    np.testing.assert_allclose(pruned(x), masked(x), atol=1e-5)  # ...and pruning computes the same
    assert heads.heads_kept(pruned) == {"blocks/0/attn": 2, "blocks/1/attn": 3}
    sizes = {p: v.shape for p, v in flatten(nnx.split(pruned, nnx.Param)[1]).items()}
    assert sizes["blocks/0/attn/query/kernel"] == (32, 2, 8) and sizes["blocks/0/attn/out/kernel"] == (
        2,
        8,
        32,
    )
    assert sizes["blocks/1/attn/value/bias"] == (3, 8)


def test_a_head_already_silent_scores_zero_loss_increase(vit):
    heads.mask_heads(vit, {"blocks/0/attn": [2]})
    x, y = x_batch(32), np.arange(32) % 10

    def loss(model):
        logits = model(x)
        return float(-np.mean(jax.nn.log_softmax(logits)[np.arange(32), y]))

    scores = heads.loss_scores(vit, loss)
    assert scores["blocks/0/attn"][2] == pytest.approx(0.0, abs=1e-6)
    assert np.abs(scores["blocks/1/attn"]).max() > 1e-4


def test_a_saved_pruned_model_reloads_with_its_head_counts(vit, tmp_path):
    heads.prune_heads(vit, {"blocks/0/attn": [0], "blocks/1/attn": [1, 2]})
    graphdef, params = nnx.split(vit, nnx.Param)
    plan = gq.make_plan(params)
    codebooks, snapped = gq.compress(plan, gq.init_mixtures(plan, params), params)
    gq.save_compressed(tmp_path / "m.gqz", codebooks, snapped, model="vit_digits")
    reloaded = gq.load_model(tmp_path / "m.gqz")
    x = x_batch()
    np.testing.assert_array_equal(reloaded(x), nnx.merge(graphdef, snapped)(x))
    assert heads.heads_kept(reloaded) == {"blocks/0/attn": 1, "blocks/1/attn": 2}
