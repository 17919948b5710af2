"""One trial of the search: retrain -> compress -> fine-tune from the pretrained model, in memory.

A trial runs exactly the stages of ``python -m gmm_quant.train`` (``run.stages``) with the trial's
config, so its config file reproduces it. It sees the training split and the validation split only.
During retraining it reports, at the rungs of successive halving (``rung_epochs``), what compressing
now would give (the penalised score below), and Optuna's ``SuccessiveHalvingPruner`` lets only the best
``1 / HALVING`` of the trials at a rung go on: most trials are short and cheap; the promising ones run
to full length. A trial over the budget after fine-tuning, but by no more than the budget again, is
fine-tuned ``RESCUE`` times longer from the same snapped model before it is given up (``rescues``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from gmm_quant.core import accounting, codebook, float_codes
from gmm_quant.core.rules import flatten
from gmm_quant.run import model_stages, stages
from gmm_quant.run.config import Config
from gmm_quant.run.plan import build_plan
from gmm_quant.training import loop, pipeline

HALVING = 3  # successive halving: the best third of the trials at a rung go on to the next
RESCUE = 3  # an over-budget trial is fine-tuned this many times longer before it is given up


class Outcome(NamedTuple):
    """What a trial measured: validation error (fraction), CR (Han), the config that produced it."""

    val_error: float
    compression_ratio: float
    config: Config
    rescued: bool
    file_bytes: int | None = None  # the shipped file's size, when the search has a size target
    latency_ms: float | None = None  # its ONNX Runtime latency, when the search has a latency target


def rescues(error: float, limit: float, budget: float) -> bool:
    """Whether a fine-tuned trial judged ``error`` is fine-tuned longer: over ``limit`` by at most
    ``budget``. Longer fine-tuning brought none of the three over-budget trials of the LeNet-300-100
    search back (BENCHMARKS.md), and it costs a LeNet-5-Caffe trial 30 epochs (about 10 minutes here):
    it is kept for the near misses."""
    return limit < error <= limit + budget


def rung_epochs(cfg: Config) -> tuple[int, ...]:
    """Retraining epochs after which a trial of the search based on ``cfg`` reports (and may stop):
    the first once tau has warmed up (while it rises the score says little about the end: measured on
    digits), and no earlier than a ninth of retraining; then ``HALVING`` times longer each, before the
    end. LeNet-5-Caffe's 30 epochs with 5 of warm-up: (5, 15)."""
    first = max(1, cfg.warmup_epochs, math.ceil(cfg.retrain_epochs / HALVING**2))
    rungs = []
    while first * HALVING ** len(rungs) < cfg.retrain_epochs:
        rungs.append(first * HALVING ** len(rungs))
    return tuple(rungs)


def first_rung(base: Config) -> int:
    """The retraining epoch of the first rung of a search based on ``base`` (the pruner's unit of
    resource; 1 when there is none: nothing is then reported)."""
    return (rung_epochs(base) or (1,))[0]


def score(compression_ratio: float, val_error: float, limit: float, budget: float) -> float:
    """log2(CR), less one per budget's worth of error above the limit (what the pruner compares)."""
    over = max(0.0, val_error - limit) / max(budget, 1e-4)
    return math.log2(compression_ratio) - over


def compressed_metrics(
    apply_fn, plan, mixtures, params, val, assignment="nearest", judge=None, float_bits=0
):  # fmt: skip
    """(judged value — val error by default —, CR) of the model compressed as it stands."""
    codebooks, snapped = codebook.compress(plan, mixtures, params, assignment=assignment)
    codes = {}
    if float_bits:  # the float leaves as the finished trial will store them
        codes, snapped = float_codes.code_float_leaves(codebooks, snapped, float_bits)
    cr = accounting.summarize(codebooks, flatten(snapped), float_codes=codes)["compression_ratio"]
    return (judge or loop.error_rate)(apply_fn, snapped, *val), cr


