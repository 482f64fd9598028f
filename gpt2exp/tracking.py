"""Experiment tracking: metrics.jsonl always, W&B when configured. The only module that talks to W&B.

W&B continuity across resumes: the run id lives in run.json and in each checkpoint. A resume
reattaches the same id and rewinds it to the checkpoint's step (`resume_from="<id>?_step=<step>"`),
so steps logged between that checkpoint and the crash are replaced, never duplicated. metrics.jsonl
gets the same treatment: rows after the checkpoint step are dropped when the resume starts.

Offline runs (the default) are uploaded later, each resume being its own offline dir with the same
id, in the order they started:  wandb sync --id <wandb_id> -p <project> <run dir>/wandb/offline-run-*
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a kill mid-write carries nothing worth keeping
    return rows


def truncate_metrics(run_dir: Path, last_step: int) -> int:
    """Keep only rows with step <= last_step (-1 keeps none); returns how many rows were dropped."""
    from gpt2exp.rundir import write_atomic

    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return 0
    rows = read_metrics(run_dir)
    kept = [row for row in rows if row.get("step", -1) <= last_step]
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
    return len(rows) - len(kept)


class Tracker:
    """Appends each logged step to metrics.jsonl and mirrors it to W&B (`cfg` is the logger section)."""

    def __init__(self, cfg: Any, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._file: Any = None  # opened at the first row: a resume truncates metrics.jsonl before that
        self._wandb_run = None

    def start_wandb(self, run_id: str, config: dict[str, Any], resume_step: int | None) -> None:
        """Start (or, with `resume_step`, reattach and rewind) the W&B run `run_id`."""
        if self.cfg.backend != "wandb" or self.cfg.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        options: dict[str, Any] = dict(
            project=self.cfg.project,
            entity=self.cfg.entity,
            group=self.cfg.group,
            tags=list(self.cfg.tags) or None,
            name=self.cfg.name or self.run_dir.name,
            dir=str(self.run_dir),
            mode=self.cfg.mode,
            config=config,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        if resume_step is None:
            options["id"] = run_id
        else:
            # rewind: history after the checkpoint step is replaced, never duplicated
            options["resume_from"] = f"{run_id}?_step={resume_step}"
        self._wandb_run = wandb.init(**options)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        if self._file is None:
            self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close; finishing the W&B run keeps a later job in this process out of it."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None
