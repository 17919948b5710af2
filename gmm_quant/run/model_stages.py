"""The stages that change the model's structure, between pretraining and retraining (attention heads
removed, layers reusing others) and before fine-tuning (activation quantisation). Each takes the
``stages.Model`` as it stands and returns the next one with its ``apply_fn`` and ``graphdef`` rebound;
a stage the config does not ask for returns the model unchanged.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gmm_quant.core.rules import flatten
from gmm_quant.run import config as cfgm
from gmm_quant.run.stages import Context, Model, Record, selection_data
from gmm_quant.surgery import activations as points
from gmm_quant.surgery import heads as heads_lib
from gmm_quant.surgery.reuse import layers as surgery
from gmm_quant.surgery.reuse.choose import choose
from gmm_quant.surgery.reuse.links import links_from_rules
from gmm_quant.training import loop


def _count(params) -> int:
    return sum(int(np.size(v)) for v in flatten(params).values())


def _error(model, x, y) -> float:
    graphdef, params = nnx.split(model, nnx.Param)
    return loop.error_rate(lambda p, v: nnx.merge(graphdef, p)(v), params, x, y)


def _mean_cross_entropy(model, x, y, batch_size=1000) -> float:
    total = 0.0
    for i in range(0, len(y), batch_size):
        logits = model(jnp.asarray(x[i : i + batch_size]))
        total += float(
            optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y[i : i + batch_size])).sum()
        )
    return total / len(y)


def _rebound(model: Model, graphdef, params, **changes) -> Model:
    return model._replace(
        apply_fn=lambda p, x: nnx.merge(graphdef, p)(x), graphdef=graphdef, params=params, **changes
    )


def prune_heads(ctx: Context, model: Model, record: Record) -> tuple[Model, Record]:
    """Attention heads removed by ``head_threshold`` / ``head_ratio`` (scores from the weights or the
    validation loss): the smaller model."""
    cfg = ctx.cfg
    if not (cfg.head_threshold or cfg.head_ratio):
        return model, record
    module = nnx.merge(model.graphdef, model.params)
    if cfg.head_score == "weights":
        scores = heads_lib.weight_scores(module)
    else:
        x, y = selection_data(ctx)  # never the test set
        scores = heads_lib.loss_scores(module, lambda m: _mean_cross_entropy(m, x, y))
    keep = heads_lib.select_heads(scores, threshold=cfg.head_threshold or None, ratio=cfg.head_ratio or None)
    before = _count(model.params)
    heads_lib.prune_heads(module, keep)
    graphdef, params = nnx.split(module, nnx.Param)
    heads = {p: {"kept": keep[p], "of": len(s)} for p, s in scores.items()}
    model = _rebound(model, graphdef, params, removed=before - _count(params), heads=heads)
    return model, record.scored(ctx, "heads_pruned", model)


def reuse_layers(ctx: Context, model: Model, record: Record) -> tuple[Model, Record]:
    """Layers linked to earlier ones (``reuse`` rules, or greedily within ``reuse_budget``) with fitted
    transforms: the reusing model, whose teacher stays the model before reuse."""
    cfg = ctx.cfg
    if not (cfg.reuse or cfg.reuse_budget):
        return model, record
    module, table = nnx.merge(model.graphdef, model.params), None
    if cfg.reuse:
        links, unused = links_from_rules(cfg.reuse, surgery.modules(module), cfg.reuse_rank)
        if unused:
            warnings.warn(f"reuse rules matched no layer: {unused}", stacklevel=2)
    else:
        x, y = selection_data(ctx)  # never the test set
        links, table = choose(module, lambda m: _error(m, x, y), cfg.reuse_budget / 100, rank=cfg.reuse_rank)
    surgery.attach(module, links)
    before = _count(model.params)
    graphdef, params = nnx.split(module, nnx.Param)
    model = _rebound(
        model, graphdef, params, teacher=model.params, teacher_graphdef=model.graphdef, links=tuple(links),
        reuse_table=table, removed=model.removed + before - _count(params),
    )  # fmt: skip
    return model, record.scored(ctx, "reused", model)


def quantise_activations(ctx: Context, model: Model, record: Record) -> tuple[Model, Record]:
    """Calibrated input quantisation attached to the ``activation_layers`` (modes with 8-bit
    activations): the quantising model."""
    cfg = ctx.cfg
    if not cfg.activation_mode or cfgm.ACTIVATION_MODES[cfg.activation_mode][1] is None:
        return model, record
    module = nnx.merge(model.graphdef, model.params)
    x = ctx.train[0][: cfg.calibration_examples]  # training data: calibration is a selection too
    batches = [x[i : i + cfg.batch_size] for i in range(0, len(x), cfg.batch_size)]
    scales = points.calibrate(module, cfg.activation_layers, batches, 8)
    points.attach(module, scales)
    graphdef = nnx.split(module, nnx.Param)[0]
    model = _rebound(model, graphdef, model.params, activations=scales)
    return model, record.scored(ctx, "activations_quantised", model)
