"""The one exception type a user is meant to read: a problem with their input, and its fix.

Anything raised as `UserError` reaches the terminal as a single `error: ...` line with exit code 2
(`EXIT_USAGE`), never as a traceback.
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input: the message names the problem and how to fix it."""


def fail(message: str) -> None:
    """Print one error line and exit with the usage exit code."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)
