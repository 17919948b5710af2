"""High-level stages over any model given as ``apply_fn(params, x) -> logits``.

Works with Flax NNX and Linen models with state (``apply_fn, params = modes.from_nnx(model)`` /
``modes.from_linen(module, variables)``: trained in train mode), or any pure ``apply_fn``::

    params = pretrain(apply_fn, params, (x, y), epochs=10)
    plan = make_plan(params)
    mixtures, params = retrain(apply_fn, params, (x, y), plan, tau=0.05, warmup_epochs=5, epochs=30)
    codebooks, snapped = compress(plan, mixtures, params)
    codebooks, params = finetuning.finetune(apply_fn, codebooks, snapped, (x, y), epochs=2)

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
from gmm_quant.core import objective as obj
from gmm_quant.core.rules import Plan
from gmm_quant.scale.mesh import batch_problem
from gmm_quant.training import augment, defaults, loop, modes, precision
from gmm_quant.training.tasks import cross_entropy


def master_task(apply_fn, task_loss, params):
    """The task loss (default cross-entropy) over float32 master copies of half-precision ``params``
    (``precision.in_model_dtypes``), as every API stage trains them; parameters that are not
    floating point are refused first (``precision.check_dtypes``)."""
    precision.check_dtypes(params)
    return precision.in_model_dtypes(task_loss or cross_entropy(apply_fn), params)


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
    task = master_task(apply_fn, task_loss, params)
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
    snap_from=None,
):
    """(loss_fn, optimizer, trainable) of joint training; trainable is ``{"params", "mixtures"}``.
    ``mixture_every`` k > 1: the mixture learns on every k-th step only; ``snap_from``: the step from
    which the task sees the weights snapped (both: ``objective.joint_loss``)."""
    schedule = obj.tau_schedule(tau, warmup_epochs * steps_per_epoch)
    task = task_loss or cross_entropy(apply_fn)
    loss = obj.joint_loss(
        task, plan, schedule, num_train, placement, mixture_every=mixture_every, snap_from=snap_from
    )
    mixtures = obj.init_mixtures(plan, params) if mixtures is None else mixtures
    optimizer = obj.joint_optimizer(rates, mixture_every=mixture_every)
    return loss, optimizer, {"params": params, "mixtures": mixtures}


def snap_from(epochs: int, snap_epochs: int, steps_per_epoch: int) -> int | None:
    """The first step of the last ``snap_epochs`` of ``epochs`` retraining epochs; None if 0."""
    return max(epochs - snap_epochs, 0) * steps_per_epoch if snap_epochs else None


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
    snap_epochs=defaults.SNAP_EPOCHS,
    **kw,
):
    """Train weights and mixture jointly (loss = task + tau / N * complexity, see ``objective``).

    Returns ``(mixtures, params)``. ``mixtures`` defaults to ``init_mixtures(plan, params)``.

    ``tightness`` > 0: after ``epochs`` epochs, training goes on (up to ``max_epochs``, default
    ``4 * epochs``) until every quantised layer's weights sit tight around their centres
    (``until_tight``), because snapping loose weights is what costs accuracy (BENCHMARKS.md, "A 3x3
    CNN with average pooling"); a warning says so when the cap comes first. ``tightness`` 0 or None
    (the default, as the command line's ``--retrain-tightness``) trains exactly ``epochs`` epochs.
    ``snap_epochs`` > 0: the last that many of the ``epochs`` (and any past them) train the task on
    the snapped weights, gradient straight through (``snap_from``).
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
        task_loss=master_task(apply_fn, task_loss, params),
        mixture_every=mixture_every,
        snap_from=snap_from(epochs, snap_epochs, max(n // batch_size, 1)),
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


def _ignore_step(task_loss):
    return lambda params, x, y, step=None, **mode: task_loss(params, x, y, **mode)
