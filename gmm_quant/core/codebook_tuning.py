"""Codebook fine-tuning: train the centres with every weight's assignment fixed.

The quantised leaves are ``concat([0.0], free_centres)[indices]``, so the gradient of a centre is the
sum of its members' gradients (Deep Compression's rule), the zero centre is a constant 0.0, and the
indices never change. Float leaves (biases, ``keep_float`` layers) train alongside when asked.

Grid codebooks (``grid=True``, centres ``scale * level`` for DequantizeLinear export) train latent
centres that the model uses rounded to the layer's grid, with a straight-through gradient. A centre
whose best value lies between two levels makes its latent hover at the rounding boundary and flip all
its members by a whole grid step back and forth; the last flip decides, and a converged model can end
worse than it started. ``finetuning.keep_better`` therefore compares the full training loss before and
after and keeps the better. Measured alternatives (BENCHMARKS.md, "Grid fine-tuning"): training one
scale per layer with the levels fixed never raised the loss either, but lowered it less than the
rounded centres in all three settings tried, so the rounded centres stay.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from gmm_quant._util.partials import carrying
from gmm_quant.core import float_codes
from gmm_quant.core import grid as grid_lib
from gmm_quant.core.codebook import Codebook, lookup, remake
from gmm_quant.core.rules import flatten


def init_centres(codebooks: dict) -> dict:
    """Trainable part of the codebooks: ``{path: centres[1:]}`` (the zero centre is not trainable); a
    layer pruned to zero entirely has nothing to train and is left out (no zero-size leaves, which
    checkpoints cannot store)."""
    return {path: jnp.asarray(cb.centres[..., 1:]) for path, cb in codebooks.items() if cb.k > 1}


def _free(centres: dict, path: str):
    """A layer's free centres, none for a layer pruned to zero entirely."""
    return centres[path] if path in centres else np.zeros((0,), np.float32)


def grid_scales(codebooks: dict) -> dict:
    """``{path: (scale, limit)}`` of codebooks whose centres lie on a grid (``grid.fit``): ``limit`` is
    the outermost level of the signed 4-bit (7) or 8-bit (127) grid the centres fit in."""
    scales = {}
    for path, cb in codebooks.items():
        if cb.slices > 1:
            raise ValueError(f"layer {path}: a codebook per slice (Rule per_slice) has no grid form; "
                             "drop per_slice or grid_bits")  # fmt: skip
        fitted = grid_lib.fit(cb.centres)
        if fitted is None:
            raise ValueError(f"layer {path}: centres are not on an evenly spaced grid containing zero")
        top = int(np.abs(fitted[2]).max())
        scales[path] = (float(fitted[0]), 7 if top <= 7 else 127)
    return scales


def effective_centres(centres: dict, scales: dict | None = None) -> dict:
    """The free centres as the model uses them: rounded onto each layer's grid when ``scales`` given."""
    if not scales:
        return centres
    return {p: grid_lib.project(c, *scales[p]) for p, c in centres.items()}


def finetune_loss(task_loss, codebooks: dict, params, *, train_float: bool = True, grid: bool = False,
                  float_grids=None):  # fmt: skip
    """Loss over ``{"centres", "float"}`` for fine-tuning; returns ``(trainable, loss_fn, build)``.

    ``build(trainable)`` gives the full params; ``loss_fn(trainable, x, y, step)`` the task loss (a
    ``jax.tree_util.Partial`` over the indices, see ``loop.arguments``).
    With ``grid`` the centres are used rounded onto each layer's grid (straight-through gradient);
    ``float_grids`` ({path: (scale, zero_point, bits)}, see ``float_codes``) does the same for the
    float leaves it names.
    """
    flat = flatten(params)
    scales = grid_scales(codebooks) if grid else None
    trainable = {"centres": init_centres(codebooks)}
    if train_float:
        trainable["float"] = {p: leaf for p, leaf in flat.items() if p not in codebooks}
    indices = {p: jnp.asarray(cb.indices, jnp.int32) for p, cb in codebooks.items()}
    trained = trainable.get("float", {})
    fixed = {p: leaf for p, leaf in flat.items() if p not in codebooks and p not in trained}
    treedef, paths = jax.tree.structure(params), list(flat)
    float_grids = float_grids or {}

    def assemble(indices, fixed, tr):
        floats = {p: float_codes.project(v, *float_grids[p]) if p in float_grids else v
                  for p, v in tr.get("float", {}).items()}  # fmt: skip
        centres = effective_centres(tr["centres"], scales)
        snapped = {p: lookup(_with_zero(_free(centres, p)), indices[p]) for p in codebooks}
        leaves = {**fixed, **floats, **snapped}
        return jax.tree.unflatten(treedef, [leaves[p] for p in paths])

    def loss_fn(task_loss, indices, fixed, tr, x, y, step, **mode):
        del step
        return task_loss(assemble(indices, fixed, tr), x, y, **mode)

    # the indices (and leaves held fixed) travel as arguments: a sharded layer's may span processes
    loss = carrying(loss_fn, task_loss, indices, fixed)
    return trainable, loss, lambda tr: assemble(indices, fixed, tr)


def _with_zero(free):
    """The full centres: a zero column in front of the free ones (per row when coded per slice)."""
    return jnp.concatenate([jnp.zeros((*free.shape[:-1], 1), jnp.float32), free], axis=-1)


def updated_codebooks(codebooks: dict, trainable: dict, grid: bool = False) -> dict:
    """Codebooks with the fine-tuned centres: every weight keeps its centre, zero stays exactly 0.0;
    centres that became equal (two latents rounded onto one grid level) are merged into one."""
    scales = grid_scales(codebooks) if grid else None
    centres = effective_centres(trainable["centres"], scales)
    out = {}
    for path, cb in codebooks.items():
        free = np.asarray(centres[path], np.float32) if path in centres else cb.centres[..., 1:]
        full = np.asarray(_with_zero(jnp.asarray(free)))
        out[path] = remake(Codebook(full, cb.indices).dequantize(), full)  # sharded: stays so
        if grid and grid_lib.fit(out[path].centres) is None:  # keep the promise: exportable as a grid
            warnings.warn(
                f"layer {path}: fine-tuned centres {out[path].centres.tolist()} left the grid of scale "
                f"{scales[path][0]!r}; rounded back onto one",
                stacklevel=2,
            )
            out[path] = grid_lib.to_grid(out[path], 4 if scales[path][1] <= 7 else 8)
    return out
