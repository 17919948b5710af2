"""The stages of one compression run, shared by ``job.train_and_evaluate``, the search's trials and
the budget search's pretraining: functions that take the model as it stands and return the next one.

    ctx = Context(cfg, train, val, runner, test)          # what every stage reads, none changes
    model, record = pretrain(ctx, Model(apply_fn, params, graphdef), Record())
    mixtures, model, record = retrain(ctx, plan, model, record)
    codebooks, model, record = compress(ctx, plan, mixtures, model, record)
    codebooks, model, record = finetune(ctx, codebooks, model, record, cfg.finetune_epochs)

``finetune`` ends by disconnecting dead units (``surgery.dead_units``: the weights that read a unit
whose weights are all zero are zeroed, outputs unchanged).

The training itself is ``training.pipeline``'s (its setups, stop rule and keep-the-better rule):
the command line, the search and the Python API train the same way. ``runner(name, setup, epochs,
parent, stop=None, placement=None, model_state=None) -> TrainState`` runs a stage's epochs: with
verified checkpoints in a work directory (``job.run_stage``) or in memory
(``search.trial.memory_runner``). A model with state (``training.modes.Stateful``) trains in train
mode and each stage returns it with its new state. The structural stages (heads, reuse, activation
quantisation) are in ``model_stages``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from flax import nnx

from gmm_quant._util.hosts import multi_process, to_local
from gmm_quant.core import codebook, float_codes, grid
from gmm_quant.core.objective import LearningRates
from gmm_quant.run import checkpoint as ckpt
from gmm_quant.run import config as cfgm
from gmm_quant.scale.mesh import make_mesh, parse_mesh
from gmm_quant.scale.placement import plan_placement
from gmm_quant.surgery import dead_units
from gmm_quant.training import finetuning, loop, modes, pipeline, tasks
from gmm_quant.training.distillation import distillation_loss, feature_maps

DISCONNECT_SAMPLE = 16  # examples the dead-unit check evaluates the model on


class Context(NamedTuple):
    """What every stage of one run reads and none changes. ``val`` (x, y) is what selection looks at
    (heads, reuse, keeping the better codebooks; never the test set); ``test`` or None is only
    reported."""

    cfg: cfgm.Config
    train: tuple
    val: tuple
    runner: Callable
    test: tuple | None = None


class Model(NamedTuple):
    """The model as a stage leaves it.

    Invariants: ``apply_fn(params, x)`` runs the model that ``graphdef`` (None for a model given only
    as a function) describes; ``teacher`` (params, the model before retraining) and
    ``teacher_graphdef`` (set only when the student's structure differs from the teacher's: reuse)
    feed distillation; ``removed`` counts the weights the structural stages took out (the Han count's
    original is the model before them); ``float_codes`` ({path: FloatCode}) are the grids of the
    leaves outside the prior once ``compress`` coded them; ``disconnected`` ({kernel: weights}) the
    weights ``finetune`` zeroed because they read dead units.
    """

    apply_fn: Callable
    params: Any
    graphdef: Any = None
    placement: Any = None
    teacher: Any = None
    teacher_graphdef: Any = None
    removed: int = 0
    heads: dict | None = None  # {layer: {"kept", "of"}} after head removal
    links: tuple = ()  # reuse links attached
    reuse_table: Any = None  # the greedy choice's table (``reuse_budget``)
    activations: dict | None = None  # calibrated activation scales
    float_codes: dict | None = None
    disconnected: dict | None = None


class Record(NamedTuple):
    """What the stages measured, by stage name: test and validation errors (and perplexities for
    sequence labels), wall times, retraining epochs run. Each stage returns a new record."""

    errors: dict = {}  # noqa: RUF012  (never mutated: ``scored`` and ``timed`` copy)
    val_errors: dict = {}  # noqa: RUF012
    perplexities: dict = {}  # noqa: RUF012
    val_perplexities: dict = {}  # noqa: RUF012
    times: dict = {}  # noqa: RUF012
    retrain_epochs: int = 0

    def scored(self, ctx: Context, name: str, model: Model, params=None) -> Record:
        """With the errors of ``params`` (default ``model.params``) recorded as stage ``name``."""
        params = model.params if params is None else params
        new = {
            f: dict(getattr(self, f)) for f in ("errors", "val_errors", "perplexities", "val_perplexities")
        }
        task = ctx.cfg.task
        if ctx.test is not None:
            _score(task, model.apply_fn, params, ctx.test, new["errors"], new["perplexities"], name)
        if len(ctx.val[1]):
            _score(task, model.apply_fn, params, ctx.val, new["val_errors"], new["val_perplexities"], name)
        return self._replace(**new)

    def timed(self, timer: str, start: float) -> Record:
        return self._replace(times={**self.times, timer: time.perf_counter() - start})


def _score(task, apply_fn, params, data, errors, perplexities, name):
    """The task's metric of ``params`` on ``data`` (error rate; RMSE for "regress"); for sequence
    labels (a language model) also the perplexity, from the same pass."""
    if task == "regress":
        errors[name] = loop.rmse(apply_fn, params, *data)
    elif np.ndim(data[1]) == 2:
        errors[name], perplexities[name] = loop.error_and_perplexity(apply_fn, params, *data)
    else:
        errors[name] = loop.error_rate(apply_fn, params, *data)


def selection_data(ctx: Context) -> tuple:
    """The data selections look at: the validation split, or the training data without one."""
    return ctx.val if len(ctx.val[1]) else ctx.train


def place(ctx: Context, model: Model) -> Model:
    """Training laid out on the config's ``mesh`` (``shard_params`` split over its model axis)."""
    mesh = make_mesh(parse_mesh(ctx.cfg.mesh))
    placement = None if mesh is None else plan_placement(model.params, mesh, ctx.cfg.shard_params)
    return model._replace(placement=placement)


