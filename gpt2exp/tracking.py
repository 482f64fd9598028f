"""Experiment tracking: metrics.jsonl always, W&B and/or TensorBoard when configured. The only module
that talks to W&B or writes TensorBoard events.

    logger=wandb               W&B (offline by default), files in <run dir>/wandb
    logger=tensorboard         TensorBoard event files in <run dir>/tensorboard
    logger=wandb_tensorboard   both (the keys of logger=wandb)
    logger=none                metrics.jsonl only

metrics.jsonl is the record; the trackers mirror it. Continuity across resumes: the W&B run id lives
in run.json and in each checkpoint. A resume reattaches the same id and rewinds it to the checkpoint's
step (`resume_from="<id>?_step=<step>"`), so steps logged between that checkpoint and the crash are
replaced, never duplicated. TensorBoard gets the same from its own purge: the resumed writer opens
a new event file with `purge_step` = checkpoint step + 1, and TensorBoard hides every event of the
earlier files at or after that step (a restart from step 0 purges them all). metrics.jsonl gets the
same treatment: rows after the checkpoint step are dropped when the resume starts.

Offline W&B runs (the default) are uploaded later, each resume being its own offline dir with the
same id, in the order they started:  wandb sync --id <wandb_id> -p <project> <run dir>/wandb/offline-run-*-<wandb_id>
(a sweep: the same for each job dir; the README has the loop).
"""

from __future__ import annotations

import json
import logging
import math
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


def recorded_val_loss(run_dir: Path) -> float:
    """The last val/loss a run logged (+inf if none), what a sweeper scores a completed job by."""
    values = [row["val/loss"] for row in read_metrics(run_dir) if isinstance(row.get("val/loss"), int | float)]
    return float(values[-1]) if values and math.isfinite(values[-1]) else float("inf")


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


WANDB_BACKENDS = ("wandb", "wandb_tensorboard")
TENSORBOARD_BACKENDS = ("tensorboard", "wandb_tensorboard")
TENSORBOARD_DIR = "tensorboard"  # under the run dir: `tensorboard --logdir <run dir or sweep dir>`


class SilentTracker:
    """The tracker of a rank other than 0 under torchrun: rank 0 alone logs, to metrics.jsonl and W&B."""

    def start_wandb(self, run_id: str, config: dict[str, Any], resume_step: int | None) -> None:
        pass

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class Tracker:
    """Appends each logged step to metrics.jsonl and mirrors it to W&B and/or TensorBoard (`cfg` is the
    logger section)."""

    def __init__(self, cfg: Any, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._file: Any = None  # opened at the first row: a resume truncates metrics.jsonl before that
        self._wandb_run = None
        self._tensorboard = None

    def start_wandb(self, run_id: str, config: dict[str, Any], resume_step: int | None) -> None:
        """Start the trackers the logger names: the W&B run `run_id` (with `resume_step`: reattached and
        rewound to it) and the TensorBoard writer (purging the steps after `resume_step`; all earlier
        events when None). Named for W&B, its first backend; `finish` ends them all."""
        self._start_wandb_run(run_id, config, resume_step)
        self._start_tensorboard(config, resume_step)

    def _start_wandb_run(self, run_id: str, config: dict[str, Any], resume_step: int | None) -> None:
        if self.cfg.backend not in WANDB_BACKENDS or self.cfg.mode == "disabled":
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

    def _start_tensorboard(self, config: dict[str, Any], resume_step: int | None) -> None:
        """A new event file in <run dir>/tensorboard whose first events tell TensorBoard to drop what the
        earlier files hold from `purge_step` on: the steps after the checkpoint are logged again, once."""
        if self.cfg.backend not in TENSORBOARD_BACKENDS:
            return
        from torch.utils.tensorboard import SummaryWriter

        purge_step = 0 if resume_step is None else resume_step + 1
        self._tensorboard = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step)
        if resume_step is None:  # the config of record, as TensorBoard's text tab shows it
            text = json.dumps(config, indent=2, default=str)
            self._tensorboard.add_text("config", f"```\n{text}\n```", global_step=0)
            self._tensorboard.flush()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        if self._file is None:
            self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        # committed now: W&B would hold the row until a later step's came. One row per step: W&B ignores a
        # second one at a step it has committed
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step, commit=True)
        if self._tensorboard is not None:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()  # on disk with its metrics.jsonl row: a kill loses no step a checkpoint kept

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close; finishing the W&B run keeps a later job in this process out of it."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None
