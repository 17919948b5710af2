"""Atomic file writes: a file is either its old content or its new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import pathlib


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
