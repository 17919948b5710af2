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
from gmm_quant.training import augment, defaults, loop, modes, precision


def cross_entropy(apply_fn):
    """Task loss ``(params, x, y) -> (mean softmax cross-entropy, {"accuracy"})`` for classifiers.

    A custom task loss has the same signature; for a ``modes.Stateful`` model it also takes the
    keywords ``state`` and ``rng`` of train mode and returns the new state as ``aux["state"]``, which
    ``modes.outputs(apply_fn, params, x, mode)`` does for it."""

    def task_loss(params, x, y, **mode):
        logits, aux = modes.outputs(apply_fn, params, x, mode)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {**aux, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}

    return task_loss


def mean_squared_error(apply_fn):
    """Task loss ``(params, x, y) -> (mean squared error, {})`` of a regression model whose outputs are
    shaped as ``y`` (or ``y`` with a trailing axis of 1)."""

    def task_loss(params, x, y, **mode):
        out, aux = modes.outputs(apply_fn, params, x, mode)
        return jnp.mean((out.reshape(y.shape) - y) ** 2), aux

    return task_loss


def task_loss_of(task: str, apply_fn):
    """The task loss of ``task``: cross-entropy for "classify" and "sequence", mean squared error for
    "regress" (see ``user_data.TASKS``)."""
    return mean_squared_error(apply_fn) if task == "regress" else cross_entropy(apply_fn)


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
    model_state=None,
):
    """Train ``trainable`` for ``epochs`` epochs (fewer if ``stop(epoch, state)`` says so after an
    epoch); returns the final ``TrainState``. With a ``scale.placement.Placement`` the state lives on
    its mesh (parameters as it says) and every batch is split over the ``data`` axis. ``model_state``
    (``modes.state_of(apply_fn)``): the model runs in train mode, its state carried in the result."""
    if placement is None:
        x, y = (jnp.asarray(a) for a in data)
        batch_sharding, context = None, contextlib.nullcontext()
    else:
        x, y = (jax.device_put(np.asarray(a), placement.replicated()) for a in data)
        batch_sharding, context = placement.batch(), jax.set_mesh(placement.mesh)
        _check_batch(batch_size, placement)
    state = loop.init_state(trainable, optimizer, model_state) if state is None else state
    if placement is not None and isinstance(loss_fn, jax.tree_util.Partial):  # its arrays (a teacher,
        loss_fn = placement.place(loss_fn)  # the indices) on the mesh too, laid out like the params
    state_sharding = None if placement is None else placement.shardings(state)
    state = state if placement is None else jax.device_put(state, state_sharding)
    epoch_fn = loop.make_epoch(loss_fn, optimizer, batch_size, batch_sharding=batch_sharding,
                               state_sharding=state_sharding, seed=seed)  # fmt: skip
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
    apply_fn, params, *, learning_rate=defaults.PRETRAIN_LR, task_loss=None, total_steps=0, max_shift=0,
    seed=defaults.SEED,
):  # fmt: skip
    """(loss_fn, optimizer, trainable) of plain training with Adam.

    ``total_steps`` > 0: the learning rate decays along a cosine to 0 over that many steps.
    ``max_shift`` > 0: every image ([N, H, W, C]) is shifted by up to that many pixels (``augment``).
    """
    task_loss = task_loss or cross_entropy(apply_fn)
    loss = augment.shifted_loss(task_loss, max_shift, seed) if max_shift else _ignore_step(task_loss)
    rate = optax.cosine_decay_schedule(learning_rate, total_steps) if total_steps else learning_rate
    return loss, optax.adam(rate), params


