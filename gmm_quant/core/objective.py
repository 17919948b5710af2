"""The joint objective of soft weight-sharing and its optimiser.

Normalisation. With ``task_loss`` the *mean* loss over a mini-batch and N the number of training
examples, the per-step objective is::

    loss = task_loss + tau(step) / N * complexity,   complexity = -log p(w) - log p(mixture)

which is the paper's objective ``-sum_n log p(t_n | x_n, w) - tau * log p(w, mixture)`` divided by N.
So the paper's tau = 0.05 is ``tau=0.05`` here, and the reference tutorial's ``tau/N`` scaling with
tau = 0.003 is ``tau=0.003``. ``tau(step)`` rises linearly from 0 over ``warmup_steps`` (reproductions
found warm-up essential: a full-strength prior before the mixture has adapted drags weights to zero).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gmm_quant._util.partials import carrying
from gmm_quant.core import mixture as mx
from gmm_quant.core import unit_prior
from gmm_quant.core.rules import Plan, flatten, replace_leaves


class LearningRates(NamedTuple):
    """Adam learning rates of the four kinds of trainable values (defaults: reference tutorial)."""

    weights: float = 5e-4
    means: float = 1e-4
    log_precisions: float = 3e-3
    mixing: float = 3e-3


def init_mixtures(plan: Plan, params, *, init_range=None) -> dict:
    """{group: MixtureState} with each group's means spanning its weights' range."""
    return {
        group: mx.init_mixture(config, plan.group_weights(params, group), init_range=init_range)
        for group, config in plan.mixtures.items()
    }


def complexity(plan: Plan, mixtures: dict, params, *, exact: bool = False, placement=None,
               learn_mixture: bool = True) -> jax.Array:  # fmt: skip
    """-log p(w, mixture) summed over every group of the plan; with a ``scale.placement.Placement``
    (and its mesh set), sharded layers are summed where they live. ``learn_mixture`` False: the
    mixtures take no gradient (the cheaper evaluation, ``mixture.log_prob``). Leaves whose rule has a
    ``unit_prior`` add that strength times the unit prior's -log p (``core.unit_prior``)."""
    total = jnp.zeros((), jnp.float32)
    for group, config in plan.mixtures.items():
        weights = plan.group_weights(params, group)
        specs = None if placement is None else [placement.spec(p) for p in plan.group_paths(group)]
        state = mixtures[group]
        total = total - mx.log_prob(
            config, state, weights, exact=exact, specs=specs, learn_mixture=learn_mixture
        )
        total = total - mx.hyper_log_prob(config, state)
    units = {p: r.unit_prior for p, r in plan.rules.items() if r.unit_prior > 0 and not r.keep_float}
    if units:
        flat = flatten(params)
        for path, strength in units.items():
            total = total + strength * unit_prior.neg_log_prob(flat[path])
    return total


def snapped(plan: Plan, mixtures: dict, params):
    """``params`` with every quantised leaf on its group's nearest centre (0 included) in the forward
    pass and the gradient passing straight through to the weights: the task sees the weights as
    snapping will leave them. The centres take no gradient from it."""
    flat, new = flatten(params), {}
    for group in plan.mixtures:
        means = jax.lax.stop_gradient(mixtures[group].means)
        centres = jnp.concatenate([jnp.zeros((1,), means.dtype), means])
        for path in plan.group_paths(group):
            w = flat[path]
            nearest = centres[jnp.argmin(jnp.abs(w[..., None] - centres.astype(w.dtype)), axis=-1)]
            new[path] = w + jax.lax.stop_gradient(nearest.astype(w.dtype) - w)
    return replace_leaves(params, new)


def tau_schedule(tau: float, warmup_steps: int = 0) -> optax.Schedule:
    """tau rising linearly from 0 to ``tau`` over ``warmup_steps``, then constant."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if warmup_steps <= 0:
        return optax.constant_schedule(tau)
    return optax.linear_schedule(0.0, tau, warmup_steps)


def joint_loss(task_loss, plan: Plan, tau, num_train: int, placement=None, mixture_every: int = 1,
               snap_from: int | None = None):  # fmt: skip
    """Loss over ``{"params", "mixtures"}``: task_loss(params, x, y) + tau(step) / N * complexity.

    Args:
      task_loss: ``(params, x, y) -> (mean loss, aux)``.
      tau: a float or an optax schedule of the step.
      num_train: N, the number of training examples.
      placement: where the weights live on a mesh (``scale.placement``), or None (one device).
      mixture_every: k > 1 gives the mixture a gradient on every k-th step only (steps k-1, 2k-1, ...;
        ``joint_optimizer(mixture_every=k)`` updates it then): the other steps skip the histogram of
        the weights that carries it, the largest part of the prior's cost on large layers.
      snap_from: from this step on the task loss sees the weights snapped (``snapped``: forward on
        the nearest centres, gradient straight through), so the weights learn what snapping will
        cost them while the prior still pulls them; None: never.

    Returns ``(trainable, x, y, step) -> (loss, aux)`` with ``aux["complexity"]`` added (a
    ``jax.tree_util.Partial`` over ``task_loss``, see ``loop.carrying``).
    """
    schedule = tau if callable(tau) else optax.constant_schedule(tau)

    def prior(params, mixtures):
        return complexity(plan, mixtures, params, placement=placement)

    def frozen(params, mixtures):  # no cotangent for the mixture: its histogram is never built
        stopped = jax.lax.stop_gradient(mixtures)
        return complexity(plan, stopped, params, placement=placement, learn_mixture=False)

    def loss(task_loss, trainable, x, y, step, **mode):  # mode: a model's state and RNG in train mode
        seen = trainable["params"]
        if snap_from is not None:
            hard = snapped(plan, trainable["mixtures"], seen)
            seen = jax.tree.map(lambda h, w: jnp.where(step >= snap_from, h, w), hard, seen)
        task, aux = task_loss(seen, x, y, **mode)
        args = trainable["params"], trainable["mixtures"]
        if mixture_every > 1:
            comp = jax.lax.cond(step % mixture_every == mixture_every - 1, prior, frozen, *args)
        else:
            comp = prior(*args)
        return task + schedule(step) / num_train * comp, {**aux, "complexity": comp}

    return carrying(loss, task_loss)  # a distillation teacher's arrays travel as arguments


def _label(path, _leaf) -> str:
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if keys[0] == "params":
        return "weights"
    return {"means": "means", "log_precisions": "log_precisions"}.get(keys[-1], "mixing")


def joint_optimizer(rates: LearningRates = LearningRates(), mixture_every: int = 1):
    """Adam with separate learning rates for weights, means, log-precisions and mixing logits.

    Works on the ``{"params": ..., "mixtures": {group: MixtureState}}`` pytree of ``joint_loss``. With
    ``mixture_every`` k > 1 the mixture's Adam steps once per k steps (``optax.MultiSteps``), on the
    step where ``joint_loss(mixture_every=k)`` gives it a gradient.
    """
    transforms = {name: optax.adam(lr) for name, lr in rates._asdict().items()}
    if mixture_every > 1:
        for name in ("means", "log_precisions", "mixing"):
            multi = optax.MultiSteps(transforms[name], every_k_schedule=mixture_every)
            transforms[name] = multi.gradient_transformation()
    return optax.multi_transform(transforms, lambda tree: jax.tree_util.tree_map_with_path(_label, tree))
