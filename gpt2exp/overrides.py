"""Command-line overrides, read only with Hydra's own parser: quoting, `+`/`~`, sweeps and groups as Hydra sees them."""

from __future__ import annotations

import re
from functools import cache
from typing import TYPE_CHECKING

from gpt2exp.errors import UserError

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

# Hydra flags that only print something: no run, nothing to check.
INFO_FLAGS = frozenset({"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--version"})
INFO_FLAGS |= {"--shell-completion", "-sc"}
MULTIRUN_FLAGS = frozenset({"--multirun", "-m"})
FLAG_WITH_VALUE = frozenset({"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp"})
FLAG_WITH_VALUE |= {"--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}


@cache
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def parse(overrides: list[str]) -> list[Override]:
    """Hydra's reading of `overrides`; a malformed one is a UserError naming it."""
    from hydra.errors import HydraException

    try:
        return _parser().parse_overrides(list(overrides))
    except HydraException as exc:
        raise UserError(
            f"cannot read the override: {str(exc).splitlines()[0]}; quote a value holding what Hydra reads as "
            "syntax (a leading ~, = , [ ] { } ( ) or a quote) for Hydra inside the shell's quotes: \"key='value'\""
        ) from None


def key_of(override: Override) -> str:
    """`+a.b=1` -> `a.b`; `~a` -> `a`; `model=gpt2_mini` -> `model`; `hydra/launcher=joblib` -> `hydra/launcher`."""
    return override.key_or_group


def is_hydra(override: Override) -> bool:
    return override.is_hydra_override()


def split_argv(args: list[str]) -> tuple[list[str], list[str]]:
    """argv (without the program) -> (flags with their values, overrides)."""
    flags, overrides = [], []
    take_value = False
    for arg in args:
        if take_value:
            flags.append(arg)
            take_value = False
        elif arg.startswith("-") and not arg.startswith("~"):
            flags.append(arg)
            take_value = arg in FLAG_WITH_VALUE
        else:
            overrides.append(arg)
    return flags, overrides


def last_value(overrides: list[Override], key: str) -> str | None:
    """The value the command line gives `key` (the last one wins, as in Hydra), as a string."""
    for override in reversed(overrides):
        if key_of(override) == key and not override.is_delete():
            value = override.value()
            return None if value is None else str(value)
    return None


def quoted(value: str) -> str:
    """A Hydra override value that may hold `=`, `,`, spaces or non-ASCII letters (a path, a dir named by
    its overrides), quoted: Hydra's grammar takes unquoted values of a narrower alphabet."""
    # Hydra reads a backslash as an escape only before a quote (or the closing one): only those are doubled
    escaped = re.sub(r"(\\+)(?='|$)", lambda run: run.group(1) * 2, value)
    return "'" + escaped.replace("'", "\\'") + "'"
