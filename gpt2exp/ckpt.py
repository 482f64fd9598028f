"""Inspect and verify checkpoints without changing anything.

    python -m gpt2exp.ckpt list outputs/<date>/<time>
    python -m gpt2exp.ckpt verify outputs/<date>/<time>                 # every checkpoint of the run
    python -m gpt2exp.ckpt verify outputs/<date>/<time>/checkpoints/step_00000200

`list` prints one row per checkpoint: step, time, size, val loss, whether it verifies, and why
rotation keeps it (last/best/milestone). `verify` checks sizes and sha256 against each manifest
and exits 1 if any checkpoint is corrupt (2 for bad input).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from gpt2exp.checkpoint import (
    CORRUPT,
    STATE_FILE,
    checkpoint_size,
    is_checkpoint_dir,
    kept_reasons,
    list_checkpoints,
    manifest_metric,
    step_of,
    verify_checkpoint,
)
from gpt2exp.errors import UserError, fail
from gpt2exp.rundir import CHECKPOINTS, is_run_dir, read_config_of_record

EXIT_CORRUPT = 1


def _checkpoints_of(path: Path) -> list[Path]:
    if not path.exists():
        raise UserError(f"path does not exist: {path}; pass a run dir or a checkpoint dir")
    if is_checkpoint_dir(path):
        return [path]
    if not (path / CHECKPOINTS).is_dir():
        raise UserError(f"{path} is neither a run dir with checkpoints nor a checkpoint dir")
    return list_checkpoints(path / CHECKPOINTS)


def _saved_at(path: Path) -> str:
    try:
        stamp = json.loads((path / STATE_FILE).read_text())["saved_at"]
    except (OSError, ValueError, KeyError):
        stamp = path.stat().st_mtime
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _size(path: Path) -> str:
    try:
        size = float(checkpoint_size(path))
    except (OSError, ValueError, KeyError):
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "?"


def list_run(run_dir: Path) -> int:
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a gpt2exp run dir (no config.yaml and run.json)")
    cfg = read_config_of_record(run_dir).checkpoint
    root = run_dir / CHECKPOINTS
    reasons = kept_reasons(root, cfg)
    rows = [("step", "saved", "size", cfg.best_metric, "status", "kept because")]
    for path in list_checkpoints(root):
        metric = manifest_metric(path, cfg.best_metric)
        problem = verify_checkpoint(path, cfg.verify)
        rows.append(
            (
                str(step_of(path)),
                _saved_at(path),
                _size(path),
                f"{metric:.4f}" if metric is not None else "-",
                "verified" if problem is None else f"CORRUPT: {problem}",
                ",".join(reasons.get(path.name, [])) or "-",
            )
        )
    for path in sorted((root / CORRUPT).glob("*")) if (root / CORRUPT).is_dir() else []:
        rows.append(("-", _saved_at(path), "-", "-", f"moved aside: {CORRUPT}/{path.name}", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def verify(path: Path) -> int:
    checkpoints = _checkpoints_of(path)
    if not checkpoints:
        raise UserError(f"no checkpoints under {path}")
    bad = 0
    for ckpt in checkpoints:
        problem = verify_checkpoint(ckpt, "sha256")
        print(f"{ckpt.name}: {'ok' if problem is None else 'CORRUPT: ' + problem}")
        bad += problem is not None
    return EXIT_CORRUPT if bad else 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("list", "verify"):
        print(__doc__)
        raise SystemExit(0 if args[:1] in (["-h"], ["--help"]) else 2)
    try:
        command, path = args[0], Path(args[1])
        code = list_run(path) if command == "list" else verify(path)
    except UserError as exc:
        fail(str(exc))
    raise SystemExit(code)


if __name__ == "__main__":
    main()
