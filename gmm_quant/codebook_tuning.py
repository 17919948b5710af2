"""Codebook fine-tuning: train the centres with every weight's assignment fixed.

The quantised leaves are ``concat([0.0], free_centres)[indices]``, so the gradient of a centre is the
sum of its members' gradients (Deep Compression's rule), the zero centre is a constant 0.0, and the
indices never change. Float leaves (biases, ``keep_float`` layers) train alongside when asked.

Grid codebooks (``grid=True``, centres ``scale * level`` for DequantizeLinear export) keep their
integer levels and train one log-scale per layer instead. The earlier scheme — free centres rounded
to the grid with a straight-through gradient — made converged models worse: Adam moves every latent
centre by about the learning rate per step whatever its gradient, so noise carries latents across
rounding boundaries, and each flip jumps all the centre's members by a whole grid step that the
straight-through gradient never saw (measured on the digits MLP in tests/test_codebook.py: the training
loss rose with rounding, not with the scale).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gmm_quant import grid as grid_lib
from gmm_quant.codebook import Codebook
from gmm_quant.rules import flatten, replace_leaves


def init_centres(codebooks: dict) -> dict:
    """Trainable part of the codebooks: ``{path: centres[1:]}`` (the zero centre is not trainable)."""
    return {path: jnp.asarray(cb.centres[1:]) for path, cb in codebooks.items()}


def grid_levels(codebooks: dict) -> tuple[dict, dict]:
    """``({path: float32 levels}, {path: log scale})`` of codebooks whose centres lie on a grid."""
    levels, log_scales = {}, {}
    for path, cb in codebooks.items():
        fitted = grid_lib.fit(cb.centres)
        if fitted is None:
            raise ValueError(f"layer {path}: centres are not on an evenly spaced grid containing zero")
        scale, _zero_point, lv = fitted
        levels[path] = jnp.asarray(lv, jnp.float32)
        log_scales[path] = jnp.log(jnp.float32(scale))
    return levels, log_scales


def _full_centres(codebooks, trainable, levels) -> dict:
    if levels is not None:
        return {p: jnp.exp(trainable["log_scales"][p]) * levels[p] for p in codebooks}
    zero = jnp.zeros((1,), jnp.float32)
    return {p: jnp.concatenate([zero, trainable["centres"][p]]) for p in codebooks}


def finetune_loss(task_loss, codebooks: dict, params, *, train_float: bool = True, grid: bool = False):
    """Loss over the trainable part of fine-tuning; returns ``(trainable, loss_fn, build)``.

    ``trainable`` holds ``"centres"`` (or ``"log_scales"`` with ``grid``) and, with ``train_float``,
    ``"float"``. ``build(trainable)`` gives the full params; ``loss_fn(trainable, x, y, step)`` the
    task loss.
    """
    flat = flatten(params)
    levels = None
    if grid:
        levels, log_scales = grid_levels(codebooks)
        trainable = {"log_scales": log_scales}
    else:
        trainable = {"centres": init_centres(codebooks)}
    if train_float:
        trainable["float"] = {p: leaf for p, leaf in flat.items() if p not in codebooks}
    indices = {p: jnp.asarray(cb.indices, jnp.int32) for p, cb in codebooks.items()}

    def build(tr):
        base = replace_leaves(params, tr.get("float", {}))
        full = _full_centres(codebooks, tr, levels)
        return replace_leaves(base, {p: full[p][indices[p]] for p in codebooks})

    def loss_fn(tr, x, y, step):
        del step
        return task_loss(build(tr), x, y)

    return trainable, loss_fn, build


def _exact_scale(log_scale) -> np.float32:
    """The scale rounded to 16 significant bits, so ``level * scale`` is exact in float32 for
    |level| <= 255 and ``grid.fit`` recovers the grid bit for bit."""
    mantissa, exponent = np.frexp(np.float64(np.exp(np.float64(log_scale))))
    return np.float32(np.ldexp(np.round(np.ldexp(mantissa, 16)), int(exponent) - 16))


def updated_codebooks(codebooks: dict, trainable: dict) -> dict:
    """Codebooks with the fine-tuned centres (indices unchanged, zero still exactly 0.0)."""
    out = {}
    for path, cb in codebooks.items():
        if "log_scales" in trainable:
            _scale, _zp, lv = grid_lib.fit(cb.centres)
            full = (lv * _exact_scale(trainable["log_scales"][path])).astype(np.float32)
        else:
            full = np.concatenate(
                [np.zeros(1, np.float32), np.asarray(trainable["centres"][path], np.float32)]
            )
        out[path] = Codebook(full, cb.indices)
    return out
