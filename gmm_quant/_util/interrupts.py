"""Ctrl-C that is never lost.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be when SIGINT arrives, and
an exception raised inside a garbage-collector callback (JAX registers one) is printed as "Exception
ignored" and dropped: the run would go on as if Ctrl-C had not been pressed. ``install`` (called by
the command-line entry points) records every SIGINT before raising it and keeps a dropped one from
printing a traceback; ``check`` raises it again at the safe points the training loops pass (after
each epoch, after each step of a Python-level epoch), so a dropped interrupt stops the run there,
after that epoch's checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading

_pending = False


def _on_sigint(signum, frame):
    global _pending
    _pending = True
    raise KeyboardInterrupt


def _unraisable(info) -> None:
    """Python's hook for exceptions it cannot raise: a dropped Ctrl-C is recorded, not printed."""
    if not issubclass(info.exc_type, KeyboardInterrupt):
        sys.__unraisablehook__(info)


def install() -> None:
    """Make SIGINT recorded as well as raised (main thread only; a no-op elsewhere)."""
    global _pending
    _pending = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _unraisable


def pending() -> bool:
    """Whether a SIGINT has arrived since ``install``."""
    return _pending


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a SIGINT arrived (and was perhaps dropped) since ``install``."""
    if _pending:
        raise KeyboardInterrupt
