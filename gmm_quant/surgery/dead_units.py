"""Dead units disconnected: the weights that read a unit whose every input weight is zero are zeroed,
and their constant contribution is folded into the reading layer's bias. The model's outputs do not
change; the Han count, the .gqz and the ONNX graph stop paying for those weights.

A unit is an output feature of a kernel: a column of a dense kernel, a filter of a convolution. When
every weight into it is zero its value no longer depends on the input: it is the layer's bias passed
through per-feature operations (a bias add, an activation, BatchNorm in inference, max pooling, a
spatial mean, flattening a feature map). A forward pass traced with ``jax.make_jaxpr`` and evaluated
on a sample one operation at a time (``unit_flow.readers``) follows every unit that way to the next
kernel that reads it, ``x @ W2`` or a convolution, where the dead features are constants ``fill``:
their rows of ``W2`` become zero (index 0, the zero component) and ``fill @ W2[rows]`` is added to
that layer's bias. Zeroed rows can kill the reading layer's own units, so it repeats until nothing
changes.

Left alone: a kernel or bias read more than once (tied or reused weights); rows whose fill is not zero
when the reading layer has no bias of its own, a coded one (``float_bits``) or padding (a padded
convolution sees the constant only inside the image); anything inside a scan or a loop; any path
through an operation that mixes features (LayerNorm, attention, a residual add).

Invariants (tests/test_dead_units.py): the outputs on the sample are those of the model given (to
float rounding; checked, and on a mismatch nothing changes); the only weights changed are rows that
read a dead unit, set to zero; the codebooks still dequantize to the weights.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from gmm_quant.core.codebook import Codebook
from gmm_quant.core.rules import flatten, replace_leaves
from gmm_quant.surgery import unit_flow

MAX_ROUNDS = 8
TOLERANCE = 1e-4  # of the outputs' largest magnitude: a fold reorders a sum, nothing more
EPSILONS = 4  # or this many of the outputs' own epsilon, if coarser (bf16)


class Disconnected(NamedTuple):
    """The model with its dead units disconnected: ``params`` and ``codebooks`` as given but for the
    zeroed rows and the biases they were folded into; ``weights`` {kernel: weights set to zero}."""

    params: object
    codebooks: dict
    weights: dict


def dead_units(kernel, out_axis: int) -> np.ndarray:
    """The units (indices along ``out_axis``) of ``kernel`` whose weights are all zero."""
    w = np.moveaxis(np.asarray(kernel), out_axis, -1)
    return np.flatnonzero(~np.any(w.reshape(-1, w.shape[-1]) != 0, axis=0))


def disconnect(apply_fn, params, codebooks: dict, sample, coded=()) -> Disconnected:
    """``params`` and ``codebooks`` with every weight that reads a dead unit zeroed (module
    docstring). ``coded``: the float leaves on grids of their own, whose values must not move."""
    trace = unit_flow.Trace(apply_fn, params, sample)
    flat, books = dict(flatten(params)), dict(codebooks)
    reference, changed = None, {}
    for round_ in range(MAX_ROUNDS + 1):  # the last walk only evaluates the outputs
        found = trace.readers(flat)
        reference = found.outputs if reference is None else reference
        edits = (
            [_edit(r, flat, books, found.uses, coded) for r in found.readers] if round_ < MAX_ROUNDS else []
        )
        edits = [e for e in edits if e is not None]
        if not edits:
            break
        for kernel, rows, axis, bias, shift in edits:
            zeroed = int(np.count_nonzero(np.take(np.asarray(flat[kernel]), rows, axis=axis)))
            changed[kernel] = changed.get(kernel, 0) + zeroed
            flat[kernel] = _zero_rows(flat[kernel], rows, axis)
            books[kernel] = books[kernel]._replace(indices=_zero_rows(books[kernel].indices, rows, axis))
            if bias is not None:
                flat[bias] = (np.asarray(flat[bias], np.float64) + shift).astype(np.asarray(flat[bias]).dtype)
    if not changed or not _agree(reference, found.outputs):
        return Disconnected(params, codebooks, {})
    return Disconnected(replace_leaves(params, flat), books, changed)


def _edit(reader: unit_flow.Reader, flat: dict, books: dict, uses, coded):
    """``(kernel, rows, in_axis, bias or None, shift)`` for one reading kernel, or None."""
    kernel, producer = reader.kernel, reader.tag.producer
    if kernel not in books or not isinstance(books[kernel], Codebook) or uses[kernel] != 1:
        return None
    dead = dead_units(flat[producer], reader.tag.out_axis)
    feats = np.flatnonzero(np.isin(reader.tag.units, dead) & reader.steady)
    w = np.asarray(flat[kernel], np.float64)
    reads = np.moveaxis(w, reader.in_axis, 0).reshape(w.shape[reader.in_axis], -1)
    rows = feats[np.any(reads[feats] != 0, axis=1)]
    bias = reader.bias
    foldable = bias is not None and uses[bias] == 1 and bias not in coded and bias not in books
    if reader.padded or not foldable:
        rows, bias = rows[reader.fill[rows] == 0], None
    if not rows.size:
        return None
    shift = _contribution(w, rows, reader)
    return kernel, rows, reader.in_axis, (bias if np.any(shift) else None), shift


def _contribution(w: np.ndarray, rows: np.ndarray, reader: unit_flow.Reader) -> np.ndarray:
    """What the constant features ``rows`` add to each output unit: ``sum fill[r] * w[r]`` over the
    rows and, for a convolution, its taps."""
    shape = [1] * w.ndim
    shape[reader.in_axis] = rows.size
    part = np.take(w, rows, axis=reader.in_axis) * reader.fill[rows].reshape(shape)
    part = np.moveaxis(part, reader.out_axis, -1)
    return part.reshape(-1, part.shape[-1]).sum(axis=0)


def _zero_rows(array, rows: np.ndarray, axis: int) -> np.ndarray:
    out = np.array(array, copy=True)
    index = [slice(None)] * out.ndim
    index[axis] = rows
    out[tuple(index)] = 0
    return out


def _agree(reference: list, outputs: list) -> bool:
    for a, b in zip(reference, outputs, strict=True):
        dtype = np.asarray(a).dtype
        tolerance = (
            max(TOLERANCE, EPSILONS * float(jnp.finfo(dtype).eps))
            if jnp.issubdtype(dtype, jnp.floating)
            else 0
        )
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(1.0, float(np.max(np.abs(a), initial=0.0)))
        if a.shape != b.shape or np.max(np.abs(a - b), initial=0.0) > tolerance * scale:
            return False
    return True