def memory_runner(cfg: Config, train, on_retrain_epoch=None):
    """A stages runner without checkpoints (nor placement: one device); ``on_retrain_epoch(epoch,
    state)`` after each retraining epoch."""

    def runner(name, setup, epochs, parent, stop=None, placement=None, model_state=None):
        loss, optimizer, trainable = setup

        def after(epoch, state):
            if name == "retrain" and on_retrain_epoch is not None:
                on_retrain_epoch(epoch, state)
            return stop is not None and stop(epoch, state)

        return pipeline.run_epochs(
            loss, optimizer, trainable, train, epochs=epochs, batch_size=cfg.batch_size, seed=cfg.seed,
            name=name, stop=after, model_state=model_state,
        )  # fmt: skip

    return runner


def run_trial(
    cfg: Config, apply_fn, pretrained, train, val, *, limit, budget, report=None, graphdef=None, judge=None,
    measure=None, rung_score=None, rungs=None,
):  # fmt: skip
    """Compress ``pretrained`` with ``cfg``; ``report(score, epoch)`` after each of the retraining
    epochs ``rungs`` (default ``rung_epochs(cfg)``; a search passes its base config's), which may raise
    to prune.

    ``limit`` is the highest acceptable judged value (validation error, a fraction, unless ``judge``
    says otherwise), ``budget`` the allowed increase. Returns ``(Outcome, codebooks, params, apply_fn)``
    (``apply_fn`` holds the trained model's state when it is a ``training.modes.Stateful``).
    ``measure(cfg, codebooks, model)`` measures the shipped file (``targets.measure``);
    ``rung_score(cr, judged)`` replaces ``score`` at the rungs (``targets.rung_score``).
    """
    judge = judge or loop.error_rate
    rung_score = rung_score or (lambda cr, err: score(cr, err, limit, budget))
    rungs = set(rung_epochs(cfg) if rungs is None else rungs)

    def on_epoch(epoch, state):
        if report is not None and epoch + 1 in rungs:
            mixtures, params = state.trainable["mixtures"], state.trainable["params"]
            err, cr = compressed_metrics(start.apply_fn, plan, mixtures, params, val, cfg.assignment, judge,
                                         cfg.float_bits)  # fmt: skip
            report(rung_score(cr, err), epoch + 1)

    ctx = stages.Context(cfg, train, val, memory_runner(cfg, train, on_epoch))
    start, record = model_stages.prune_heads(
        ctx, stages.Model(apply_fn, pretrained, graphdef), stages.Record()
    )
    plan = build_plan(cfg, start.params)
    mixtures, retrained, record = stages.retrain(ctx, plan, start, record)
    codebooks, snapped, record = stages.compress(ctx, plan, mixtures, retrained, record)
    snapped, record = model_stages.quantise_activations(ctx, snapped, record)
    tuned, model, record = stages.finetune(ctx, codebooks, snapped, record, cfg.finetune_epochs)
    error, rescued = judge(model.apply_fn, model.params, *val), False
    if rescues(error, limit, budget) and cfg.finetune_epochs:  # fine-tuned longer from the same snapped model
        longer = dataclasses.replace(cfg, finetune_epochs=RESCUE * cfg.finetune_epochs)
        tuned2, model2, _ = stages.finetune(
            ctx._replace(cfg=longer), codebooks, snapped, record, longer.finetune_epochs
        )
        error2 = judge(model2.apply_fn, model2.params, *val)
        if error2 < error:
            cfg, tuned, model, error, rescued = longer, tuned2, model2, error2, True
    final = model.params
    flat = {p: np.asarray(v) for p, v in flatten(final).items()}
    cr = accounting.summarize(tuned, flat, removed=model.removed, float_codes=model.float_codes)
    got = {} if measure is None else measure(cfg, tuned, model)
    outcome = Outcome(
        error, cr["compression_ratio"], cfg, rescued, got.get("file_bytes"), got.get("latency_ms")
    )
    return outcome, tuned, final, model.apply_fn
