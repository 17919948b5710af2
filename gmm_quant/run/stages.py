"""The stages of one compression run, shared by ``run.train_and_evaluate`` and the search's trials.

``build_plan`` turns a ``Config`` into per-layer rules; ``Stages`` runs pretrain -> retrain ->
compress -> fine-tune through a ``runner(name, setup, epochs, parent) -> TrainState`` (with
checkpoints in a work directory, or in memory for a search trial) and records the validation error
of every stage (and the test error when a test set is given: reported, never used to choose).
"""

from __future__ import annotations

import re
import time
import warnings

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gmm_quant.core import codebook, codebook_tuning, float_codes, grid
from gmm_quant.core.mixture import MixtureConfig
from gmm_quant.core.objective import LearningRates
from gmm_quant.core.rules import DEFAULT_RULES, Rule, flatten, make_plan
from gmm_quant.run import checkpoint as ckpt
from gmm_quant.run import config as cfgm
from gmm_quant.scale.mesh import make_mesh, parse_mesh
from gmm_quant.scale.placement import plan_placement
from gmm_quant.surgery import activations as points
from gmm_quant.surgery import heads
from gmm_quant.surgery.reuse import layers as surgery
from gmm_quant.surgery.reuse.choose import choose
from gmm_quant.surgery.reuse.links import links_from_rules
from gmm_quant.training import loop, pipeline
from gmm_quant.training.distillation import distillation_loss, feature_maps

BIAS = DEFAULT_RULES[0].pattern


def build_plan(cfg: cfgm.Config, params):
    """The plan of ``cfg`` on ``params``: one explicit rule per leaf.

    A leaf is kept float when it is a bias or scale (unless ``quantise_biases``: then biases get a
    mixture each) or matches ``keep_float``; it gets a mixture of its own when it matches
    ``own_mixture``; its prune threshold is the first matching ``layer_prune`` item's, else
    ``prune_threshold``. Patterns of the config that match no leaf are reported (a warning).
    """
    mixture = MixtureConfig(
        num_components=cfg.num_components,
        pi_zero=cfg.pi_zero,
        learn_pi_zero=cfg.learn_pi_zero,
        zero_gamma=tuple(cfg.zero_gamma),
        gamma=tuple(cfg.gamma),
        init_std=cfg.init_std or None,
    )
    thresholds = cfgm.layer_thresholds(cfg)
    used, rules = set(), []
    for path in flatten(params):
        rules.append(Rule(f"^{re.escape(path)}$", **_leaf_settings(cfg, path, thresholds, used)))
    patterns = [*cfg.keep_float, *cfg.own_mixture, *(p for p, _ in thresholds)]
    unused = [p for p in patterns if p not in used]
    if unused:
        warnings.warn(f"config patterns matched no parameter: {unused}", stacklevel=2)
    return make_plan(params, tuple(rules), mixture)


def _leaf_settings(cfg, path, thresholds, used) -> dict:
    def first(patterns):
        hit = next((p for p in patterns if re.search(p, path)), None)
        used.add(hit)
        return hit

    bias = re.search(BIAS, path) is not None
    if (bias and not (cfg.quantise_biases and path.endswith("bias"))) or first(cfg.keep_float):
        first(cfg.own_mixture), first(p for p, _ in thresholds)  # matched, though float
        return {"keep_float": True}
    hit = first(p for p, _ in thresholds)
    threshold = dict(thresholds)[hit] if hit is not None else cfg.prune_threshold
    per_layer = bias or first(cfg.own_mixture) is not None
    return {"per_layer": per_layer, "prune_threshold": threshold, "merge_kl": cfg.merge_kl or None}


def _tight(plan, epochs: int, tightness: float):
    """``stop(epoch, state)``: after ``epochs`` epochs, once every quantised layer's
    ``codebook.tightness`` (RMS distance to the nearest centre / std) is at most ``tightness``."""

    def stop(epoch, state) -> bool:
        if epoch + 1 < epochs:
            return False
        trainable = state.trainable
        return max(codebook.tightness(plan, trainable["mixtures"], trainable["params"]).values()) <= tightness

    return stop


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


