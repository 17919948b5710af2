"""The values a jaxpr walk passes between handlers, shared by the converter and dead-unit removal:
``Sym`` (computed in the graph), ``Narrow`` (a value with dead units removed), ``WeightRef`` (a
quantised weight decoded on first use), and the layout permutations between JAX and ONNX tensors."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Sym(NamedTuple):
    """A value computed in the graph: ONNX tensor ``name`` = transpose(JAX value, ``perm``)."""

    name: str
    perm: tuple
    shape: tuple  # the JAX (logical) shape at trace time


class Narrow(NamedTuple):
    """A value whose last axis holds ``live`` features in the graph (``sym``) and constants ``fill``
    at the other positions (``dead``) of a full width ``width``."""

    sym: Sym
    live: np.ndarray
    dead: np.ndarray
    fill: np.ndarray  # float32 [len(dead)]
    shape: tuple  # the full logical shape


def identity(n):
    return tuple(range(n))


def inverse(perm):
    return tuple(int(i) for i in np.argsort(perm))


def compose(perm, logical):
    """Layout of transpose(value, logical) when value's ONNX tensor has layout ``perm``."""
    inv = inverse(logical)
    return tuple(inv[i] for i in perm)


class WeightRef:
    """A quantised weight, emitted lazily in the layout its consumer needs (indices permuted offline).

    With its ``codebook`` and the encoding's factory ``make`` it can also be cut to a sub-matrix
    (``subset``, used to remove dead units)."""

    def __init__(self, path: str, encoder, shape, codebook=None, make=None):
        self.path, self.encoder, self.shape = path, encoder, tuple(shape)
        self.codebook, self.make = codebook, make
        self._cache = {}

    def subset(self, rows, cols) -> WeightRef:
        cb = self.codebook
        centres = cb.centres[rows] if cb.slices > 1 else cb.centres  # a codebook per row: kept rows'
        cb = cb._replace(centres=centres, indices=np.asarray(cb.indices)[rows][:, cols])
        return WeightRef(f"{self.path}/live", self.make(cb), cb.indices.shape, cb, self.make)

    def materialise(self, conv, perm) -> Sym:
        perm = tuple(perm)
        if perm not in self._cache:
            self._cache[perm] = Sym(self.encoder(conv, self.path, perm), perm, self.shape)
        return self._cache[perm]