def pretrain(
    apply_fn, params, data, *, epochs=defaults.PRETRAIN_EPOCHS, batch_size=defaults.BATCH_SIZE,
    learning_rate=defaults.PRETRAIN_LR, seed=defaults.SEED, task_loss=None, cosine=False, max_shift=0, **kw,
):  # fmt: skip
    """Plain training with Adam; returns the trained params. ``cosine``: the learning rate decays along
    a cosine to 0 over the run; ``max_shift``: images shifted by up to that many pixels (augmentation)."""
    steps = epochs * max(data[0].shape[0] // batch_size, 1) if cosine else 0
    task = precision.in_model_dtypes(task_loss or cross_entropy(apply_fn), params)  # master weights
    loss, opt, trainable = pretrain_setup(
        apply_fn, precision.master(params), learning_rate=learning_rate, task_loss=task, total_steps=steps,
        max_shift=max_shift, seed=seed,
    )  # fmt: skip
    state = run_epochs(
        loss, opt, trainable, data, epochs=epochs, batch_size=batch_size, seed=seed, name="pretrain",
        model_state=modes.state_of(apply_fn), **kw,
    )  # fmt: skip
    modes.keep_state(apply_fn, state.model_state)
    return precision.like(state.trainable, params)


def retrain_setup(
    apply_fn,
    params,
    plan: Plan,
    *,
    num_train,
    steps_per_epoch,
    tau=defaults.TAU,
    warmup_epochs=defaults.WARMUP_EPOCHS,
    rates=defaults.RATES,
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


def until_tight(plan: Plan, epochs: int, tightness: float):
    """``stop(epoch, state)`` of retraining: after ``epochs`` epochs, once every quantised layer's
    ``codebook.tightness`` (RMS distance to the nearest centre / the layer's std) is at most
    ``tightness``. It reads only the state it is given, so a resumed run stops where an uninterrupted
    one would."""

    def stop(epoch, state) -> bool:
        if epoch + 1 < epochs:
            return False
        return _loosest(plan, state.trainable) <= tightness

    return stop


def _loosest(plan: Plan, trainable) -> float:
    return max(codebook.tightness(plan, trainable["mixtures"], trainable["params"]).values())


def retrain(
    apply_fn,
    params,
    data,
    plan: Plan,
    *,
    tau=defaults.TAU,
    warmup_epochs=defaults.WARMUP_EPOCHS,
    epochs=defaults.RETRAIN_EPOCHS,
    tightness=defaults.TIGHTNESS,
    max_epochs=None,
    batch_size=defaults.BATCH_SIZE,
    rates=defaults.RATES,
    seed=defaults.SEED,
    mixtures=None,
    task_loss=None,
    mixture_every=1,
    **kw,
):
    """Train weights and mixture jointly (loss = task + tau / N * complexity, see ``objective``).

    Returns ``(mixtures, params)``. ``mixtures`` defaults to ``init_mixtures(plan, params)``.

    ``tightness`` > 0: after ``epochs`` epochs, training goes on (up to ``max_epochs``, default
    ``4 * epochs``) until every quantised layer's weights sit tight around their centres
    (``until_tight``), because snapping loose weights is what costs accuracy (BENCHMARKS.md, "A 3x3
    CNN with average pooling"); a warning says so when the cap comes first. ``tightness`` 0 or None
    (the default, as the command line's ``--retrain-tightness``) trains exactly ``epochs`` epochs.
    """
    n = data[0].shape[0]
    loss, opt, trainable = retrain_setup(
        apply_fn,
        precision.master(params),
        plan,
        num_train=n,
        steps_per_epoch=max(n // batch_size, 1),
        tau=tau,
        warmup_epochs=warmup_epochs,
        rates=rates,
        mixtures=mixtures,
        task_loss=precision.in_model_dtypes(task_loss or cross_entropy(apply_fn), params),
        mixture_every=mixture_every,
    )
    stop = until_tight(plan, epochs, tightness) if tightness else None
    limit = max_epochs or 4 * epochs if tightness else epochs
    state = run_epochs(
        loss, opt, trainable, data, epochs=limit, batch_size=batch_size, seed=seed, name="retrain",
        stop=stop, model_state=modes.state_of(apply_fn), **kw,
    )  # fmt: skip
    modes.keep_state(apply_fn, state.model_state)
    loosest = _loosest(plan, state.trainable) if tightness else 0.0
    if tightness and loosest > tightness:
        warnings.warn(
            f"retraining ended with weights {loosest:.2f} (RMS distance / std) from their centres, "
            f"above the {tightness} aimed for: snapping will cost accuracy. codebook.tightness gives "
            "the value per layer; a larger tau pulls the weights harder towards the centres.",
            stacklevel=2,
        )
    return state.trainable["mixtures"], precision.like(state.trainable["params"], params)


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
    task = precision.in_model_dtypes(task_loss or cross_entropy(apply_fn), params)  # master weights
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


def _ignore_step(task_loss):
    return lambda params, x, y, step=None, **mode: task_loss(params, x, y, **mode)
