"""A group prior over units: whole input and output features of a weight driven to zero together.

A unit of a weight ``W`` of two or more dimensions is a slice along one of its last two axes: an
output unit is everything feeding one output feature (a column of a dense kernel ``[in, out]``, a
filter of a convolution kernel ``[kh, kw, in, out]``), an input unit everything reading one input
feature (a row, an input channel). For an attention projection stored ``[in, heads, head_dim]``
(``nnx.MultiHeadAttention``'s query, key and value) the last two axes are the heads and the head
dimensions, so its "input units" are whole heads. Each unit ``g`` of ``d_g`` weights gets the group
normal-Jeffreys prior of Bayesian Compression (Louizos, Ullrich & Welling 2017) with its scale
integrated out, ``p(w_g) ∝ ||w_g||^(-d_g)``, kept finite at zero by a floor on the unit's mean square::

    -log p(W) = sum over units g of  d_g / 2 * log(mean(w_g ** 2) + floor ** 2)     (+ a constant)

Its gradient ``w / (mean(w_g ** 2) + floor ** 2)`` is a Gaussian pull whose variance is the unit's
own mean square: a unit the data does not hold up shrinks ever faster until it reaches the floor,
where the mixture's zero component snaps it to exactly 0. A unit that is all zero is then removed from
the ONNX graph (``formats.onnx_export.units``) and costs nothing in the Han count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FLOOR = 1e-3  # root mean square below which a unit's prior stops pulling (well inside the zero component)


def unit_axes(ndim: int) -> tuple[int, ...]:
    """The axes whose slices are units: the output features (last axis) and the input features (the
    one before it); none for a leaf of fewer than 2 dimensions."""
    return (ndim - 1, ndim - 2) if ndim >= 2 else ()


def neg_log_prob(weights: jax.Array, floor: float = FLOOR) -> jax.Array:
    """-log p(W) of the unit prior up to a constant (module docstring), summed over the output and the
    input units of ``weights``; 0.0 for a leaf of fewer than 2 dimensions."""
    w = jnp.asarray(weights, jnp.float32)
    total = jnp.zeros((), jnp.float32)
    for axis in unit_axes(w.ndim):
        others = tuple(a for a in range(w.ndim) if a != axis)
        mean_square = jnp.mean(jnp.square(w), axis=others)
        size = w.size // w.shape[axis]
        total = total + 0.5 * size * jnp.sum(jnp.log(mean_square + floor**2))
    return total


def live_units(weights) -> tuple[int, ...]:
    """(live output units, live input units) of ``weights``: the slices with a non-zero weight;
    () for a leaf of fewer than 2 dimensions."""
    w = np.asarray(weights)
    out = []
    for axis in unit_axes(w.ndim):
        others = tuple(a for a in range(w.ndim) if a != axis)
        out.append(int(np.count_nonzero(np.any(w != 0, axis=others))))
    return tuple(out)
