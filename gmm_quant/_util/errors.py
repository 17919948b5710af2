"""The one line a user error is reported as (every command line and the processes of one run)."""

from __future__ import annotations

import errno


def describe(err: BaseException) -> str:
    """One line naming the problem (and the file, for OS errors)."""
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        hint = ""
        if err.errno == errno.ENOSPC:
            hint = "; free some space and run the same command again (earlier outputs are kept)"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "; check the permissions or choose another directory"
        return f"{err.strerror.lower()}{where}{hint}"
    if isinstance(err, KeyError):
        return f"missing key {err}"
    text = str(err) or type(err).__name__
    if "Gloo" in text and "Connection closed by peer" in text:  # a collective lost its partner
        return "another process of this run stopped (see its output); run the same command on each host again"
    return text
