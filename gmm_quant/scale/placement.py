"""Where a run's arrays live on a mesh: batches over ``data``, parameters replicated or sharded.

``plan_placement(params, mesh, shard_params)`` gives each parameter a ``PartitionSpec``: replicated
(``P()``) unless its path matches one of the ``shard_params`` regexes, then split over the ``model``
axis along its largest dimension that the axis divides (FSDP-style: each device holds a block of the
layer, its gradient and its Adam moments). Mixtures and codebook centres are small: replicated.
"""

from __future__ import annotations

import re
import warnings
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gmm_quant.core.rules import flatten, path_str


class Placement(NamedTuple):
    """A mesh, a ``PartitionSpec`` and the shape of each sharded parameter path.

    Invariants: every spec names only the ``model`` axis of ``mesh``, at most once, on a dimension
    whose size that axis divides; paths not in ``specs`` are replicated.
    """

    mesh: jax.sharding.Mesh
    specs: dict
    shapes: dict

    def spec(self, path: str, shape=None) -> PartitionSpec:
        """The spec of a parameter path, or of a leaf inside a training state whose path ends with
        one and whose shape is that parameter's (its Adam moments: ``.../mu/params/<path>``)."""
        for name, spec in self.specs.items():
            named = path == name or path.endswith("/" + name)
            if named and (shape is None or tuple(shape) == self.shapes[name]):
                return spec
        return PartitionSpec()

    def shardings(self, tree):
        """A pytree of ``NamedSharding`` for ``tree`` (a parameter tree or a training state)."""

        def one(path, leaf):
            return NamedSharding(self.mesh, self.spec(path_str(path), getattr(leaf, "shape", ())))

        return jax.tree_util.tree_map_with_path(one, tree)

    def place(self, tree):
        if jax.process_count() > 1:  # this process's own arrays (read from a file) join via the host
            tree = jax.tree.map(_host_if_local, tree)
        return jax.device_put(tree, self.shardings(tree))

    def replicated(self):
        return NamedSharding(self.mesh, PartitionSpec())

    def batch(self):
        """Sharding of a batch: split along its first axis over ``data`` (replicated without it)."""
        return NamedSharding(
            self.mesh, PartitionSpec("data") if "data" in self.mesh.shape else PartitionSpec()
        )


def _host_if_local(leaf):
    return np.asarray(leaf) if isinstance(leaf, jax.Array) and leaf.is_fully_addressable else leaf


def plan_placement(params, mesh, shard_params=()) -> Placement:
    """Specs for ``params`` on ``mesh``; a ``shard_params`` regex that matches nothing is reported (a
    warning); a matched leaf that no dimension of which the ``model`` axis divides is an error."""
    specs, shapes, used = {}, {}, set()
    model = mesh.shape.get("model", 1)
    for path, leaf in flatten(params).items():
        hit = next((p for p in shard_params if re.search(p, path)), None)
        if hit is None:
            continue
        used.add(hit)
        if model == 1:
            continue
        dims = [d for d, n in enumerate(leaf.shape) if n % model == 0]
        if not dims:
            raise ValueError(
                f"cannot shard {path} {tuple(leaf.shape)} over model={model}: no dimension it divides"
            )
        dim = max(dims, key=lambda d: leaf.shape[d])
        specs[path] = PartitionSpec(*(["model" if d == dim else None for d in range(leaf.ndim)]))
        shapes[path] = tuple(leaf.shape)
    unused = [p for p in shard_params if p not in used]
    if unused:
        warnings.warn(f"shard_params patterns matched no parameter: {unused}", stacklevel=2)
    return Placement(mesh, specs, shapes)
