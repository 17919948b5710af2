"""A ``Config``'s per-layer settings as a ``Plan``: one explicit rule per leaf of the model."""

from __future__ import annotations

import re
import warnings

from gmm_quant.core.mixture import MixtureConfig
from gmm_quant.core.rules import DEFAULT_RULES, Rule, flatten, make_plan
from gmm_quant.run import config as cfgm

BIAS = DEFAULT_RULES[0].pattern


def build_plan(cfg: cfgm.Config, params):
    """The plan of ``cfg`` on ``params``: one explicit rule per leaf.

    A leaf is kept float when it is a bias or scale (unless ``quantise_biases``: then biases get a
    mixture each) or matches ``keep_float``; it gets a mixture of its own when it matches
    ``own_mixture``; a codebook per slice when it matches ``per_slice``; its prune threshold is the
    first matching ``layer_prune`` item's, else ``prune_threshold``; its unit prior's strength the first
    matching ``unit_prior`` item's. Patterns of the config that match no leaf are reported (a warning).
    """
    mixture = MixtureConfig(
        num_components=cfg.num_components,
        pi_zero=cfg.pi_zero,
        learn_pi_zero=cfg.learn_pi_zero,
        zero_gamma=tuple(cfg.zero_gamma),
        gamma=tuple(cfg.gamma),
        init_std=cfg.init_std or None,
    )
    layered = cfgm.layer_thresholds(cfg), cfgm.unit_strengths(cfg)
    used, rules = set(), []
    for path in flatten(params):
        rules.append(Rule(f"^{re.escape(path)}$", **_leaf_settings(cfg, path, layered, used)))
    patterns = [*cfg.keep_float, *cfg.own_mixture, *cfg.per_slice, *(p for v in layered for p, _ in v)]
    unused = [p for p in patterns if p not in used]
    if unused:
        warnings.warn(f"config patterns matched no parameter: {unused}", stacklevel=2)
    return make_plan(params, tuple(rules), mixture)


def _leaf_settings(cfg, path, layered, used) -> dict:
    def first(patterns):
        hit = next((p for p in patterns if re.search(p, path)), None)
        used.add(hit)
        return hit

    thresholds, strengths = layered
    bias = re.search(BIAS, path) is not None
    if (bias and not (cfg.quantise_biases and path.endswith("bias"))) or first(cfg.keep_float):
        first(cfg.own_mixture), first(cfg.per_slice)  # matched, though float
        first(p for p, _ in thresholds), first(p for p, _ in strengths)
        return {"keep_float": True}
    hit = first(p for p, _ in thresholds)
    threshold = dict(thresholds)[hit] if hit is not None else cfg.prune_threshold
    unit = first(p for p, _ in strengths)
    strength = dict(strengths)[unit] if unit is not None else 0.0
    per_layer = bias or first(cfg.own_mixture) is not None
    per_slice = first(cfg.per_slice) is not None
    return {"per_layer": per_layer, "per_slice": per_slice, "prune_threshold": threshold,
            "merge_kl": cfg.merge_kl or None, "unit_prior": strength}  # fmt: skip
