"""Host transfers of a run over several processes: the maths and the files use them without the
scale-out runtime (``scale.distributed``) or orbax. In one process every helper is a no-op."""

from __future__ import annotations

import jax
import numpy as np


def multi_process() -> bool:
    return jax.process_count() > 1


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """``[P, *rows.shape]``: every process's ``rows`` (same shape and dtype everywhere)."""
    if not multi_process():
        return rows[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(rows))


def to_local(tree):
    """``tree`` with every global array replaced by a full local copy (a no-op in one process)."""
    if not multi_process():
        return tree
    from jax.experimental import multihost_utils

    def one(leaf):
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
            return leaf
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree.map(one, tree)
