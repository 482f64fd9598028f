"""The argument parser of the small commands (generate, ckpt, report): one style, one kind of error.

    parser = cli.parser("python -m gpt2exp.ckpt", __doc__)

`--help` prints the usage, then the module docstring with its example commands, and exits 0. Bad
arguments print exactly one line, `error: <message>`, to stderr and exit 2 (no usage dump), the
same as every other bad input of gpt2exp.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from gpt2exp.errors import fail


class ArgumentParser(argparse.ArgumentParser):
    """argparse with gpt2exp's one-line errors (exit 2); subparsers inherit it."""

    def error(self, message: str) -> NoReturn:
        fail(message.replace("\n", " "))
        raise AssertionError("unreachable")  # fail() always exits


def parser(prog: str, doc: str | None, **kwargs) -> ArgumentParser:
    """A parser whose --help shows `doc` (the module docstring, examples included) as written."""
    return ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def seed(text: str) -> int:
    """An argparse type: a seed, an integer in [0, 2**32) (config.SEED_LIMIT, as the config's `seed`)."""
    from gpt2exp.config import SEED_LIMIT

    value = _int_at_least(text, 0)
    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be < 2**32 ({SEED_LIMIT}), got {value}")
    return value


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value
