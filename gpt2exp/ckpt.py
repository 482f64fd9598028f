"""Inspect and verify checkpoints without changing anything.

    python -m gpt2exp.ckpt list outputs/<date>/<time>
    python -m gpt2exp.ckpt verify outputs/<date>/<time>                 # every checkpoint of the run
    python -m gpt2exp.ckpt verify outputs/<date>/<time>/checkpoints/step_00000200
    python -m gpt2exp.ckpt list --help

`list` prints one row per checkpoint (of the run, or just the one named): step, time, size, val
loss, whether it verifies, and why rotation keeps it (last/best/milestone). `verify` checks sizes
and sha256 against each manifest and exits 1 if any checkpoint is corrupt (2 for bad input). PATH
is a run dir or a checkpoint dir (`list` needs the run the checkpoint belongs to); a run's checkpoints
are found where its run.json records them (`<run dir>/checkpoints`, or under checkpoint.dir).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from gpt2exp import cli
from gpt2exp.checkpoint import (
    CORRUPT,
    RETENTION_KEYS,
    STATE_FILE,
    checkpoint_size,
    kept_reasons,
    manifest_metric,
    step_dirs,
    step_of,
    verify_checkpoint,
)
from gpt2exp.errors import UserError, fail
from gpt2exp.rundir import existing_checkpoints_root, read_config_of_record, read_run_json, timestamp
from gpt2exp.targets import Target, resolve_target

if TYPE_CHECKING:
    from omegaconf import DictConfig

EXIT_CORRUPT = 1


def _checkpoints_of(target: Target) -> list[Path]:
    if target.checkpoint is not None:
        return [target.checkpoint]
    assert target.run_dir is not None
    return step_dirs(existing_checkpoints_root(target.run_dir))  # one without its manifest shows as corrupt


def _saved_at(path: Path) -> str:
    try:
        stamp = float(json.loads((path / STATE_FILE).read_text())["saved_at"])
    except (OSError, ValueError, KeyError, TypeError):
        stamp = path.stat().st_mtime
    return timestamp(stamp)


def _size(path: Path) -> str:
    try:
        size = float(checkpoint_size(path))
    except (OSError, ValueError):
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "?"


def retention_settings(run_dir: Path) -> DictConfig:
    """The run's checkpoint.* settings as its last launch rotated by: the config of record's, with the
    retention its newest resume ran with (RETENTION_KEYS, which a resume may change) where run.json has it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = read_config_of_record(run_dir).checkpoint
    resumes = read_run_json(run_dir).get("resumes")
    last = (
        resumes[-1].get("retention")
        if isinstance(resumes, list) and resumes and isinstance(resumes[-1], dict)
        else None
    )
    if not isinstance(last, dict):
        return cfg  # never resumed, or resumed before run.json recorded it
    try:
        return OmegaConf.merge(cfg, {key: last[key] for key in RETENTION_KEYS if key in last})
    except OmegaConfBaseException:  # a hand-edited run.json: the record's settings still describe the run
        return cfg


def list_run(path: str | Path) -> int:
    """Print the table of a run's checkpoints (or of the one checkpoint `path` names); exit code 0."""
    target = resolve_target(path)
    if target.run_dir is None:
        raise UserError(
            f"{path} is a checkpoint dir outside a run; `list` needs the run's config.yaml "
            "(`verify` checks a loose checkpoint)"
        )
    cfg = retention_settings(target.run_dir)
    root = existing_checkpoints_root(target.run_dir)
    reasons = kept_reasons(root, cfg)
    rows = [("step", "saved", "size", cfg.best_metric, "status", "kept because")]
    for ckpt in _checkpoints_of(target):
        metric = manifest_metric(ckpt, cfg.best_metric)
        problem = verify_checkpoint(ckpt, cfg.verify)
        rows.append(
            (
                str(step_of(ckpt)),
                _saved_at(ckpt),
                _size(ckpt),
                f"{metric:.4f}" if metric is not None else "-",
                "verified" if problem is None else f"CORRUPT: {problem}",
                ",".join(reasons.get(ckpt.name, [])) or "-",
            )
        )
    moved_aside = sorted((root / CORRUPT).glob("*")) if target.checkpoint is None and (root / CORRUPT).is_dir() else []
    for aside in moved_aside:  # only in the table of a whole run
        rows.append(("-", _saved_at(aside), "-", "-", f"moved aside: {CORRUPT}/{aside.name}", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def verify(path: str | Path) -> int:
    """Check every checkpoint of a run (or the one named) against its manifest; 1 if any is corrupt."""
    checkpoints = _checkpoints_of(resolve_target(path))
    if not checkpoints:
        raise UserError(f"run dir {path} has no checkpoints")
    bad = 0
    for ckpt in checkpoints:
        problem = verify_checkpoint(ckpt, "sha256")
        print(f"{ckpt.name}: {'ok' if problem is None else 'CORRUPT: ' + problem}")
        bad += problem is not None
    return EXIT_CORRUPT if bad else 0


COMMANDS = {"list": list_run, "verify": verify}


def build_parser() -> cli.ArgumentParser:
    parser = cli.parser("python -m gpt2exp.ckpt", __doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,verify}")
    for name, summary in (
        ("list", "one row per checkpoint: step, time, size, val loss, verified, kept because"),
        ("verify", "check sizes and sha256 against each manifest; exit 1 if any checkpoint is corrupt"),
    ):
        command = commands.add_parser(name, help=summary, description=summary)
        command.add_argument("path", metavar="PATH", help="a run dir or one of its checkpoints/step_* dirs")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args.path)
    except UserError as exc:
        fail(str(exc))
    raise SystemExit(code)


if __name__ == "__main__":
    main()
