"""Verified per-epoch checkpoints of the command line's stages (orbax; atomic writes).

Layout::

    WORKDIR/config.json                              the config the checkpoints belong to (``workdir.py``)
    WORKDIR/checkpoints/<stage>/<N>/                 orbax checkpoint of the TrainState after epoch N
    WORKDIR/checkpoints/<stage>/<N>/gmm_quant.json   {"checksum", "parent", "files": {name: sha256}}

A checkpoint holds the stage's whole ``TrainState`` (params, mixture, optimiser state, step). Batch
order is a function of (seed, epoch), so the RNG state is the epoch number itself; a run killed at any
moment and started again resumes after the last completed epoch and ends with the same numbers.

Invariants (tests/test_checkpoints.py; several processes: tests/test_scale.py):

* :meth:`StageCheckpoints.restore_latest` returns only a state whose files are byte-identical to those
  written (checked before orbax reads them), whose checksum (``checksums.tree_checksum``: the same
  for any sharding and process count) equals the one saved with it and whose values are all finite. A
  step that fails any check is reported, deleted, and the previous step is tried (two are kept); with
  none left the stage starts afresh.
* Every step records ``parent``, the checksum of what its stage started from (the previous stage's
  result). Steps whose parent differs from the current one belong to another history and are discarded.
* Steps written before checksums existed (a sha256 ``digest`` instead) are verified by that digest.
* Several processes: every process writes its own shards of each step into the shared directory and
  takes part in verifying it; a run may resume with another mesh or another number of processes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import pathlib
import shutil
import signal
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp

from gmm_quant._util.files import write_atomic
from gmm_quant.run.checksums import tree_checksum
from gmm_quant.scale import distributed

META = "gmm_quant.json"


def tree_digest(tree) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes: equal digests mean equal pytrees."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def deferred_interrupt():
    """Hold back Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt: a save is whole."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _as_os_error(err: Exception, directory: pathlib.Path) -> Exception:
    """orbax's wrapped write failure as the OSError it was (full disk, permissions), else unchanged."""
    text = str(err)
    for code, marker in ((errno.ENOSPC, "No space left on device"), (errno.EACCES, "Permission denied"),
                         (errno.EROFS, "Read-only file system")):  # fmt: skip
        if marker in text or f"os_error_code='{code}'" in text:
            return OSError(code, os.strerror(code), str(directory))
    return err


def _file_sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_digests(step: pathlib.Path, collective: bool = False) -> dict:
    """sha256 of every file under a step directory but our own metadata, by relative path.
    ``collective``: each of the P processes hashes every P-th file and the digests are exchanged."""
    names = sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file() and p.name != META)
    me, count = (jax.process_index(), jax.process_count()) if collective else (0, 1)
    mine = np.zeros((len(names), 32), np.uint8)
    for i in range(me, len(names), count):
        mine[i] = np.frombuffer(bytes.fromhex(_file_sha256(step / names[i])), np.uint8)
    every = distributed.gather_rows(mine) if collective else mine[None]
    return {name: every[i % count, i].tobytes().hex() for i, name in enumerate(names)}


