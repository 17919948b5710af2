"""Evenly spaced codebooks: centres exactly ``scale * (q - zero_point)``, for DequantizeLinear export.

``fit`` recognises centres already on such a grid; ``project`` moves centres onto one (used by
fine-tuning when the config asks for grid centres, with a straight-through gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def grid_scale(centres, bits: int) -> float:
    """Scale putting the largest |centre| on the outermost level of a signed ``bits``-bit grid."""
    top = float(np.max(np.abs(np.asarray(centres)))) if np.size(centres) else 0.0
    return top / (2 ** (bits - 1) - 1) if top > 0 else 1.0


def project(centres, scale):
    """Centres rounded to multiples of ``scale``; gradient passes straight through."""
    snapped = jnp.round(centres / scale) * scale
    return centres + jax.lax.stop_gradient(snapped.astype(centres.dtype) - centres)


def fit(centres):
    """(scale, zero_point, levels) with centres == float32(scale * levels), levels integers in a
    256-level range containing zero; None when the centres are not on such a grid."""
    c = np.asarray(centres, np.float32)
    nonzero = np.abs(c[c != 0])
    if nonzero.size == 0:
        return np.float32(1.0), 0, np.zeros(c.shape, np.int64)
    for candidate in sorted(set(nonzero.tolist())):
        for divisor in range(1, 128):
            scale = np.float32(candidate / divisor)
            levels = np.round(c / scale).astype(np.int64)
            if np.array_equal((levels * scale).astype(np.float32), c) and np.ptp(np.append(levels, 0)) < 256:
                low = min(int(levels.min()), 0)
                zero_point = -low
                if int(levels.max()) + zero_point > 255:
                    continue
                return scale, zero_point, levels
        break
    return None


def to_grid(codebook, bits: int = 4):
    """``codebook`` with its centres rounded onto a signed ``bits``-bit grid (equal centres merged)."""
    from gmm_quant.codebook import make_codebook

    scale = np.float32(grid_scale(codebook.centres, bits))
    levels = np.round(np.asarray(codebook.centres) / scale)
    centres = (levels * scale).astype(np.float32)
    return make_codebook(centres[codebook.indices], centres)
