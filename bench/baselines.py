"""Baselines users would pick instead of soft weight-sharing, on the same pretrained weights.

* Deep Compression's recipe: per-layer 1-D k-means (linear initialisation) with as many clusters as
  soft weight-sharing keeps, optionally after magnitude pruning to the same per-layer sparsity (zero is
  then a fixed centre), followed by centroid fine-tuning with assignments fixed (``gq.finetune``).
* Uniform post-training quantisation per tensor: symmetric int8 / int4 (zero exactly representable).

Each returns codebooks in the library's format so the same accounting and evaluation apply.
"""

from __future__ import annotations

import numpy as np

import gmm_quant as gq
from gmm_quant.core.codebook import Codebook, index_dtype, kmeans_1d


def kmeans_codebook(weights: np.ndarray, k: int, keep_fraction: float | None = None) -> Codebook:
    """k-means codebook of one layer; with ``keep_fraction`` the smallest weights are pruned first."""
    w = np.asarray(weights, np.float32)
    if keep_fraction is None:
        centres = kmeans_1d(w, k)
        # a k-means codebook has no exact zero: put its centre nearest zero at index 0 by a shift-free
        # reorder (the Codebook's zero slot stays unused: no weight snaps to 0.0 unless a centre is 0)
        return _unsorted_codebook(w, centres)
    keep = max(1, round(keep_fraction * w.size))
    threshold = np.sort(np.abs(w).ravel())[::-1][keep - 1]
    mask = np.abs(w) >= threshold
    centres = kmeans_1d(w[mask], max(k - 1, 1))
    indices = np.zeros(w.shape, index_dtype(len(centres) + 1))
    indices[mask] = gq.snap(w[mask], centres).astype(indices.dtype) + 1
    return Codebook(np.concatenate([np.zeros(1, np.float32), centres]), indices)


def magnitude_masks(params, keep: dict) -> dict:
    """{path: 0/1 mask} keeping the ``keep[path]`` fraction of largest-magnitude weights per layer."""
    flat = gq.core.rules.flatten(params)
    masks = {}
    for path, fraction in keep.items():
        w = np.abs(np.asarray(flat[path]))
        count = max(1, round(fraction * w.size))
        threshold = np.sort(w.ravel())[::-1][count - 1]
        masks[path] = (w >= threshold).astype(np.float32)
    return masks


def retrain_pruned(apply_fn, params, masks: dict, data, *, epochs, batch_size, learning_rate=1e-4):
    """Deep Compression's pruning step: zero the masked weights and retrain the survivors."""
    import jax.numpy as jnp

    def masked(p):
        return gq.core.rules.replace_leaves(
            p, {k: gq.core.rules.flatten(p)[k] * jnp.asarray(m) for k, m in masks.items()}
        )

    task = gq.cross_entropy(apply_fn)
    params = masked(params)

    def task_loss(p, x, y):
        return task(masked(p), x, y)

    params = gq.pretrain(
        apply_fn,
        params,
        data,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        task_loss=task_loss,
    )
    return masked(params)


def _unsorted_codebook(w, centres):
    full = np.concatenate([np.zeros(1, np.float32), centres])
    indices = (gq.snap(w, centres).astype(np.int64) + 1).astype(index_dtype(len(full)))
    return Codebook(full, indices)


def uniform_codebook(weights: np.ndarray, bits: int) -> Codebook:
    """Symmetric per-tensor uniform quantisation to ``bits`` bits: levels s * q, q in [-(2^(b-1)-1), ...]."""
    w = np.asarray(weights, np.float32)
    top = 2 ** (bits - 1) - 1
    scale = np.float32(np.abs(w).max() / top)
    q = np.clip(np.round(w / scale), -top, top).astype(np.int64)
    levels = np.unique(q)
    centres = (levels * scale).astype(np.float32)
    order = np.argsort(centres != 0, kind="stable")  # zero first
    centres, levels = centres[order], levels[order]
    if centres[0] != 0:
        centres, levels = np.concatenate([[0.0], centres]).astype(np.float32), np.concatenate([[0], levels])
    lookup = {int(v): i for i, v in enumerate(levels)}
    indices = np.vectorize(lookup.__getitem__, otypes=[np.int64])(q).astype(index_dtype(len(centres)))
    return Codebook(centres, indices)
