"""One-line descriptions of errors for everything that leaves the daemon.

Replies, events, ``status``, ``report.json`` and command-line errors carry one
clear line -- the error's type and what was wrong -- never a Python
traceback: tracebacks name files and lines (which help no client and tell an
attacker about the installation) and run to kilobytes. The traceback goes to
the log, where the people who can act on it look.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Final

MAX_MESSAGE_CHARS: Final = 500
"""Longest description sent to a client; the full text is in the log."""


def describe(err: BaseException, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``"TypeName: message"`` on one line, at most ``limit`` characters."""
    text = " ".join(str(err).split())  # newlines and runs of spaces become single spaces
    line = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message made safe to send: first line only (a traceback never follows), bounded."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def log_failure(log: logging.Logger, what: str, err: BaseException) -> str:
    """Log ``err`` with its traceback under ``what``; return the one line for clients."""
    log.error("%s: %s", what, describe(err, limit=10_000), exc_info=err)
    return describe(err)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a command-line ``main``; an unexpected error prints one line and exits 1.

    The traceback is printed too when ``WSI_TRACEBACK=1`` is set (for developers); Ctrl-C exits
    130 without one.
    """
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("WSI_TRACEBACK") == "1":
            traceback.print_exc()
        print(f"error: {describe(err)}", file=sys.stderr)
        return 1
