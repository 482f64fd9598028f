"""What a path on the command line names: a run dir, or one checkpoint dir (inside a run or loose).

    resolve_target("outputs/2026-11-27/10-00-00")                             # Target(run_dir=..., checkpoint=None)
    resolve_target("outputs/2026-11-27/10-00-00/checkpoints/step_00000300")   # Target(run_dir=..., checkpoint=...)
    resolve_target("/scratch/ckpts/4f3a9c2b7d10/step_00000300")               # checkpoint.dir: Target(run_dir=..., ...)
    resolve_target("~/saved/step_00000300")                                   # Target(run_dir=None, checkpoint=...)

Shared by generate, ckpt and resume; it only looks at the file system (no verification, no loading)
and raises UserError, never prints or exits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gpt2exp.errors import UserError


@dataclass(frozen=True)
class Target:
    run_dir: Path | None  # the run the path belongs to (None: a loose checkpoint dir outside a run)
    checkpoint: Path | None  # the checkpoint dir named by the path; None when a run dir was given


def resolve_target(path: str | Path) -> Target:
    """The run dir and/or checkpoint dir `path` names, as absolute paths (`~` expanded).

    A run dir has config.yaml and run.json (`rundir.is_run_dir`); a checkpoint dir is a `step_*` dir
    (committed ones hold a manifest, `checkpoint.is_checkpoint_dir`), and belongs to the run whose
    checkpoints dir holds it (`rundir.run_of_checkpoints`: the run two levels up, or with
    checkpoint.dir the run its checkpoints dir names). Raises UserError for a missing path or one
    that is neither.
    """
    from gpt2exp.checkpoint import STEP_DIR
    from gpt2exp.rundir import CONFIG_OF_RECORD, RUN_JSON, is_run_dir, run_of_checkpoints

    given = Path(os.path.expanduser(path))
    if not given.exists():
        raise UserError(f"path does not exist: {path}; pass a run dir or a checkpoint dir")
    resolved = given.resolve()
    if is_run_dir(resolved):
        return Target(run_dir=resolved, checkpoint=None)
    if STEP_DIR.match(resolved.name) and resolved.is_dir():
        # committed or not: one that lost its manifest is named too, and verifying it says so
        return Target(run_dir=run_of_checkpoints(resolved.parent), checkpoint=resolved)
    raise UserError(
        f"{path} is neither a gpt2exp run dir ({CONFIG_OF_RECORD} and {RUN_JSON}) "
        "nor a checkpoint dir (checkpoints/step_*)"
    )
