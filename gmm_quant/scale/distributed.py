"""Several processes (hosts) on one run: ``jax.distributed``, one writer, state gathered after training.

``initialize(coordinator, num_processes, process_id)`` starts JAX's distributed runtime (on CPU with
gloo collectives) before any computation; afterwards ``jax.devices()`` lists every process's devices
and a mesh spans them. During training every process feeds the same batches and XLA's collectives
reduce the gradients. Between stages, ``to_local`` gives each process the whole state as local
arrays (replicated leaves: its own copy; sharded ones: gathered), so compression, evaluation and
export run on every process alike, and only process 0 (``is_writer``) writes checkpoints, the report
and the files. On resume process 0 reads the checkpoint and ``broadcast`` hands it to the others: no
shared filesystem is needed.
"""

from __future__ import annotations

import jax
import numpy as np


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is not in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices (others ignore it)
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def is_writer() -> bool:
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


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


def broadcast(tree):
    """Process 0's value of ``tree`` on every process (same structure everywhere)."""
    if not multi_process():
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)
