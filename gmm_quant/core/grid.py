"""Evenly spaced codebooks: centres exactly ``scale * (q - zero_point)``, for DequantizeLinear export.

``fit`` recognises centres already on such a grid; ``to_grid`` moves a codebook onto one; ``project``
rounds centres onto a grid with a straight-through gradient (grid fine-tuning, ``codebook_tuning``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def grid_scale(centres, bits: int) -> float:
    """Scale putting the largest |centre| on the outermost level of a signed ``bits``-bit grid."""
    top = float(np.max(np.abs(np.asarray(centres)))) if np.size(centres) else 0.0
    return top / (2 ** (bits - 1) - 1) if top > 0 else 1.0


def project(centres, scale, limit=None):
    """Centres rounded to multiples of ``scale`` (levels clipped to [-limit, limit], so that fine-tuning
    never leaves the grid's bit width); gradient passes straight through."""
    levels = jnp.round(centres / scale)
    if limit is not None:
        levels = jnp.clip(levels, -limit, limit)
    snapped = levels * scale
    return centres + jax.lax.stop_gradient(snapped.astype(centres.dtype) - centres)


def fit(centres):
    """(scale, zero_point, levels) with ``centres == float32(levels * scale)`` exactly and
    ``levels + zero_point`` in 0..255; None when the centres are not on such a grid.

    Candidate scales: every non-zero |centre| divided by 1, 2, ..., 255, and the float32 values a few
    units in the last place either side; the largest candidate that reproduces every centre wins.
    """
    c = np.asarray(centres, np.float32)
    nonzero = np.unique(np.abs(c[c != 0]))
    if nonzero.size == 0:
        return np.float32(1.0), 0, np.zeros(c.shape, np.int64)
    scales = np.unique(_near((nonzero[:, None] / np.arange(1, 256)).astype(np.float32).ravel()))[::-1]
    scales = scales[scales > 0]
    levels = np.round(c[None, :] / scales[:, None]).astype(np.int64)
    exact = np.all((levels * scales[:, None]).astype(np.float32) == c[None, :], axis=1)
    span = levels.max(axis=1) - np.minimum(levels.min(axis=1), 0) <= 255
    hits = np.flatnonzero(exact & span)
    if hits.size == 0:
        return None
    best = levels[hits[0]]
    return scales[hits[0]], -min(int(best.min()), 0), best


def _near(x: np.ndarray, ulps: int = 3) -> np.ndarray:
    """``x`` and the float32 values up to ``ulps`` units in the last place either side of each."""
    out, up, down = [x], x, x
    for _ in range(ulps):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
        out += [up, down]
    return np.concatenate(out)


def to_grid(codebook, bits: int = 4):
    """``codebook`` with its centres rounded onto a signed ``bits``-bit grid (equal centres merged);
    a codebook already on such a grid is returned unchanged."""
    from gmm_quant.core.codebook import Codebook, make_codebook  # codebook imports nothing of this

    if np.ndim(codebook.centres) != 1:
        raise ValueError("a codebook per slice (Rule per_slice) has no grid form; drop per_slice or the grid")
    fitted = fit(codebook.centres)
    if fitted is not None and int(np.abs(fitted[2]).max()) <= 2 ** (bits - 1) - 1:
        return codebook
    scale = np.float32(grid_scale(codebook.centres, bits))
    levels = np.round(np.asarray(codebook.centres) / scale)
    centres = (levels * scale).astype(np.float32)
    return make_codebook(Codebook(centres, codebook.indices).dequantize(), centres)


def codebooks_to_grid(codebooks: dict, params, bits: int):
    """``(codebooks, params)`` with every codebook on a signed ``bits``-bit grid (``to_grid``) and the
    quantised leaves of ``params`` rebuilt from them: the grid step of compression and fine-tuning."""
    from gmm_quant.core.codebook import dequantize

    codebooks = {p: to_grid(cb, bits) for p, cb in codebooks.items()}
    return codebooks, dequantize(codebooks, params)
