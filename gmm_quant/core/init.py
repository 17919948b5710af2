"""Initialisation by sampling: draw each layer's initial weights from the mixture prior.

For training from scratch under the prior. Each quantised leaf gets independent draws from its group's
mixture (a component by its mixing proportion, then a Gaussian draw), multiplied by
``sqrt(gain / fan_in) / std(mixture)`` so the layer's weights have the variance of a LeCun-normal
initialisation (``gain=1``) while keeping the mixture's shape. ``fan_in`` is the product of all
dimensions but the last (Flax kernels: ``[in, out]`` and ``[h, w, in, out]``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gmm_quant.core import mixture as mx
from gmm_quant.core.rules import Plan, flatten, replace_leaves


def mixture_std(config: mx.MixtureConfig, state: mx.MixtureState) -> jax.Array:
    """Standard deviation of the mixture distribution (around 0)."""
    pi = jnp.exp(mx.log_mixing_proportions(config, state))
    mu = mx.component_means(state)
    var = jnp.exp(-state.log_precisions)
    mean = jnp.sum(pi * mu)
    return jnp.sqrt(jnp.sum(pi * (var + mu * mu)) - mean * mean)


def layer_scale(config, state, shape, gain: float = 1.0) -> float:
    """Multiplier applied to mixture draws for a leaf of ``shape``."""
    fan_in = math.prod(shape[:-1]) if len(shape) > 1 else shape[0]
    return float(math.sqrt(gain / fan_in) / mixture_std(config, state))


def sample_params(plan: Plan, mixtures: dict, params, key, *, gain: float | None = 1.0):
    """``params`` with every quantised leaf redrawn from its mixture.

    ``gain=None`` draws unscaled from the mixture (weights then follow the mixture exactly).
    """
    flat = flatten(params)
    new = {}
    for i, path in enumerate(plan.quantised()):
        group = plan.group_of(path)
        config, state = plan.mixtures[group], mixtures[group]
        shape = flat[path].shape
        scale = 1.0 if gain is None else layer_scale(config, state, shape, gain)
        draw = mx.sample(config, state, jax.random.fold_in(key, i), shape, scale)
        new[path] = draw.astype(flat[path].dtype)
    return replace_leaves(params, new)
