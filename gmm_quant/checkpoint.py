"""Verified per-epoch checkpoints of the command line's stages (orbax; atomic writes).

Layout::

    WORKDIR/config.json                              the config the checkpoints belong to (``workdir.py``)
    WORKDIR/checkpoints/<stage>/<N>/                 orbax checkpoint of the TrainState after epoch N
    WORKDIR/checkpoints/<stage>/<N>/gmm_quant.json   {"digest", "parent", "files": {name: sha256}}

A checkpoint holds the stage's whole ``TrainState`` (params, mixture, optimiser state, step). Batch
order is a function of (seed, epoch), so the RNG state is the epoch number itself; a run killed at any
moment and started again resumes after the last completed epoch and ends with the same numbers.

Invariants (tests/test_reliability.py):

* :meth:`StageCheckpoints.restore_latest` returns only a state whose files are byte-identical to those
  written (checked before orbax reads them), whose sha256 digest equals the one saved with it and whose
  values are all finite. A step that fails any check is reported, deleted, and the previous step is
  tried (two are kept); with none left the stage starts afresh.
* Every step records ``parent``, the digest of what its stage started from (the previous stage's
  result). Steps whose parent differs from the current one belong to another history and are discarded.
"""

from __future__ import annotations

import contextlib
import errno
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

META = "gmm_quant.json"


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename: never a half-written file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # name the file the user asked for, not our temporary one
        _remove(tmp)
        if err.errno is None:
            raise
        raise type(err)(err.errno, err.strerror, str(path)) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: pathlib.Path) -> None:
    with contextlib.suppress(OSError):  # absent, or on a read-only file system
        path.unlink()


def tree_digest(tree) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes: equal digests mean equal pytrees."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _all_finite(tree) -> bool:
    arrays = [np.asarray(x) for x in jax.tree.leaves(tree)]
    return all(np.all(np.isfinite(a)) for a in arrays if np.issubdtype(a.dtype, np.floating))


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


def _file_digests(step: pathlib.Path) -> dict:
    """sha256 of every file under a step directory but our own metadata, by relative path."""
    return {
        str(p.relative_to(step)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(step.rglob("*"))
        if p.is_file() and p.name != META
    }


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class StageCheckpoints:
    """Per-epoch checkpoints of one stage (keeps the latest two), verified on restore.

    ``parent`` is the digest of the state the stage starts from; None skips that check (reading the
    pretraining of another work directory). ``read_only`` never creates or deletes anything.
    """

    def __init__(self, workdir, stage: str, parent: str | None = None, *, read_only: bool = False):
        self.directory = (pathlib.Path(workdir) / "checkpoints" / stage).absolute()
        self.stage, self.parent, self.read_only = stage, parent, read_only
        self.manager = self._open()

    def _open(self):
        alone = {}
        if jax.process_count() > 1:  # several processes: this one works alone (gmm_quant.scale.distributed)
            me = jax.process_index()
            alone["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}
            )
            if not self.read_only:
                self.directory.mkdir(parents=True, exist_ok=True)  # orbax will not create it then
        options = ocp.CheckpointManagerOptions(
            max_to_keep=2,
            create=not (self.read_only or alone),
            read_only=self.read_only,
            cleanup_tmp_directories=not self.read_only,
            **alone,
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def save(self, epoch: int, state) -> None:
        """Save ``state`` as step ``epoch``; the step counts only once its ``gmm_quant.json`` exists."""
        with deferred_interrupt():
            try:
                self.manager.save(epoch, args=ocp.args.StandardSave(state))
                self.manager.wait_until_finished()
            except (ValueError, RuntimeError) as err:  # orbax reports a failed write as these
                raise _as_os_error(err, self.directory) from None
            step = self.directory / str(epoch)
            meta = {"digest": tree_digest(state), "parent": self.parent, "files": _file_digests(step)}
            write_atomic(step / META, json.dumps(meta, indent=1).encode())

    def _load(self, epoch: int, like):
        """The verified state of ``epoch``; raises ValueError saying what is wrong with it."""
        step = self.directory / str(epoch)
        try:
            meta = json.loads((step / META).read_text())
            files, digest, parent = meta["files"], meta["digest"], meta["parent"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"has no readable {META} (incomplete or damaged)") from None
        if self.parent is not None and parent != self.parent:
            raise LookupError("was made from a different starting point (an earlier stage changed)")
        if _file_digests(step) != files:
            raise ValueError("has files that differ from those written (truncated, changed or missing)")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            state = self.manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
        except Exception as err:  # orbax raises many types for a damaged directory
            text = str(err).strip()
            reason = text.splitlines()[0][:160] if text else type(err).__name__
            raise ValueError(f"does not load ({reason})") from None
        if tree_digest(state) != digest:
            raise ValueError("fails its checksum")
        if not _all_finite(state):
            raise ValueError("holds non-finite values")
        return state

    def restore_latest(self, like) -> tuple[int, object]:
        """``(epoch, state)`` of the newest good step, or ``(0, None)`` when there is none."""
        for epoch in sorted(self.manager.all_steps(), reverse=True):
            try:
                return epoch, self._load(epoch, like)
            except LookupError as err:
                _warn(f"{self.stage} checkpoint {epoch} {err}; starting {self.stage} afresh")
                self._discard(None)
                return 0, None
            except ValueError as err:
                _warn(f"{self.stage} checkpoint {epoch} is damaged: it {err}; trying the previous one")
                self._discard(epoch)
        return 0, None

    def _discard(self, epoch: int | None) -> None:
        """Delete step ``epoch`` (None: every step of this stage). Only our own checkpoint files."""
        if self.read_only:
            return
        self.manager.close()
        if epoch is None:
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            shutil.rmtree(self.directory / str(epoch), ignore_errors=True)
        self.manager = self._open()

    def close(self) -> None:
        self.manager.close()
