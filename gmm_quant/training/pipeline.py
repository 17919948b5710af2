"""High-level stages over any model given as ``apply_fn(params, x) -> logits``.

Works with Flax NNX (``graphdef, params = nnx.split(model, nnx.Param)``;
``apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)``), Linen (``model.apply``) or plain JAX::

    params = pretrain(apply_fn, params, (x, y), epochs=10)
    plan = make_plan(params)
    mixtures, params = retrain(apply_fn, params, (x, y), plan, tau=0.05, warmup_epochs=5, epochs=30)
    codebooks, snapped = compress(plan, mixtures, params)
    codebooks, params = finetune(apply_fn, codebooks, snapped, (x, y), epochs=2)

Each stage accepts ``on_epoch(epoch, state, metrics)`` (progress, checkpoints) and a ``state`` plus
``start_epoch`` to resume from.
"""

from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gmm_quant._util import interrupts
from gmm_quant.core import codebook
from gmm_quant.core import codebook_tuning as ct
from gmm_quant.core import grid as grid_lib
from gmm_quant.core import objective as obj
from gmm_quant.core.codebook import dequantize
from gmm_quant.core.rules import Plan
from gmm_quant.scale.mesh import batch_problem
from gmm_quant.training import augment, loop


def cross_entropy(apply_fn):
    """Task loss ``(params, x, y) -> (mean softmax cross-entropy, {"accuracy"})`` for classifiers."""

    def task_loss(params, x, y):
        logits = apply_fn(params, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

    return task_loss


def run_epochs(
    loss_fn,
    optimizer,
    trainable,
    data,
    *,
    epochs,
    batch_size,
    seed,
    name,
    state=None,
    start_epoch=0,
    on_epoch=None,
    stop=None,
    placement=None,
):
    """Train ``trainable`` for ``epochs`` epochs (fewer if ``stop(epoch, state)`` says so after an
    epoch); returns the final ``TrainState``. With a ``scale.placement.Placement`` the state lives on
    its mesh (parameters as it says) and every batch is split over the ``data`` axis."""
    if placement is None:
        x, y = (jnp.asarray(a) for a in data)
        batch_sharding, context = None, contextlib.nullcontext()
    else:
        x, y = (jax.device_put(np.asarray(a), placement.replicated()) for a in data)
        batch_sharding, context = placement.batch(), jax.set_mesh(placement.mesh)
        _check_batch(batch_size, placement)
    state = loop.init_state(trainable, optimizer) if state is None else state
    if placement is not None and isinstance(loss_fn, jax.tree_util.Partial):  # its arrays (a teacher,
        loss_fn = placement.place(loss_fn)  # the indices) on the mesh too, laid out like the params
    state_sharding = None if placement is None else placement.shardings(state)
    state = state if placement is None else jax.device_put(state, state_sharding)
    epoch_fn = loop.make_epoch(loss_fn, optimizer, batch_size, batch_sharding=batch_sharding,
                               state_sharding=state_sharding)  # fmt: skip
    with context:
        return _epochs(epoch_fn, state, x, y, epochs, start_epoch, seed, name, on_epoch, stop)


def _check_batch(batch_size, placement):
    problem = batch_problem(dict(placement.mesh.shape), batch_size)
    if problem:
        raise ValueError(f"batch_size {batch_size}: {problem}")


def _epochs(epoch_fn, state, x, y, epochs, start_epoch, seed, name, on_epoch, stop):
    for epoch in range(start_epoch, epochs):
        state, metrics = epoch_fn(state, x, y, loop.epoch_key(seed, epoch))
        metrics = loop.check_finite(metrics, f"{name} epoch {epoch + 1}")
        if on_epoch is not None:
            on_epoch(epoch, state, metrics)
        interrupts.check()  # after the epoch's checkpoint: a dropped Ctrl-C stops the run here
        if stop is not None and stop(epoch, state):
            break
    return state


def pretrain_setup(
    apply_fn, params, *, learning_rate=1e-3, task_loss=None, total_steps=0, max_shift=0, seed=0
):
    """(loss_fn, optimizer, trainable) of plain training with Adam.

    ``total_steps`` > 0: the learning rate decays along a cosine to 0 over that many steps.
    ``max_shift`` > 0: every image ([N, H, W, C]) is shifted by up to that many pixels (``augment``).
    """
    task_loss = task_loss or cross_entropy(apply_fn)
    loss = augment.shifted_loss(task_loss, max_shift, seed) if max_shift else _ignore_step(task_loss)
    rate = optax.cosine_decay_schedule(learning_rate, total_steps) if total_steps else learning_rate
    return loss, optax.adam(rate), params


def pretrain(
    apply_fn, params, data, *, epochs=10, batch_size=128, learning_rate=1e-3, seed=0, task_loss=None,
    cosine=False, max_shift=0, **kw,
):  # fmt: skip
    """Plain training with Adam; returns the trained params. ``cosine``: the learning rate decays along
    a cosine to 0 over the run; ``max_shift``: images shifted by up to that many pixels (augmentation)."""
    steps = epochs * max(data[0].shape[0] // batch_size, 1) if cosine else 0
    loss, opt, trainable = pretrain_setup(
        apply_fn, params, learning_rate=learning_rate, task_loss=task_loss, total_steps=steps,
        max_shift=max_shift, seed=seed,
    )  # fmt: skip
    state = run_epochs(
        loss, opt, trainable, data, epochs=epochs, batch_size=batch_size, seed=seed, name="pretrain", **kw
    )
    return state.trainable


def retrain_setup(
    apply_fn,
    params,
    plan: Plan,
    *,
    num_train,
    steps_per_epoch,
    tau=0.05,
    warmup_epochs=0,
    rates=obj.LearningRates(),
    mixtures=None,
    task_loss=None,
    placement=None,
    mixture_every=1,
):
    """(loss_fn, optimizer, trainable) of joint training; trainable is ``{"params", "mixtures"}``.
    ``mixture_every`` k > 1: the mixture learns on every k-th step only (``objective.joint_loss``)."""
    schedule = obj.tau_schedule(tau, warmup_epochs * steps_per_epoch)
    task = task_loss or cross_entropy(apply_fn)
    loss = obj.joint_loss(task, plan, schedule, num_train, placement, mixture_every=mixture_every)
    mixtures = obj.init_mixtures(plan, params) if mixtures is None else mixtures
    optimizer = obj.joint_optimizer(rates, mixture_every=mixture_every)
    return loss, optimizer, {"params": params, "mixtures": mixtures}


PATIENCE = 3  # epochs without a 5% gain in tightness before retraining stops short of the target


def retrain(
    apply_fn,
    params,
    data,
    plan: Plan,
    *,
    tau=0.05,
    warmup_epochs=0,
    epochs=10,
    tightness=0.1,
    max_epochs=None,
    batch_size=128,
    rates=obj.LearningRates(),
    seed=0,
    mixtures=None,
    task_loss=None,
    mixture_every=1,
    **kw,
):
    """Train weights and mixture jointly (loss = task + tau / N * complexity, see ``objective``).

    Returns ``(mixtures, params)``. ``mixtures`` defaults to ``init_mixtures(plan, params)``.

    Convergence check: after ``epochs`` epochs, training goes on (up to ``max_epochs``, default
    ``4 * epochs``, or until the tightness has not improved by 5% in ``PATIENCE`` epochs, with a
    warning) until every quantised layer's weights sit tight around their centres —
    ``codebook.tightness`` (RMS distance to the nearest centre over the layer's std) at most
    ``tightness`` — because snapping loose weights is what costs accuracy (BENCHMARKS.md, "A 3x3 CNN
    with average pooling"). ``tightness=None`` trains exactly ``epochs`` epochs.
    """
    n = data[0].shape[0]
    loss, opt, trainable = retrain_setup(
        apply_fn,
        params,
        plan,
        num_train=n,
        steps_per_epoch=max(n // batch_size, 1),
        tau=tau,
        warmup_epochs=warmup_epochs,
        rates=rates,
        mixtures=mixtures,
        task_loss=task_loss,
        mixture_every=mixture_every,
    )
    limit = epochs if tightness is None else max_epochs or 4 * epochs

    history = []

    def tight(epoch, state):
        if epoch + 1 < epochs:
            return False
        loose = codebook.tightness(plan, state.trainable["mixtures"], state.trainable["params"])
        history.append(max(loose.values()))
        stalled = len(history) > PATIENCE and min(history[-PATIENCE:]) >= 0.95 * min(history[:-PATIENCE])
        return history[-1] <= tightness or stalled

    state = run_epochs(
        loss, opt, trainable, data, epochs=limit, batch_size=batch_size, seed=seed, name="retrain",
        stop=None if tightness is None else tight, **kw,
    )  # fmt: skip
    if history and history[-1] > tightness:
        warnings.warn(
            f"retraining ended with weights {history[-1]:.2f} (RMS distance / std) from their centres, "
            f"above the {tightness} aimed for: snapping will cost accuracy. codebook.tightness gives "
            "the value per layer; a larger tau pulls the weights harder towards the centres.",
            stacklevel=2,
        )
    return state.trainable["mixtures"], state.trainable["params"]


def finetune_setup(
    apply_fn,
    codebooks: dict,
    params,
    *,
    learning_rate=1e-4,
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


def keep_better(loss_fn, start, end, data, batch_size=1000):
    """``(end, True)`` unless ``end`` has a higher mean training loss than ``start``: ``(start, False)``.

    Fine-tuning a converged codebook is a small correction; this makes sure it never makes the model
    worse on the data it was tuned on (an epoch average of the training loss would hide it).
    """
    before = loop.mean_loss(loss_fn, start, *data, batch_size)
    after = loop.mean_loss(loss_fn, end, *data, batch_size)
    return (end, True) if after <= before else (start, False)


def finetune(
    apply_fn,
    codebooks: dict,
    params,
    data,
    *,
    epochs=2,
    batch_size=128,
    learning_rate=1e-4,
    train_float=True,
    grid_bits=0,
    seed=0,
    task_loss=None,
    **kw,
):
    """Fine-tune the codebook centres (indices fixed, zero stays 0); returns ``(codebooks, params)``.

    ``grid_bits`` (2..8) first rounds every codebook onto an evenly spaced signed grid of that many
    bits (exportable with DequantizeLinear; unchanged if already on one) and trains the centres rounded
    onto it (straight-through gradient). The
    result is never worse than the start on the training loss (``keep_better``).
    """
    if grid_bits:
        codebooks = {p: grid_lib.to_grid(cb, grid_bits) for p, cb in codebooks.items()}
        params = dequantize(codebooks, params)
    loss, opt, trainable, build = finetune_setup(
        apply_fn, codebooks, params, learning_rate=learning_rate, train_float=train_float,
        task_loss=task_loss, grid=bool(grid_bits),
    )  # fmt: skip
    state = run_epochs(
        loss, opt, trainable, data, epochs=epochs, batch_size=batch_size, seed=seed, name="finetune", **kw
    )
    tuned, improved = keep_better(loss, trainable, state.trainable, data)
    if not improved:
        return codebooks, params
    codebooks = ct.updated_codebooks(codebooks, tuned, grid=bool(grid_bits))
    return codebooks, dequantize(codebooks, build(tuned))


def _ignore_step(task_loss):
    return lambda params, x, y, step=None: task_loss(params, x, y)
