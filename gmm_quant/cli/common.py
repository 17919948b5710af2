"""What every command line of gmm_quant shares: one line per user error, Ctrl-C, ``--debug``.

A user-caused failure (bad flag, missing or damaged file, unusable work directory, full disk, a run
that diverges) ends in one line on stderr and a non-zero exit; ``--debug`` (or ``GMM_QUANT_DEBUG=1``)
shows the traceback instead. Exit codes: 1 a failure, 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from gmm_quant._util import interrupts
from gmm_quant._util.errors import describe

DEBUG_ENV = "GMM_QUANT_DEBUG"


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching, whose usage errors are one line: ``error: ... (see --help)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_debug_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--debug", action="store_true", help=f"show tracebacks (also ${DEBUG_ENV}=1)")


def debug_requested(argv) -> bool:
    return "--debug" in (argv or []) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def quiet_libraries(argv) -> None:
    """Keep orbax's and absl's warnings off stderr (one line per problem is ours to print)."""
    if debug_requested(argv):
        return
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.FATAL)  # orbax logs write failures with tracebacks
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: None if _closed_loop(u.exc_type, u.exc_value) else previous(u)


def _closed_loop(kind, value) -> bool:
    """After a failed checkpoint write, tensorstore's callbacks still try orbax's closed event loop
    and report one unraisable traceback each; the failure itself is reported in our one line."""
    return kind is RuntimeError and str(value) == "Event loop is closed"


def quote_negative_values(argv: list[str], value_flags) -> list[str]:
    """``--flag -1e-3`` -> ``--flag=-1e-3`` for flags that take a value: argparse would read it as a flag."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if token in value_flags and value.startswith("-") and _is_number(value):
            out.append(f"{token}={value}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text.split(",")[0])
    except ValueError:
        return False
    return True


def exit_now(code: int) -> None:
    """Exit with ``code``; after Ctrl-C skip interpreter teardown, which can crash while XLA threads
    are still compiling (seen: SIGSEGV instead of exit code 130)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 130 or (code and _several_processes()):  # (see below)
        os._exit(code)
    sys.exit(code)


def _several_processes() -> bool:
    """Part of a ``jax.distributed`` run: a failed process must not wait at its shutdown barrier for
    the others (5 minutes, then a fatal error): it leaves at once, and they learn from the missing
    heartbeat (``scale.distributed.HEARTBEAT``) that it died."""
    jax = sys.modules.get("jax")
    try:
        return jax is not None and jax.process_count() > 1
    except Exception:  # JAX's backends are not up: no distributed run either
        return False


def run(body, argv, *, user_errors=(Exception,)) -> int:
    """``body()`` -> exit code, with every failure turned into one line on stderr (unless debugging)."""
    debug = debug_requested(argv)
    interrupts.install()
    try:
        code = body()
        interrupts.check()  # a Ctrl-C that a garbage-collector callback dropped near the end
        return code
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted; run the same command to resume", file=sys.stderr)
        return 130
    except user_errors as err:
        if debug:
            raise
        print(f"error: {describe(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        if debug:
            raise
        print(
            f"internal error: {type(err).__name__}: {describe(err)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 3
