"""Checks of a config against its model before any training: each refuses with a ``ConfigError``
naming the field, so a bad setting costs seconds, never a run.

``check_model(cfg, graphdef, params)`` runs them all: head pruning needs attention layers and must
leave a head in each; activation quantisation needs the layers it names; feature distillation needs
the modules it names; reuse rules must link layers that can share; the mesh must fit the devices
and the batch.
"""

from __future__ import annotations

import re

from flax import nnx

from gmm_quant.run import config as cfgm
from gmm_quant.scale.mesh import batch_problem, make_mesh, parse_mesh
from gmm_quant.scale.placement import plan_placement
from gmm_quant.surgery import activations as points
from gmm_quant.surgery import heads
from gmm_quant.surgery.reuse import layers as surgery
from gmm_quant.surgery.reuse.links import links_from_rules


def check_model(cfg: cfgm.Config, graphdef, params) -> None:
    model = nnx.merge(graphdef, params)
    check_heads(cfg, model)
    check_activations(cfg, model)
    check_distillation(cfg, model)
    check_reuse(cfg, model)
    check_mesh(cfg, params)


def check_heads(cfg: cfgm.Config, model) -> None:
    """Before any training: head pruning needs attention layers, and a ratio must leave a head in each."""
    if not (cfg.head_threshold or cfg.head_ratio):
        return
    counts = heads.heads_kept(model)
    field = "head_threshold" if cfg.head_threshold else "head_ratio"
    if not counts:
        raise cfgm.ConfigError(
            f"invalid config field {field!r}: the model has no nnx.MultiHeadAttention layer"
        )
    for path, n in counts.items():
        if cfg.head_ratio and round(cfg.head_ratio * n) >= n:
            raise cfgm.ConfigError(
                f"invalid config field 'head_ratio' = {cfg.head_ratio}: it would remove every one of the "
                f"{n} heads of attention layer {path!r}"
            )


def check_activations(cfg: cfgm.Config, model) -> None:
    """Before any training: the layers whose inputs a mode quantises must exist."""
    quantised = cfg.activation_mode and cfgm.ACTIVATION_MODES[cfg.activation_mode][1]
    if quantised and not points.points(model, cfg.activation_layers):
        raise cfgm.ConfigError(
            f"invalid config field 'activation_layers' = {cfg.activation_layers!r}: "
            "matches no Linear / LinearGeneral layer of the model"
        )


def check_mesh(cfg: cfgm.Config, params) -> None:
    """Before any training: the mesh fits the devices, its data axis divides the batch, and every
    ``shard_params`` match has a dimension the model axis divides (``validate`` parsed the mesh)."""
    axes = parse_mesh(cfg.mesh)
    if cfg.shard_params and "model" not in axes:
        raise cfgm.ConfigError(
            f"invalid config field 'shard_params' = {list(cfg.shard_params)}: needs a mesh with a model axis "
            "(--mesh model=N or data=D,model=N)"
        )
    try:
        mesh = make_mesh(axes)
        if mesh is not None:
            plan_placement(params, mesh, cfg.shard_params)
    except ValueError as err:
        raise cfgm.ConfigError(f"invalid config field 'mesh' = {cfg.mesh!r}: {err}") from None
    problem = batch_problem(axes, cfg.batch_size)
    if problem:
        raise cfgm.ConfigError(f"invalid config field 'batch_size' = {cfg.batch_size}: {problem}")


def check_distillation(cfg: cfgm.Config, model) -> None:
    """Before any training: ``distill_features`` must name at least one module of the model."""
    if not cfg.distill_features:
        return
    modules = (path for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module))
    names = sorted("/".join(str(k) for k in path) for path in modules)
    if not any(re.search(cfg.distill_features, n) for n in names if n):
        raise cfgm.ConfigError(
            f"invalid config field 'distill_features' = {cfg.distill_features!r}: matches no module path "
            f"of the model (its modules: {', '.join(n for n in names if n)})"
        )


def check_reuse(cfg: cfgm.Config, model) -> None:
    """Before any training: ``reuse`` rules must link at least one layer, each link to a same-typed,
    same-shaped supported layer before it (attached to a copy of the model to prove it)."""
    if not cfg.reuse:
        return
    links, _ = links_from_rules(cfg.reuse, surgery.modules(model), cfg.reuse_rank)
    if not links:
        rules = list(cfg.reuse)
        raise cfgm.ConfigError(f"invalid config field 'reuse' = {rules}: matches no layer of the model")
    try:
        surgery.attach(nnx.clone(model), links, fitted=False)
    except ValueError as err:
        raise cfgm.ConfigError(f"invalid config field 'reuse': {err}") from None
