"""Several processes (hosts) on one run: ``jax.distributed``, a shared work directory, one writer.

``initialize(coordinator, num_processes, process_id)`` starts JAX's distributed runtime (on CPU with
gloo collectives) before any computation; afterwards ``jax.devices()`` lists every process's devices
and a mesh spans them. Every process runs the same program on global arrays: it feeds the same
batches, XLA's collectives reduce the gradients, orbax writes each process's shards of a checkpoint
into the shared work directory (``checkpoint.py``), and compression runs where the shards live
(``scale.compression``). Only process 0 (``is_writer``) writes the report and the files, from the
gathered codebook indices (``to_local``). The helpers below are collective: every process calls them
in the same order.
"""

from __future__ import annotations

import hashlib
import pathlib
import secrets

import jax
import numpy as np

from gmm_quant._util.hosts import gather_rows, multi_process, to_local

HEARTBEAT = 30  # seconds without news from a process before the others stop (JAX's default: 100)
SHUTDOWN = 3600  # seconds the processes wait for each other at exit: process 0 writes the files meanwhile


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Start ``jax.distributed``; a value left None is what JAX finds in the environment (a Slurm, Open
    MPI or Kubernetes job, ``JAX_COORDINATOR_ADDRESS``)."""
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes {num_processes} is not a positive number")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is not in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices (others ignore it)
    jax.distributed.initialize(
        coordinator, num_processes=num_processes, process_id=process_id,
        heartbeat_timeout_seconds=HEARTBEAT, shutdown_timeout_seconds=SHUTDOWN,
    )  # fmt: skip


def is_writer() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process got here (a no-op in one process)."""
    if multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every process."""
    return bool(np.all(gather_rows(np.array([bool(flag)]))))


def default_mesh(mesh: str) -> str:
    """The mesh a run uses: the one given, else (several processes) data-parallel over every device."""
    return mesh or (f"data={jax.device_count()}" if multi_process() else "")


def sees_shared(directory) -> bool:
    """Whether every process sees the same ``directory`` (a file process 0 writes there with a random
    token is read back by all). Checkpoints need it: each process writes its own shards into it."""
    if not multi_process():
        return True
    token = _from_writer(secrets.token_bytes(16) if is_writer() else b"", 16).hex()
    path = pathlib.Path(directory) / ".gmm_quant-shared"
    if is_writer():
        path.write_text(token)
    barrier("gmm_quant-shared-written")
    try:
        seen = path.read_text() == token
    except OSError:
        seen = False
    shared = all_true(seen)
    if is_writer():
        path.unlink(missing_ok=True)
    return shared


def agree(fn) -> None:
    """Run ``fn()`` on process 0 alone; if it raises, every process raises (the others a
    ``RuntimeError`` with its one-line message), so that no process waits for one that stopped."""
    error = None
    if is_writer():
        try:
            fn()
        except Exception as err:
            error = err
    if not multi_process():
        if error is not None:
            raise error
        return
    from gmm_quant._util.errors import describe

    text = "" if error is None else describe(error)
    told = _from_writer(text.encode(), 1024).rstrip(b"\0").decode(errors="replace")
    if error is not None:
        raise error
    if told:
        raise RuntimeError(f"process 0: {told}")


def _from_writer(data: bytes, size: int) -> bytes:
    """Process 0's ``data`` (at most ``size`` bytes, zero-padded) on every process."""
    from jax.experimental import multihost_utils

    raw = np.zeros(size, np.uint8)
    raw[: len(data[:size])] = np.frombuffer(data[:size], np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(raw)).tobytes()


def same_everywhere(text: str) -> bool:
    """Whether every process passed the same ``text`` (compared by sha256)."""
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    return bool(np.all(gather_rows(digest) == digest))


SAMPLE = 1 << 20


def sample(leaf, limit: int = SAMPLE) -> np.ndarray:
    """A flat host copy of ``leaf``; one spread over several processes comes back as every k-th value
    along its largest dimensions (at most about ``limit`` values), taken where it lives."""
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable or leaf.is_fully_replicated:
        return np.asarray(to_local(leaf)).ravel()
    strides, size = [1] * leaf.ndim, leaf.size
    for d in sorted(range(leaf.ndim), key=lambda d: -leaf.shape[d]):
        step = min(leaf.shape[d], -(-size // limit))
        strides[d], size = step, size // step
    cut = tuple(slice(None, None, s) for s in strides)
    replicated = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
    return np.asarray(to_local(jax.jit(lambda a: a[cut], out_shardings=replicated)(leaf))).ravel()
