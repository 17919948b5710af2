"""The work directory of a command-line run: whose it is, who is using it, what may be deleted.

Invariants (tests/test_workdir.py checks each):

* A directory is *ours* when it holds a ``config.json`` written by :func:`claim` (a JSON object with
  ``"format": "gmm_quant workdir"``, or the ``fingerprint`` + ``config`` keys of earlier versions).
* ``--overwrite`` deletes only the entries in :data:`OUTPUTS` (what the pipeline writes), and only in a
  directory that is ours or empty; any other directory is refused, naming it, and nothing is touched.
* At most one process works in a directory: :class:`Lock` holds an exclusive ``flock`` on
  ``WORKDIR/.lock`` (released by the kernel when the process dies, so a stale lock of a killed process
  is taken over) and writes the holder's pid and host into it for the refusal message.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import pathlib
import shutil
import socket
import time

from gmm_quant._util.files import write_atomic
from gmm_quant.run.config import Config

FORMAT = "gmm_quant workdir"
LEGACY = {"val_fraction": 0.0}  # fields added later: their value in runs made before they existed
LOCK = ".lock"
OUTPUTS = (
    "checkpoints", "config.json", "metrics.json", "model.gqz", "model.onnx", "weights.png", "scatter.png",
    # python -m gmm_quant.tune
    "study.db", "best_config.json", "trials.csv", "pareto.png", "search.json", "final",
)  # fmt: skip


class WorkdirError(RuntimeError):
    """The work directory cannot be used (not ours, in use, a file, a different config)."""


class CheckpointMismatch(WorkdirError):
    """The work directory holds checkpoints of a different config."""


def check_usable(workdir: pathlib.Path, *, overwrite: bool = False) -> None:
    """Refuse, before anything is written, a path that is a file or a directory we may not write to.

    A directory that is neither empty nor ours is refused in both modes: without ``overwrite`` our
    outputs could replace the user's files of the same name, with it they would be deleted.
    """
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"work directory {workdir} is an existing file, not a directory")
    if not workdir.exists():
        return
    entries = [p for p in workdir.iterdir() if p.name != LOCK]
    if entries and not is_ours(workdir):
        verb = "overwrite" if overwrite else "use"
        raise WorkdirError(
            f"refusing to {verb} {workdir}: it is not empty and not a gmm_quant work directory "
            "(no config.json of ours); choose a new or empty work directory"
        )
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"work directory {workdir} is not writable")


def _read_config(workdir: pathlib.Path) -> dict | None:
    """Our ``config.json`` as a dict, or None if the file is absent or not ours."""
    try:
        saved = json.loads((workdir / "config.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(saved, dict):
        return None
    if saved.get("format") == FORMAT or {"fingerprint", "config"} <= set(saved):
        return saved
    return None


def is_ours(workdir: pathlib.Path) -> bool:
    return _read_config(workdir) is not None


def clear(workdir: pathlib.Path) -> list[str]:
    """Delete what the pipeline wrote in ``workdir`` (for ``--overwrite``); returns the names removed."""
    workdir = pathlib.Path(workdir)
    check_usable(workdir, overwrite=True)
    removed = []
    for name in OUTPUTS:
        path = workdir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _recorded(saved: dict) -> dict:
    """The config a run recorded, JSON-shaped; a field added since it started takes the value that
    reproduces how it ran then (``LEGACY``) or, failing that, its default."""
    defaults = {k: _jsonable(v) for k, v in {**dataclasses.asdict(Config()), **LEGACY}.items()}
    return {**defaults, **saved.get("config", {})}


def saved_config(workdir: pathlib.Path) -> Config:
    """The ``Config`` a work directory's run was made with; raises WorkdirError if it is not ours."""
    saved = _read_config(pathlib.Path(workdir))
    if saved is None:
        raise WorkdirError(f"{workdir} is not a gmm_quant work directory (no config.json of ours)")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in _recorded(saved).items()}
    return Config(**fields)


LAUNCH_FIELDS = ("mesh", "shard_params")  # where a run trains, not what it computes: resumable across


def claim(workdir: pathlib.Path, cfg: Config, data_digest: str | None = None) -> None:
    """Record ``cfg`` in ``workdir``; refuse a directory whose checkpoints came from another config,
    or (``data_digest``: the user's data, whose file may change under the same name) other data."""
    workdir = pathlib.Path(workdir)
    current = dataclasses.asdict(cfg)
    if (workdir / "config.json").exists():
        saved = _read_config(workdir)
        if saved is None:
            raise WorkdirError(f"{workdir}/config.json is not gmm_quant's; choose another work directory")
        # a field added after the run was made counts as its default; launch fields (the mesh) may change
        defaults = {k: _jsonable(v) for k, v in dataclasses.asdict(Config()).items()}
        old = {**defaults, **_recorded(saved)}
        for key in LAUNCH_FIELDS:
            old[key] = _jsonable(current[key])
        if {k: _jsonable(v) for k, v in current.items()} != old:
            diff = {k: (old.get(k), v) for k, v in current.items() if old.get(k) != _jsonable(v)}
            raise CheckpointMismatch(
                f"{workdir} holds checkpoints of a different config (saved vs now: {diff}); "
                "use another work directory, or start afresh with overwrite (--overwrite)"
            )
        if data_digest and saved.get("data") not in (None, data_digest):
            raise CheckpointMismatch(
                f"{workdir} holds checkpoints trained on other data than {cfg.dataset} holds now; use "
                "another work directory, or start afresh with overwrite (--overwrite)"
            )
        return
    record = {"format": FORMAT, "fingerprint": cfg.fingerprint(), "config": current}
    text = json.dumps({**record, "data": data_digest} if data_digest else record, indent=1)
    write_atomic(workdir / "config.json", text.encode())


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


class Lock:
    """Exclusive use of a work directory by this process (a context manager)."""

    def __init__(self, workdir: pathlib.Path):
        self.path = pathlib.Path(workdir) / LOCK
        self.fd = None

    def __enter__(self) -> Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(
                    f"work directory {self.path.parent} is in use by {holder}; wait for it to finish "
                    "or choose another work directory"
                ) from None
            raise
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since {stamp})\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:  # the file stays: unlinking it would let two processes lock two inodes
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None
