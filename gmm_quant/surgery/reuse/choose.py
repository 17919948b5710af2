"""Greedy choice of reuse links within a validation-error budget.

Every pair (target, source before it) of same-typed, same-shaped supported layers whose kernel path
matches ``pattern`` is tried alone with its fitted transform (``layers.fit``); pairs are then taken
cheapest first, each kept if the model with it and every link kept so far stays within ``budget``
(points of validation error above the unchanged model). A layer is a target once at most and a
source is never a target. The errors are before any retraining: retraining with the prior (and
distillation) then adapts the shared weights and the transforms.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
from flax import nnx

from gmm_quant.surgery.reuse.layers import attach, low_rank_ok, modules, supported
from gmm_quant.surgery.reuse.links import Link


def pairs(model, pattern: str = ".", rank: int = 0) -> list[Link]:
    """Every pair of same-typed, same-shaped supported layers whose kernel path matches, the later
    layer reusing the earlier."""
    found = {
        p: m
        for p, m in modules(model).items()
        if supported(m) and re.search(pattern, f"{p}/kernel") and (not rank or low_rank_ok(m))
    }
    out = []
    for source, target in itertools.combinations(found, 2):  # graph order: the source comes first
        a, b = found[target], found[source]
        if type(a) is type(b) and np.shape(a.kernel[...]) == np.shape(b.kernel[...]):
            out.append(Link(target, source, rank))
    return out


def error_with(model, links, error_fn) -> float:
    """``error_fn`` of a copy of ``model`` with ``links`` attached (fitted); ``model`` is unchanged."""
    trial = nnx.clone(model)
    attach(trial, links)
    return float(error_fn(trial))


def choose(model, error_fn, budget: float, *, pattern: str = ".", rank: int = 0) -> tuple[list, dict]:
    """(links kept, table): ``table`` has the unchanged error, each pair's error alone and the
    combined error after each kept link. ``budget`` is a fraction (0.003 = 0.3 points)."""
    base = float(error_fn(model))
    rows = [{"link": p, "error": error_with(model, [p], error_fn)} for p in pairs(model, pattern, rank)]
    rows.sort(key=lambda r: r["error"])
    kept, targets, sources = [], set(), set()
    for row in rows:
        link = row["link"]
        if link.target in targets | sources or link.source in targets or row["error"] > base + budget:
            continue
        combined = error_with(model, [*kept, link], error_fn)
        row["combined"] = combined
        if combined <= base + budget:
            kept.append(link)
            targets.add(link.target)
            sources.add(link.source)
    table = {
        "baseline": base,
        "budget": budget,
        "pairs": [{"target": r["link"].target, "source": r["link"].source, "error": r["error"],
                   **({"combined": r["combined"]} if "combined" in r else {}),
                   "kept": r["link"] in kept} for r in rows],
    }  # fmt: skip
    return kept, table
