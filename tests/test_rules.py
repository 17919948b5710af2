import pytest
from flax import nnx

import gmm_quant as gq
import models


def _params():
    return nnx.split(models.create("lenet5_caffe"), nnx.Param)[1]


def test_default_rules_exclude_biases_and_share_one_mixture():
    plan = gq.make_plan(_params())
    assert plan.quantised() == ["conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel"]
    assert list(plan.mixtures) == ["shared"]


def test_first_match_wins_and_per_layer_overrides_apply():
    own = gq.MixtureConfig(num_components=5)
    rules = (
        gq.Rule(r"bias$", keep_float=True),
        gq.Rule(r"^fc2/", keep_float=True),
        gq.Rule(r"^conv", mixture=own, prune_threshold=3),
        gq.Rule(r"kernel", prune_threshold=0.01),
    )
    plan = gq.make_plan(_params(), rules=rules)
    assert plan.quantised() == ["conv1/kernel", "conv2/kernel", "fc1/kernel"]
    assert plan.group_of("conv1/kernel") == r"^conv" and plan.mixtures[r"^conv"] is own
    assert plan.rules["conv2/kernel"].threshold_count(25000) == 3
    assert plan.rules["fc1/kernel"].threshold_count(400000) == pytest.approx(4000)
    mixtures = gq.init_mixtures(plan, _params())
    assert mixtures[r"^conv"].means.shape == (4,) and mixtures["shared"].means.shape == (16,)


def test_unused_rules_are_reported():
    with pytest.warns(UserWarning, match="typo"):
        plan = gq.make_plan(_params(), rules=(gq.Rule("typo"), *gq.DEFAULT_RULES))
    assert plan.unused == ("typo",)


def test_bad_rules_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="regex"):
        gq.Rule("(")
    with pytest.raises(ValueError, match="no rule matches"):
        gq.make_plan(_params(), rules=(gq.Rule("kernel"),))
    with pytest.raises(ValueError, match="no parameter under the prior"):
        gq.make_plan(_params(), rules=(gq.Rule(".*", keep_float=True),))


def test_per_layer_rule_gives_each_matching_layer_a_mixture_over_its_own_range():
    params = _params()
    rules = (gq.Rule(r"bias$", keep_float=True), gq.Rule(r"^conv", per_layer=True), gq.Rule(".*"))
    plan = gq.make_plan(params, rules=rules)
    assert [plan.group_of(p) for p in plan.quantised()] == [
        "conv1/kernel",
        "conv2/kernel",
        "shared",
        "shared",
    ]
    mixtures = gq.init_mixtures(plan, params)
    flat = gq.core.rules.flatten(params)
    for path in ("conv1/kernel", "conv2/kernel"):  # free means span exactly that layer's weights
        means = mixtures[path].means
        assert float(means.min()) == pytest.approx(float(flat[path].min()), rel=1e-6)
        assert float(means.max()) == pytest.approx(float(flat[path].max()), rel=1e-6)