class Stages:
    """The training stages of one run, recording errors and wall times as they go.

    ``val`` (x, y) is what selection looks at; ``test`` (x, y) or None is only reported. ``graphdef``
    (of the NNX model ``apply_fn`` runs) is needed only for feature-map distillation.
    """

    def __init__(self, cfg, apply_fn, train, val, runner, test=None, graphdef=None):
        self.cfg, self.apply_fn, self.runner, self.graphdef = cfg, apply_fn, runner, graphdef
        self.train, self.val, self.test = train, val, test
        self.errors, self.val_errors, self.times = {}, {}, {}
        self.perplexities, self.val_perplexities = {}, {}  # language models (sequence labels) only
        self.removed, self.heads, self.activations = 0, {}, None
        self.placement = None  # where training runs (``place``); None: one device
        self.links, self.reuse_table = [], None  # layers reusing others (``reuse_layers``)
        self.retrain_epochs_run = 0  # retraining epochs run (more than asked with ``retrain_tightness``)
        self.teacher, self.teacher_graphdef = None, None  # set by reuse_layers, else by retrain
        self.float_codes = {}  # {path: FloatCode} of the float leaves when ``float_bits`` (``compress``)

    def place(self, params):
        """Lay training out on the config's ``mesh`` (``shard_params`` split over its model axis)."""
        mesh = make_mesh(parse_mesh(self.cfg.mesh))
        self.placement = None if mesh is None else plan_placement(params, mesh, self.cfg.shard_params)

    def _errors(self, name, params):
        if self.test is not None:
            self._score(name, params, self.test, self.errors, self.perplexities)
        if len(self.val[1]):
            self._score(name, params, self.val, self.val_errors, self.val_perplexities)

    def _score(self, name, params, data, errors, perplexities):
        """Error of ``params`` on ``data`` into ``errors``; for sequence labels (a language model) also
        the perplexity, from the same pass."""
        if np.ndim(data[1]) == 2:
            errors[name], perplexities[name] = loop.error_and_perplexity(self.apply_fn, params, *data)
        else:
            errors[name] = loop.error_rate(self.apply_fn, params, *data)

    def _record(self, name, params, timer, start):
        self._errors(name, params)
        self.times[timer] = time.perf_counter() - start

    def pretrain(self, params):
        start, cfg = time.perf_counter(), self.cfg
        if cfg.pretrain_epochs:
            steps = cfg.pretrain_epochs * max(self.train[0].shape[0] // cfg.batch_size, 1)
            setup = pipeline.pretrain_setup(
                self.apply_fn, params, learning_rate=cfg.pretrain_lr, seed=cfg.seed,
                total_steps=steps if cfg.pretrain_cosine else 0, max_shift=cfg.pretrain_shift,
            )  # fmt: skip
            params = self.runner("pretrain", setup, cfg.pretrain_epochs, None).trainable
        self._record("pretrained", params, "pretrain", start)
        return params

    def prune_heads(self, graphdef, params):
        """Remove attention heads by ``head_threshold`` / ``head_ratio`` (scores from the weights or the
        validation loss); returns ``(graphdef, params)`` of the smaller model and rebinds ``apply_fn``."""
        cfg = self.cfg
        if not (cfg.head_threshold or cfg.head_ratio):
            return graphdef, params
        model = nnx.merge(graphdef, params)
        if cfg.head_score == "weights":
            scores = heads.weight_scores(model)
        else:
            x, y = self.val if len(self.val[1]) else self.train  # never the test set
            scores = heads.loss_scores(model, lambda m: _mean_cross_entropy(m, x, y))
        keep = heads.select_heads(scores, threshold=cfg.head_threshold or None, ratio=cfg.head_ratio or None)
        before = _count(params)
        heads.prune_heads(model, keep)
        graphdef, params = nnx.split(model, nnx.Param)
        self.removed = before - _count(params)
        self.heads = {p: {"kept": keep[p], "of": len(s)} for p, s in scores.items()}
        self.apply_fn, self.graphdef = (lambda p, x: nnx.merge(graphdef, p)(x)), graphdef
        self._errors("heads_pruned", params)
        return graphdef, params

    def reuse_layers(self, graphdef, params):
        """Link layers to earlier ones (``reuse`` rules, or greedily within ``reuse_budget``) with fitted
        transforms; returns ``(graphdef, params)`` of the reusing model and rebinds ``apply_fn``. The
        model before reuse stays the distillation teacher."""
        cfg = self.cfg
        if not (cfg.reuse or cfg.reuse_budget):
            return graphdef, params
        model = nnx.merge(graphdef, params)
        if cfg.reuse:
            self.links, unused = links_from_rules(cfg.reuse, surgery.modules(model), cfg.reuse_rank)
            if unused:
                warnings.warn(f"reuse rules matched no layer: {unused}", stacklevel=2)
        else:
            x, y = self.val if len(self.val[1]) else self.train  # never the test set
            self.links, self.reuse_table = choose(
                model, lambda m: _error(m, x, y), cfg.reuse_budget / 100, rank=cfg.reuse_rank
            )
        self.teacher, self.teacher_graphdef = params, graphdef
        surgery.attach(model, self.links)
        before = _count(params)
        graphdef, params = nnx.split(model, nnx.Param)
        self.removed += before - _count(params)  # the Han count's original is the model before reuse
        self.apply_fn, self.graphdef = (lambda p, x: nnx.merge(graphdef, p)(x)), graphdef
        self._errors("reused", params)
        return graphdef, params

    def _task_loss(self):
        """Distillation from the pretrained model when ``distill_alpha`` > 0 or ``distill_features``
        names feature maps, else cross-entropy."""
        cfg = self.cfg
        if not (cfg.distill_alpha or cfg.distill_features):
            return None
        features = teacher_model = None
        if cfg.distill_features:
            if self.graphdef is None:
                raise cfgm.ConfigError("config field 'distill_features' needs an NNX model (its graphdef)")
            features = feature_maps(self.graphdef, cfg.distill_features)
        if self.teacher_graphdef is not None:  # the model before its layers reused others
            graphdef = self.teacher_graphdef
            maps = feature_maps(graphdef, cfg.distill_features) if cfg.distill_features else None
            teacher_model = (lambda p, x: nnx.merge(graphdef, p)(x)), maps
        return distillation_loss(
            self.apply_fn, self.teacher, alpha=cfg.distill_alpha, temperature=cfg.distill_temperature,
            features=features, beta=cfg.distill_beta, teacher_model=teacher_model,
        )  # fmt: skip

    def retrain(self, plan, params):
        start, cfg, n = time.perf_counter(), self.cfg, self.train[0].shape[0]
        if self.teacher is None:
            self.teacher = params
        rates = LearningRates(cfg.lr_weights, cfg.lr_means, cfg.lr_log_precisions, cfg.lr_mixing)
        setup = pipeline.retrain_setup(
            self.apply_fn, params, plan, num_train=n, steps_per_epoch=max(n // cfg.batch_size, 1),
            tau=cfg.tau, warmup_epochs=cfg.warmup_epochs, rates=rates, task_loss=self._task_loss(),
            placement=self.placement, mixture_every=cfg.mixture_every,
        )  # fmt: skip
        if cfg.retrain_tightness:  # go on (up to 4x the epochs) until the weights sit on their centres
            stop = _tight(plan, cfg.retrain_epochs, cfg.retrain_tightness)
            state = self.runner("retrain", setup, 4 * cfg.retrain_epochs, None, stop)
        else:
            state = self.runner("retrain", setup, cfg.retrain_epochs, None)
        self.retrain_epochs_run = int(state.step) // max(n // cfg.batch_size, 1)
        trained = state.trainable
        self._record("retrained", trained["params"], "retrain", start)
        return trained["mixtures"], trained["params"]

    def compress(self, plan, mixtures, retrained):
        """(codebooks, snapped params) of the retrained model, on the grid when ``grid_bits``."""
        codebooks, snapped = codebook.compress(plan, mixtures, retrained, assignment=self.cfg.assignment)
        if self.cfg.weight_bits:
            codebooks = {p: grid.to_grid(cb, self.cfg.weight_bits) for p, cb in codebooks.items()}
            snapped = codebook.dequantize(codebooks, retrained)
        if self.cfg.float_bits:  # the leaves outside the prior on grids of their own
            self.float_codes, snapped = float_codes.code_float_leaves(codebooks, snapped, self.cfg.float_bits)
        self._errors("compressed", snapped)
        return codebooks, snapped

    def finetune(self, codebooks, snapped, epochs, start=None):
        """Fine-tune the centres for ``epochs`` epochs from ``snapped``; kept only if better on val."""
        start, cfg, final = start or time.perf_counter(), self.cfg, snapped
        if epochs:
            loss, opt, trainable, build = pipeline.finetune_setup(
                self.apply_fn, codebooks, snapped, learning_rate=cfg.finetune_lr,
                grid=bool(cfg.weight_bits), task_loss=self._task_loss(),
                float_grids=float_codes.grids(self.float_codes),
            )  # fmt: skip
            if self.placement is not None:  # the teacher and the indices on the mesh, for every use
                loss = self.placement.place(loss)
            parent = ckpt.Identity((trainable, snapped))  # the indices live in snapped, not trainable
            tuned = self.runner("finetune", (loss, opt, trainable), epochs, parent).trainable
            selection = self.val if len(self.val[1]) else self.train  # never the test set
            tuned, improved = pipeline.keep_better(loss, trainable, tuned, selection)
            if improved:
                codebooks = codebook_tuning.updated_codebooks(codebooks, tuned, grid=bool(cfg.weight_bits))
                final = codebook.dequantize(codebooks, build(tuned))
        if self.float_codes:  # back on their grids: fine-tuning moved them
            self.float_codes, final = float_codes.recode(self.float_codes, final)
        self._record("finetuned", final, "compress_finetune", start)
        return codebooks, final

    def quantise_activations(self, graphdef, params):
        """Attach calibrated input quantisation to the ``activation_layers`` (modes with 8-bit
        activations); returns the graphdef of the quantising model and rebinds ``apply_fn``."""
        cfg = self.cfg
        if not cfg.activation_mode or cfgm.ACTIVATION_MODES[cfg.activation_mode][1] is None:
            return graphdef
        model = nnx.merge(graphdef, params)
        x = self.train[0][: cfg.calibration_examples]  # training data: calibration is a selection too
        batches = [x[i : i + cfg.batch_size] for i in range(0, len(x), cfg.batch_size)]
        self.activations = points.calibrate(model, cfg.activation_layers, batches, 8)
        points.attach(model, self.activations)
        graphdef = nnx.split(model, nnx.Param)[0]
        self.apply_fn, self.graphdef = (lambda p, x: nnx.merge(graphdef, p)(x)), graphdef
        self._errors("activations_quantised", params)
        return graphdef

    def compress_and_finetune(self, plan, mixtures, retrained):
        start = time.perf_counter()
        codebooks, snapped = self.compress(plan, mixtures, retrained)
        return self.finetune(codebooks, snapped, self.cfg.finetune_epochs, start)