class Identity:
    """What a stage starts from, as a checkpoint's ``parent``: the tree's ``checksum`` (any layout, any
    process count) and, computed only when a step written before checksums asks for it, its sha256
    ``digest`` (None when this process does not hold every leaf)."""

    def __init__(self, tree):
        self.tree, self.checksum = tree, tree_checksum(tree)[0]

    @functools.cached_property
    def digest(self) -> str | None:
        held = all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(self.tree))
        return tree_digest(self.tree) if held else None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class StageCheckpoints:
    """Per-epoch checkpoints of one stage (keeps the latest two), verified on restore.

    ``parent`` identifies the state the stage starts from (``Identity(tree)``, or a string standing for
    both its forms); None skips that check (reading the pretraining of another work directory).
    ``read_only`` never creates or deletes anything.

    With several processes every process calls ``save`` and ``restore_latest`` on the same global
    state: orbax writes each process's shards into the (shared) work directory, the file digests and
    the checksum are computed where the data are, and every decision (which step is intact) is taken
    by all processes together. A ``read_only`` store is read by each process alone.
    """

    def __init__(self, workdir, stage: str, parent=None, *, read_only: bool = False):
        self.directory = (pathlib.Path(workdir) / "checkpoints" / stage).absolute()
        self.stage, self.read_only = stage, read_only
        self.parent = parent
        self.collective = distributed.multi_process() and not read_only
        self.writer = distributed.is_writer() or not self.collective
        self.manager = self._open()

    def _open(self):
        alone = {}
        if distributed.multi_process() and not self.collective:  # reading alone, another run's files
            me = jax.process_index()
            alone["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=2,
            create=not self.read_only,
            read_only=self.read_only,
            cleanup_tmp_directories=not self.read_only,
            **alone,
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def save(self, epoch: int, state) -> None:
        """Save ``state`` as step ``epoch``; the step counts only once its ``gmm_quant.json`` exists."""
        with deferred_interrupt():
            if self.collective:
                self._check_space(state)
            try:
                self.manager.save(epoch, args=ocp.args.StandardSave(state))
                self.manager.wait_until_finished()
            except (ValueError, RuntimeError) as err:  # orbax reports a failed write as these
                raise _as_os_error(err, self.directory) from None
            distributed.barrier(f"gmm_quant-saved-{self.stage}-{epoch}")
            step = self.directory / str(epoch)
            meta = {"checksum": tree_checksum(state)[0], "parent": self._parent("checksum"),
                    "files": _file_digests(step, self.collective)}  # fmt: skip
            if self.writer:
                write_atomic(step / META, json.dumps(meta, indent=1).encode())
            distributed.barrier(f"gmm_quant-meta-{self.stage}-{epoch}")

    def _check_space(self, state) -> None:
        """Several processes: refuse a step the shared directory has no room for, on every process
        alike. (A process whose write fails would leave the others waiting in orbax's barriers for its
        timeout, 20 minutes; one process alone gets the write's own error at once.)"""
        need = 1.1 * sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)) + (1 << 20)
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            free = 0
        if not distributed.all_true(free >= need):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))

    def _parent(self, form: str):
        """The parent's ``checksum`` or (older steps) ``digest``; a string parent stands for both."""
        if self.parent is None or isinstance(self.parent, str):
            return self.parent
        return getattr(self.parent, form)

    def _load(self, epoch: int, like):
        """The verified state of ``epoch``; raises ValueError saying what is wrong with it (every
        process alike)."""
        step = self.directory / str(epoch)
        try:
            meta = json.loads((step / META).read_text())
            files, parent = meta["files"], meta["parent"]
            form = "checksum" if "checksum" in meta else "digest"  # "digest": written before checksums
            expected = meta[form]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"has no readable {META} (incomplete or damaged)") from None
        if self.parent is not None and parent != self._parent(form):
            raise LookupError("was made from a different starting point (an earlier stage changed)")
        intact = _file_digests(step, self.collective) == files
        if not (distributed.all_true(intact) if self.collective else intact):
            raise ValueError("has files that differ from those written (truncated, changed or missing)")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            state = self.manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
        except Exception as err:  # orbax raises many types for a damaged directory
            text = str(err).strip()
            reason = text.splitlines()[0][:160] if text else type(err).__name__
            raise ValueError(f"does not load ({reason})") from None
        checksum, finite = tree_checksum(state)
        if (checksum if form == "checksum" else tree_digest(state)) != expected:
            raise ValueError("fails its checksum")
        if not finite:
            raise ValueError("holds non-finite values")
        return state

    def restore_latest(self, like) -> tuple[int, object]:
        """``(epoch, state)`` of the newest good step, or ``(0, None)`` when there is none."""
        for epoch in sorted(self.manager.all_steps(), reverse=True):
            try:
                return epoch, self._load(epoch, like)
            except LookupError as err:
                self._warn(f"{self.stage} checkpoint {epoch} {err}; starting {self.stage} afresh")
                self._discard(None)
                return 0, None
            except ValueError as err:
                self._warn(f"{self.stage} checkpoint {epoch} is damaged: it {err}; trying the previous one")
                self._discard(epoch)
        return 0, None

    def _warn(self, message: str) -> None:
        if self.writer:
            _warn(message)

    def _discard(self, epoch: int | None) -> None:
        """Delete step ``epoch`` (None: every step of this stage). Only our own checkpoint files."""
        if self.read_only:
            return
        self.manager.close()
        if self.writer:
            shutil.rmtree(self.directory / ("" if epoch is None else str(epoch)), ignore_errors=True)
        distributed.barrier(f"gmm_quant-discard-{self.stage}-{epoch}")
        self.manager = self._open()

    def close(self) -> None:
        self.manager.close()
