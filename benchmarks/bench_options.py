"""Options the benchmarks share: which sections run, and whether the page cache is dropped before each
timed read or write (cold needs root: /proc/sys/vm/drop_caches)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def settle_sections_and_cache(parser: argparse.ArgumentParser, args: argparse.Namespace, sections: tuple) -> None:
    """`args.sections` as a list of known names; `args.cache` auto made cold (as root) or warm."""
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(sections))
    if unknown or not args.sections:
        parser.error(f"--sections takes names among {', '.join(sections)}, not {args.sections}")
    can_drop = os.access(DROP_CACHES, os.W_OK)
    if args.cache == "cold" and not can_drop:
        parser.error(f"--cache cold needs write access to {DROP_CACHES} (root); use --cache warm")
    if args.cache == "auto":
        args.cache = "cold" if can_drop else "warm"
