"""Codebook fine-tuning: train the centres with every weight's assignment fixed.

The quantised leaves are ``concat([0.0], free_centres)[indices]``, so the gradient of a centre is the
sum of its members' gradients (Deep Compression's rule), the zero centre is a constant 0.0, and the
indices never change. Float leaves (biases, ``keep_float`` layers) train alongside when asked.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gmm_quant import grid
from gmm_quant.codebook import Codebook
from gmm_quant.rules import flatten, replace_leaves


def init_centres(codebooks: dict) -> dict:
    """Trainable part of the codebooks: ``{path: centres[1:]}`` (the zero centre is not trainable)."""
    return {path: jnp.asarray(cb.centres[1:]) for path, cb in codebooks.items()}


def effective_centres(centres: dict, grid_scales: dict | None = None) -> dict:
    """The free centres as used by the model: rounded onto each layer's grid when scales are given."""
    if not grid_scales:
        return centres
    return {p: grid.project(c, grid_scales[p]) for p, c in centres.items()}


def apply_centres(codebooks: dict, centres: dict, params, grid_scales: dict | None = None):
    """``params`` with each quantised leaf rebuilt as ``concat([0], centres[path])[indices]``."""
    new = {}
    centres = effective_centres(centres, grid_scales)
    for path, cb in codebooks.items():
        full = jnp.concatenate([jnp.zeros((1,), jnp.float32), centres[path]])
        new[path] = full[jnp.asarray(cb.indices, jnp.int32)]
    return replace_leaves(params, new)


def finetune_loss(task_loss, codebooks: dict, params, *, train_float: bool = True, grid_scales=None):
    """Loss over ``{"centres", "float"}`` for fine-tuning; returns ``(trainable, loss_fn, build)``.

    ``build(trainable)`` gives the full params; ``loss_fn(trainable, x, y, step)`` the task loss.
    With ``grid_scales`` ({path: scale}) the centres are used rounded to multiples of the scale
    (straight-through gradient), so the result is exportable with DequantizeLinear.
    """
    flat = flatten(params)
    trainable = {"centres": init_centres(codebooks)}
    if train_float:
        trainable["float"] = {p: leaf for p, leaf in flat.items() if p not in codebooks}

    def build(tr):
        base = replace_leaves(params, tr.get("float", {}))
        return apply_centres(codebooks, tr["centres"], base, grid_scales)

    def loss_fn(tr, x, y, step):
        del step
        return task_loss(build(tr), x, y)

    return trainable, loss_fn, build


def updated_codebooks(codebooks: dict, centres: dict, grid_scales: dict | None = None) -> dict:
    """Codebooks with the fine-tuned centres (indices unchanged, zero still exactly 0.0)."""
    out = {}
    centres = effective_centres(centres, grid_scales)
    for path, cb in codebooks.items():
        full = np.concatenate([np.zeros(1, np.float32), np.asarray(centres[path], np.float32)])
        out[path] = Codebook(full, cb.indices)
    return out
