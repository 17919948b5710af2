"""One trial of the search: retrain -> compress -> fine-tune from the pretrained model, in memory.

A trial runs exactly the stages of ``python -m gmm_quant.train`` (``stages.Stages``) with the trial's
config, so its config file reproduces it. It sees the training split and the validation split only.
During retraining it reports, at a few rungs, what compressing now would give (the penalised score
below), so Optuna's pruner stops unpromising trials early: those are the short, cheap trials; the
promising ones run to full length. A trial over the budget after fine-tuning is fine-tuned
``RESCUE`` times longer from the same snapped model before it is given up.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from gmm_quant.core import accounting, codebook, float_codes
from gmm_quant.core.rules import flatten
from gmm_quant.run.config import Config
from gmm_quant.run.stages import Stages, build_plan
from gmm_quant.training import loop, pipeline

RUNGS = (0.5, 0.75)  # fractions of retraining at which a trial reports and may be pruned (before
# the middle, while tau is still warming up, the score says little about the end: measured on digits)
RESCUE = 3  # an over-budget trial is fine-tuned this many times longer before it is given up


class Outcome(NamedTuple):
    """What a trial measured: validation error (fraction), CR (Han), the config that produced it."""

    val_error: float
    compression_ratio: float
    config: Config
    rescued: bool


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
    """A ``Stages`` runner without checkpoints; ``on_retrain_epoch(epoch, state)`` after each epoch."""

    def runner(name, setup, epochs, parent, stop=None):
        loss, optimizer, trainable = setup

        def after(epoch, state):
            if name == "retrain" and on_retrain_epoch is not None:
                on_retrain_epoch(epoch, state)
            return stop is not None and stop(epoch, state)

        return pipeline.run_epochs(
            loss, optimizer, trainable, train, epochs=epochs, batch_size=cfg.batch_size, seed=cfg.seed,
            name=name, stop=after,
        )  # fmt: skip

    return runner


def run_trial(
    cfg: Config, apply_fn, pretrained, train, val, *, limit, budget, report=None, graphdef=None, judge=None
):
    """Compress ``pretrained`` with ``cfg``; ``report(score, step)`` at each rung (may raise to prune).

    ``limit`` is the highest acceptable judged value (validation error, a fraction, unless ``judge``
    says otherwise), ``budget`` the allowed increase. Returns ``(Outcome, codebooks, params)``.
    """
    judge = judge or loop.error_rate
    plan = build_plan(cfg, pretrained)
    rungs = sorted({max(1, round(f * cfg.retrain_epochs)) for f in RUNGS} - {cfg.retrain_epochs})

    def on_epoch(epoch, state):
        if report is not None and epoch + 1 in rungs:
            mixtures, params = state.trainable["mixtures"], state.trainable["params"]
            err, cr = compressed_metrics(apply_fn, plan, mixtures, params, val, cfg.assignment, judge,
                                         cfg.float_bits)  # fmt: skip
            report(score(cr, err, limit, budget), epoch + 1)

    stages = Stages(cfg, apply_fn, train, val, memory_runner(cfg, train, on_epoch), graphdef=graphdef)
    mixtures, retrained = stages.retrain(plan, pretrained)
    codebooks, snapped = stages.compress(plan, mixtures, retrained)
    tuned, final = stages.finetune(codebooks, snapped, cfg.finetune_epochs)
    error, rescued = judge(stages.apply_fn, final, *val), False
    if error > limit and cfg.finetune_epochs:
        longer = dataclasses.replace(cfg, finetune_epochs=RESCUE * cfg.finetune_epochs)
        stages.cfg = longer
        tuned2, final2 = stages.finetune(codebooks, snapped, longer.finetune_epochs)
        error2 = judge(stages.apply_fn, final2, *val)
        if error2 < error:
            cfg, tuned, final, error, rescued = longer, tuned2, final2, error2, True
    flat = {p: np.asarray(v) for p, v in flatten(final).items()}
    cr = accounting.summarize(tuned, flat, float_codes=stages.float_codes)  # costs depend on widths only
    return Outcome(error, cr["compression_ratio"], cfg, rescued), tuned, final