def pretrain(ctx: Context, model: Model, record: Record) -> tuple[Model, Record]:
    start, cfg, params = time.perf_counter(), ctx.cfg, model.params
    if cfg.pretrain_epochs:
        steps = cfg.pretrain_epochs * max(ctx.train[0].shape[0] // cfg.batch_size, 1)
        setup = pipeline.pretrain_setup(
            model.apply_fn, params, learning_rate=cfg.pretrain_lr, seed=cfg.seed,
            total_steps=steps if cfg.pretrain_cosine else 0, max_shift=cfg.pretrain_shift,
            task_loss=task_loss(ctx, model, teacher=False),
        )  # fmt: skip
        state = ctx.runner("pretrain", setup, cfg.pretrain_epochs, None, placement=model.placement,
                           model_state=modes.state_of(model.apply_fn))  # fmt: skip
        model = model._replace(
            params=state.trainable, apply_fn=modes.with_state(model.apply_fn, state.model_state)
        )
    return model, record.scored(ctx, "pretrained", model).timed("pretrain", start)


def task_loss(ctx: Context, model: Model, teacher: bool = True):
    """Distillation from the pretrained model when ``distill_alpha`` > 0 or ``distill_features``
    names feature maps (and ``teacher``: not while pretraining it), else the task's loss (None:
    cross-entropy)."""
    cfg = ctx.cfg
    if not teacher or not (cfg.distill_alpha or cfg.distill_features):
        return tasks.mean_squared_error(model.apply_fn) if cfg.task == "regress" else None
    features = teacher_model = None
    if cfg.distill_features:
        if model.graphdef is None:
            raise cfgm.ConfigError("config field 'distill_features' needs an NNX model (its graphdef)")
        features = feature_maps(model.graphdef, cfg.distill_features)
    if model.teacher_graphdef is not None:  # the model before its layers reused others
        graphdef = model.teacher_graphdef
        maps = feature_maps(graphdef, cfg.distill_features) if cfg.distill_features else None
        teacher_model = (lambda p, x: nnx.merge(graphdef, p)(x)), maps
    return distillation_loss(
        model.apply_fn, model.teacher, alpha=cfg.distill_alpha, temperature=cfg.distill_temperature,
        features=features, beta=cfg.distill_beta, teacher_model=teacher_model,
    )  # fmt: skip


def retrain(ctx: Context, plan, model: Model, record: Record):
    """``(mixtures, model, record)``: weights and mixture trained jointly from ``model.params``, which
    become the distillation teacher unless the model already has one."""
    start, cfg, n = time.perf_counter(), ctx.cfg, ctx.train[0].shape[0]
    if model.teacher is None:
        model = model._replace(teacher=model.params)
    rates = LearningRates(cfg.lr_weights, cfg.lr_means, cfg.lr_log_precisions, cfg.lr_mixing)
    setup = pipeline.retrain_setup(
        model.apply_fn, model.params, plan, num_train=n, steps_per_epoch=max(n // cfg.batch_size, 1),
        tau=cfg.tau, warmup_epochs=cfg.warmup_epochs, rates=rates, task_loss=task_loss(ctx, model),
        placement=model.placement, mixture_every=cfg.mixture_every,
        snap_from=pipeline.snap_from(cfg.retrain_epochs, cfg.snap_epochs, max(n // cfg.batch_size, 1)),
    )  # fmt: skip
    epochs, stop = cfg.retrain_epochs, None
    if cfg.retrain_tightness:  # go on (up to 4x the epochs) until the weights sit on their centres
        epochs, stop = (
            4 * cfg.retrain_epochs,
            pipeline.until_tight(plan, cfg.retrain_epochs, cfg.retrain_tightness),
        )
    state = ctx.runner("retrain", setup, epochs, None, stop, placement=model.placement,
                       model_state=modes.state_of(model.apply_fn))  # fmt: skip
    trained = state.trainable
    model = model._replace(
        params=trained["params"], apply_fn=modes.with_state(model.apply_fn, state.model_state)
    )
    record = record.scored(ctx, "retrained", model).timed("retrain", start)
    record = record._replace(retrain_epochs=int(state.step) // max(n // cfg.batch_size, 1))
    return trained["mixtures"], model, record


def compress(ctx: Context, plan, mixtures, model: Model, record: Record):
    """``(codebooks, model, record)``: the retrained weights snapped to their codebooks, on the grid
    when the config asks for one, the float leaves coded when ``float_bits``."""
    cfg, retrained = ctx.cfg, model.params
    codebooks, snapped = codebook.compress(plan, mixtures, retrained, assignment=cfg.assignment)
    if cfg.weight_bits:
        codebooks, snapped = grid.codebooks_to_grid(codebooks, retrained, cfg.weight_bits)
    codes = {}
    if cfg.float_bits:  # the leaves outside the prior on grids of their own
        codes, snapped = float_codes.code_float_leaves(codebooks, snapped, cfg.float_bits)
    model = model._replace(params=snapped, float_codes=codes)
    return codebooks, model, record.scored(ctx, "compressed", model)


def disconnect(ctx: Context, codebooks: dict, model: Model) -> tuple[dict, Model]:
    """``(codebooks, model)`` with the weights that read dead units zeroed (``surgery.dead_units``;
    the outputs do not change). Several processes: each does it on a gathered copy, as the file
    writer's is. A model the trace cannot evaluate keeps its weights, with a warning: the run does not
    fail for it."""
    if multi_process():  # the same on every process: the weights and the sample are the same
        codebooks, model = to_local(codebooks), model._replace(params=to_local(model.params))
    sample = np.asarray(selection_data(ctx)[0][:DISCONNECT_SAMPLE])
    try:
        done = dead_units.disconnect(
            model.apply_fn, model.params, codebooks, sample, coded=model.float_codes or {}
        )
    except Exception as err:  # an optimisation must not cost the user the run
        warnings.warn(f"dead units left connected: {type(err).__name__}: {err}", stacklevel=2)
        return codebooks, model
    return done.codebooks, model._replace(params=done.params, disconnected=done.weights)


def finetune(ctx: Context, codebooks: dict, model: Model, record: Record, epochs: int, start=None):
    """``(codebooks, model, record)``: the centres fine-tuned for ``epochs`` epochs from the snapped
    ``model``, kept only if no worse on the validation split (``finetuning.tuned_result``)."""
    start, cfg, final = start or time.perf_counter(), ctx.cfg, model.params
    codes = model.float_codes or {}
    start_state = modes.state_of(model.apply_fn)
    model = model._replace(apply_fn=modes.with_state(model.apply_fn, start_state))  # a copy: keep_better
    if epochs:  # leaves the winner's state on it
        loss, opt, trainable, build = finetuning.finetune_setup(
            model.apply_fn, codebooks, model.params, learning_rate=cfg.finetune_lr,
            grid=bool(cfg.weight_bits), task_loss=task_loss(ctx, model), float_grids=float_codes.grids(codes),
        )  # fmt: skip
        if model.placement is not None:  # the teacher and the indices on the mesh, for every use
            loss = model.placement.place(loss)
        parent = ckpt.Identity((trainable, model.params))  # the indices live in the params, not trainable
        tuned = ctx.runner("finetune", (loss, opt, trainable), epochs, parent, placement=model.placement,
                           model_state=start_state)  # fmt: skip
        codebooks, params, improved = finetuning.tuned_result(
            loss, trainable, tuned.trainable, codebooks, build, selection_data(ctx),
            grid=bool(cfg.weight_bits), states=(model.apply_fn, start_state, tuned.model_state),
        )  # fmt: skip
        final = params if improved else final
    if codes:  # back on their grids: fine-tuning moved them
        codes, final = float_codes.recode(codes, final)
    model = model._replace(params=final, float_codes=codes)
    codebooks, model = disconnect(ctx, codebooks, model)
    return codebooks, model, record.scored(ctx, "finetuned", model).timed("compress_finetune", start)
