"""Layer reuse by model surgery: a target layer becomes the source layer plus a feature transform.

``attach(model, links)`` replaces, in place, each target module by a ``Reused`` module that holds a
*reference* to the source module (NNX shares the object: one set of ``nnx.Param``s, so
``nnx.split`` lists the source's kernel once, at the source's path, and the prior, the codebooks,
the ``.gqz`` file and the ONNX graph all see one matrix) and computes

    reused(x) = source(x) * scale + bias  [+ (x @ down) @ up]     (scale, bias: per output channel)

with an optional rank-``r`` correction (sources whose input is the last axis: ``nnx.Linear``, and
``nnx.LinearGeneral`` over ``axis=-1`` such as attention's query, key and value). The transform is
fitted to the target it replaces (``fit``): ``scale`` is the per-channel least-squares scale of the
source kernel onto the target's, ``bias = target bias - source bias * scale``, and ``down @ up`` the
best rank-r approximation (truncated SVD) of what is left, so a target that is a channel-scaled copy
of its source (plus a rank-r difference) is reproduced exactly. The identity transform (scale 1, bias 0, no
correction) computes exactly the source's output.

A layer reuses a layer before it in the model's graph order (the shared weights keep the source's
parameter path). Supported layers: ``nnx.Linear``, ``nnx.Conv`` and ``nnx.LinearGeneral`` (attention
projections; its output channels are all its output axes, e.g. heads x head_dim), with or without a
bias.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmm_quant.core.rules import path_str
from gmm_quant.surgery.reuse.candidates import output_scales
from gmm_quant.surgery.reuse.links import Link


class Reused(nnx.Module):
    """``source(x) * scale + bias (+ (x @ down) @ up)``; ``source`` is shared, not copied."""

    def __init__(self, source: nnx.Module, channels: tuple, rank: int = 0, in_features: int = 0):
        self.source = source
        self.scale = nnx.Param(jnp.ones(channels, jnp.float32))
        self.bias = nnx.Param(jnp.zeros(channels, jnp.float32))
        self.rank = rank
        if rank:
            self.down = nnx.Param(jnp.zeros((in_features, rank), jnp.float32))
            self.up = nnx.Param(jnp.zeros((rank, *channels), jnp.float32))

    def __call__(self, x, **kwargs):
        y = self.source(x, **kwargs) * self.scale[...] + self.bias[...]
        if self.rank:
            y = y + jnp.tensordot(x @ self.down[...], self.up[...], axes=1)
        return y


def modules(model) -> dict:
    """{path: module} of every module of ``model`` (a shared one at its first path)."""
    return {path_str(p): node for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}


def supported(module) -> bool:
    """A layer whose kernel ends in its output axes (see the module docstring)."""
    return isinstance(module, (nnx.Linear, nnx.Conv, nnx.LinearGeneral))


def low_rank_ok(module) -> bool:
    """Whether a rank correction ``(x @ down) @ up`` applies: the layer's input is x's last axis."""
    general = isinstance(module, nnx.LinearGeneral) and tuple(module.axis) == (-1,)
    return isinstance(module, nnx.Linear) or (general and len(module.in_features) == 1)


def channels(module) -> tuple:
    """The shape of one output position: the kernel's trailing output axes."""
    if isinstance(module, nnx.LinearGeneral):
        return tuple(module.out_features)
    return tuple(np.shape(module.kernel[...])[-1:])


def links_of(model) -> dict:
    """{target path: Link} of the ``Reused`` modules in ``model`` (what a ``.gqz`` file records)."""
    found, paths = {}, {id(m): p for p, m in modules(model).items()}
    for path, node in modules(model).items():
        if isinstance(node, Reused):
            found[path] = Link(path, paths[id(node.source)], node.rank)
    return found


def check_link(model, link: Link) -> None:
    """Raise ValueError naming the problem when ``link`` cannot be attached to ``model``."""
    found = modules(model)
    for role, path in (("target", link.target), ("source", link.source)):
        if path not in found:
            raise ValueError(f"reuse {role} {path!r} is not a module of the model")
        if not supported(found[path]):
            kind = type(found[path]).__name__
            raise ValueError(f"reuse {role} {path!r} is a {kind}: only Linear, LinearGeneral and Conv reuse")
    target, source = found[link.target], found[link.source]
    order = list(found)
    if order.index(link.source) >= order.index(link.target):  # the shared weights keep the source's path
        raise ValueError(f"layer {link.target!r} can only reuse a layer before it, not {link.source!r}")
    if any(isinstance(m, Reused) and m.source is target for m in found.values()):
        raise ValueError(f"layer {link.target!r} is reused by another layer; it cannot reuse in turn")
    if np.shape(target.kernel[...]) != np.shape(source.kernel[...]) or type(target) is not type(source):
        raise ValueError(f"reuse {link.target!r} <- {link.source!r}: the layers differ in type or shape")
    if link.rank and not low_rank_ok(source):
        raise ValueError(
            f"reuse {link.target!r}: a rank correction needs a layer whose input is its last axis"
        )
    most = min(np.shape(source.kernel[...])[0], int(np.prod(channels(source))))
    if link.rank < 0 or link.rank > most:
        raise ValueError(f"reuse {link.target!r}: rank {link.rank} outside 0..{most}")


def fit(target, source, rank: int = 0, iterations: int = 50) -> dict:
    """The transform mapping ``source`` onto ``target`` (float32 arrays; see the module docstring).

    With a rank correction, scale and correction are fitted in turn (each the exact least-squares
    answer given the other), which recovers a target that is a channel-scaled source plus a rank-r
    matrix to float precision in a few rounds."""
    out = channels(source)
    size = int(np.prod(out))
    t = np.asarray(target.kernel[...], np.float64).reshape(-1, size)
    s = np.asarray(source.kernel[...], np.float64).reshape(-1, size)
    scale, low = output_scales(t, s), None
    for _ in range(iterations if rank else 0):
        u, sv, vt = np.linalg.svd(t - s * scale, full_matrices=False)
        root = np.sqrt(sv[:rank])
        low = (u[:, :rank] * root, root[:, None] * vt[:rank])
        previous, scale = scale, output_scales(t - low[0] @ low[1], s)
        if np.allclose(scale, previous, rtol=1e-10, atol=1e-12):
            break
    t_bias = np.zeros(size) if target.bias is None else np.asarray(target.bias[...], np.float64).ravel()
    s_bias = np.zeros(size) if source.bias is None else np.asarray(source.bias[...], np.float64).ravel()
    fitted = {"scale": scale.reshape(out), "bias": (t_bias - s_bias * scale).reshape(out)}
    if low is not None:
        fitted["down"], fitted["up"] = low[0], low[1].reshape(rank, *out)
    return {k: v.astype(np.float32) for k, v in fitted.items()}


def _set_module(model, path: str, value) -> None:
    *parent, name = path.split("/")
    node = modules(model)["/".join(parent)] if parent else model
    if isinstance(node, nnx.List) or name.isdigit():
        node[int(name)] = value
    else:
        setattr(node, name, value)


def attach(model, links, *, fitted: bool = True) -> None:
    """Replace, in place, each ``link.target`` by ``Reused(link.source)``; the transform is fitted to
    the target (``fitted``) or the identity (a template to load stored values into)."""
    for link in links:
        check_link(model, link)
        found = modules(model)
        target, source = found[link.target], found[link.source]
        reused = Reused(source, channels(source), link.rank, np.shape(source.kernel[...])[0])
        if fitted:
            for name, value in fit(target, source, link.rank).items():
                getattr(reused, name)[...] = jnp.asarray(value)
        _set_module(model, link.target, reused)
