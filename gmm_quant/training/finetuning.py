"""Codebook fine-tuning: the centres trained with every weight's index fixed (zero stays exactly 0),
kept only if no worse than the start on the data selection looks at (``keep_better``)."""

from __future__ import annotations

import optax

from gmm_quant.core import codebook_tuning as ct
from gmm_quant.core import grid as grid_lib
from gmm_quant.core.codebook import dequantize
from gmm_quant.training import defaults, loop, modes, precision
from gmm_quant.training.pipeline import master_task, run_epochs
from gmm_quant.training.tasks import cross_entropy


def finetune_setup(
    apply_fn,
    codebooks: dict,
    params,
    *,
    learning_rate=defaults.FINETUNE_LR,
    train_float=True,
    task_loss=None,
    grid=False,
    float_grids=None,
):
    """(loss_fn, optimizer, trainable, build) of codebook fine-tuning; ``build(trainable)`` -> params."""
    trainable, loss, build = ct.finetune_loss(
        task_loss or cross_entropy(apply_fn), codebooks, params, train_float=train_float, grid=grid,
        float_grids=float_grids,
    )  # fmt: skip
    return loss, optax.adam(learning_rate), trainable, build


def keep_better(loss_fn, start, end, data, batch_size=1000, states=None):
    """``(end, True)`` unless ``end`` has a higher mean training loss than ``start``: ``(start, False)``.

    Fine-tuning a converged codebook is a small correction; this makes sure it never makes the model
    worse on the data it was tuned on (an epoch average of the training loss would hide it).
    ``states``: ``(apply_fn, start_state, end_state)`` of a ``modes.Stateful`` model, each side
    evaluated with its own state; the winner's stays on ``apply_fn``.
    """
    apply_fn, start_state, end_state = states or (None, None, None)
    modes.keep_state(apply_fn, start_state)
    before = loop.mean_loss(loss_fn, start, *data, batch_size)
    modes.keep_state(apply_fn, end_state)
    after = loop.mean_loss(loss_fn, end, *data, batch_size)
    if after <= before:
        return end, True
    modes.keep_state(apply_fn, start_state)
    return start, False


def tuned_result(loss_fn, start, end, codebooks: dict, build, data, *, grid=False, states=None):
    """``(codebooks, params, improved)`` after fine-tuning from ``start`` to ``end`` (trainables of
    ``finetune_setup``): the tuned codebooks and params if ``end`` is no worse on ``data`` than
    ``start`` (``keep_better``, ``states`` as there), else ``codebooks`` unchanged and params None."""
    tuned, improved = keep_better(loss_fn, start, end, data, states=states)
    if not improved:
        return codebooks, None, False
    codebooks = ct.updated_codebooks(codebooks, tuned, grid=grid)
    return codebooks, dequantize(codebooks, build(tuned)), True


def finetune(
    apply_fn,
    codebooks: dict,
    params,
    data,
    *,
    epochs=defaults.FINETUNE_EPOCHS,
    batch_size=defaults.BATCH_SIZE,
    learning_rate=defaults.FINETUNE_LR,
    train_float=True,
    grid_bits=0,
    seed=defaults.SEED,
    task_loss=None,
    val=None,
    **kw,
):
    """Fine-tune the codebook centres (indices fixed, zero stays 0); returns ``(codebooks, params)``.

    ``grid_bits`` (2..8) first rounds every codebook onto an evenly spaced signed grid of that many
    bits (exportable with DequantizeLinear; unchanged if already on one) and trains the centres rounded
    onto it (straight-through gradient). The result is never worse than the start on the training loss
    over ``val`` (a validation split, as the command line uses; default: the training data) —
    ``keep_better``.
    """
    if grid_bits:
        codebooks, params = grid_lib.codebooks_to_grid(codebooks, params, grid_bits)
    task = master_task(apply_fn, task_loss, params)
    loss, opt, trainable, build = finetune_setup(
        apply_fn, codebooks, precision.master(params), learning_rate=learning_rate, train_float=train_float,
        task_loss=task, grid=bool(grid_bits),
    )  # fmt: skip
    start_state = modes.state_of(apply_fn)
    state = run_epochs(
        loss, opt, trainable, data, epochs=epochs, batch_size=batch_size, seed=seed, name="finetune",
        model_state=start_state, **kw,
    )  # fmt: skip
    selection = data if val is None else val
    states = (apply_fn, start_state, state.model_state)
    tuned, final, improved = tuned_result(loss, trainable, state.trainable, codebooks, build, selection,
                                          grid=bool(grid_bits), states=states)  # fmt: skip
    return (tuned, precision.like(final, params)) if improved else (codebooks, params)
