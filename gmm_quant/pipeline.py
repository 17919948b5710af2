"""High-level stages over any model given as ``apply_fn(params, x) -> logits``.

Works with Flax NNX (``graphdef, params = nnx.split(model, nnx.Param)``;
``apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)``), Linen (``model.apply``) or plain JAX::

    params = pretrain(apply_fn, params, (x, y), epochs=10)
    plan = make_plan(params)
    mixtures, params = retrain(apply_fn, params, (x, y), plan, tau=5e-3, epochs=10)
    codebooks, snapped = compress(plan, mixtures, params)
    codebooks, params = finetune(apply_fn, codebooks, snapped, (x, y), epochs=2)

Each stage accepts ``on_epoch(epoch, state, metrics)`` (progress, checkpoints) and a ``state`` plus
``start_epoch`` to resume from.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from gmm_quant import finetune as ft
from gmm_quant import loop
from gmm_quant import objective as obj
from gmm_quant.rules import Plan


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
):
    """Train ``trainable`` for ``epochs`` epochs; returns the final ``TrainState``."""
    x, y = (jnp.asarray(a) for a in data)
    epoch_fn = loop.make_epoch(loss_fn, optimizer, batch_size)
    state = loop.init_state(trainable, optimizer) if state is None else state
    for epoch in range(start_epoch, epochs):
        state, metrics = epoch_fn(state, x, y, loop.epoch_key(seed, epoch))
        metrics = loop.check_finite(metrics, f"{name} epoch {epoch + 1}")
        if on_epoch is not None:
            on_epoch(epoch, state, metrics)
    return state


def pretrain(
    apply_fn,
    params,
    data,
    *,
    epochs=10,
    batch_size=128,
    learning_rate=1e-3,
    seed=0,
    task_loss=None,
    **kwargs,
):
    """Plain training with Adam; returns the trained params."""
    loss = _ignore_step(task_loss or cross_entropy(apply_fn))
    state = run_epochs(
        loss,
        optax.adam(learning_rate),
        params,
        data,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        name="pretrain",
        **kwargs,
    )
    return state.trainable


def retrain(
    apply_fn,
    params,
    data,
    plan: Plan,
    *,
    tau=5e-3,
    warmup_epochs=0,
    epochs=10,
    batch_size=128,
    rates=obj.LearningRates(),
    seed=0,
    mixtures=None,
    task_loss=None,
    **kwargs,
):
    """Train weights and mixture jointly (loss = task + tau / N * complexity, see ``objective``).

    Returns ``(mixtures, params)``. ``mixtures`` defaults to ``init_mixtures(plan, params)``.
    """
    x = data[0]
    steps_per_epoch = max(x.shape[0] // batch_size, 1)
    schedule = obj.tau_schedule(tau, warmup_epochs * steps_per_epoch)
    loss = obj.joint_loss(task_loss or cross_entropy(apply_fn), plan, schedule, x.shape[0])
    mixtures = obj.init_mixtures(plan, params) if mixtures is None else mixtures
    trainable = {"params": params, "mixtures": mixtures}
    state = run_epochs(
        loss,
        obj.joint_optimizer(rates),
        trainable,
        data,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        name="retrain",
        **kwargs,
    )
    return state.trainable["mixtures"], state.trainable["params"]


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
    seed=0,
    task_loss=None,
    **kwargs,
):
    """Fine-tune the codebook centres (indices fixed, zero stays 0); returns ``(codebooks, params)``."""
    trainable, loss, build = ft.finetune_loss(
        task_loss or cross_entropy(apply_fn), codebooks, params, train_float=train_float
    )
    state = run_epochs(
        loss,
        optax.adam(learning_rate),
        trainable,
        data,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        name="finetune",
        **kwargs,
    )
    tuned = ft.updated_codebooks(codebooks, state.trainable["centres"])
    return tuned, build(state.trainable)


def _ignore_step(task_loss):
    return lambda params, x, y, step=None: task_loss(params, x, y)
