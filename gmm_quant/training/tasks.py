"""Task losses ``(params, x, y, **mode) -> (mean loss, aux)``: what the stages minimise besides the prior.

For a ``modes.Stateful`` model a task loss also takes the keywords ``state`` and ``rng`` of train mode
and returns the new state as ``aux["state"]``; ``modes.outputs`` does that part.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from gmm_quant.training import modes


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
