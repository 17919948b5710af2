"""Where activations are quantised: the inputs of matched ``nnx.Linear`` / ``nnx.LinearGeneral`` layers.

``config.ACTIVATION_MODES`` name the weight and activation widths: ``w8a8``, ``w4a8`` (activations
8-bit unsigned, per tensor) and ``w4a16`` (activations stay floating point: weight-only
quantisation). Weights go on an evenly spaced grid of the mode's width (the ``grid_bits`` path).

``attach(model, scales)`` makes each listed layer quantise its input first, in place, without
changing any parameter path: the layer's class becomes a subclass whose ``__call__`` applies
``fake_quant`` with the layer's (scale, zero_point, bits), a static attribute ``act_quant`` (part
of the graph definition, so ``nnx.split`` / ``merge`` and the ONNX export carry it). ``calibrate``
runs the float model eagerly over calibration batches and returns each layer's input range.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmm_quant._util.hosts import to_local
from gmm_quant.core.fake_quant import fake_quant, range_params
from gmm_quant.core.rules import path_str

LAYERS = (nnx.Linear, nnx.LinearGeneral)
_SUBCLASSES: dict = {}
_RANGES: dict = {}  # calibration: {path: [lo, hi]}


def points(model, pattern: str = ".*") -> dict:
    """{path: layer} of the Linear / LinearGeneral layers whose path matches ``pattern``."""
    found = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LAYERS) and re.search(pattern, path_str(path)):
            found[path_str(path)] = node
    return found


def _quantising(cls):
    base = next(c for c in cls.__mro__ if c in LAYERS)
    if base not in _SUBCLASSES:

        def __call__(self, inputs, *args, **kwargs):
            mode = self.act_quant
            if mode[0] == "record":
                low, high = jnp.min(inputs), jnp.max(inputs)  # where the activations live: two scalars
                lo, hi = _RANGES.setdefault(mode[1], [np.inf, -np.inf])
                _RANGES[mode[1]] = [min(lo, float(to_local(low))), max(hi, float(to_local(high)))]
            else:
                inputs = fake_quant(inputs, *mode)
            return base.__call__(self, inputs, *args, **kwargs)

        _SUBCLASSES[base] = type(f"ActQuant{base.__name__}", (base,), {"__call__": __call__})
    return _SUBCLASSES[base]


def attach(model, scales: dict) -> None:
    """Quantise the input of each layer ``{path: (scale, zero_point, bits)}`` of ``model`` in place."""
    layers = points(model)
    missing = sorted(set(scales) - set(layers))
    if missing:
        raise ValueError(f"no Linear / LinearGeneral layer at {missing}")
    for path, params in scales.items():
        layer = layers[path]
        layer.__class__ = _quantising(type(layer))
        layer.act_quant = tuple(params)


def calibrate(model, pattern: str, batches, bits: int = 8) -> dict:
    """{path: (scale, zero_point, bits)} from each matched layer's input range over ``batches``
    (run eagerly on a copy; ``model`` is untouched)."""
    probe = nnx.clone(model)
    layers = points(probe, pattern)
    if not layers:
        raise ValueError(f"activation quantisation: no Linear / LinearGeneral layer matches {pattern!r}")
    for path, layer in layers.items():
        layer.__class__ = _quantising(type(layer))
        layer.act_quant = ("record", path)
        _RANGES.pop(path, None)
    for x in batches:
        probe(x)
    return {path: (*range_params(*_RANGES.pop(path), bits), bits) for path in layers}
