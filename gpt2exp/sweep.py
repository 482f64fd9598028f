"""Sweeps: the identity of a job inside its sweep, and the plan for resuming a sweep.

A sweep dir (`multirun/<date>/<time>/`) is defined by Hydra's own record, `multirun.yaml` (the
sweeper, the launcher and the command-line overrides), and each job dir holds the overrides it was
launched with in `.hydra/overrides.yaml` next to its config of record and run.json. For Hydra's
basic (grid) sweeper the full job list is re-derived from multirun.yaml with Hydra's own parser, so
jobs that never started are known; for other sweepers (Optuna) the jobs are those that started.

`resume=<sweep dir>` plans every job from that record: completed (and diverged) jobs are skipped, preempted,
failed or interrupted ones resume from their newest good checkpoint in their own dirs (or start
again when they never saved one), and jobs that never started are started. The plan is carried out
by the `gpt2exp_resume` sweeper (hydra_plugins/gpt2exp_sweep_resume), through the sweep's launcher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gpt2exp.errors import UserError
from gpt2exp.rundir import CHECKPOINTS, check_unlocked, override_key, run_status

SWEEP_RECORD = "multirun.yaml"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
RESUME_SWEEPER = "gpt2exp_resume"


def is_sweep_dir(path: Path) -> bool:
    return (path / SWEEP_RECORD).is_file()


def holds_job_dirs(path: Path) -> bool:
    """True for a dir whose subdirs are Hydra sweep jobs (run dirs with .hydra/overrides.yaml)."""
    return path.is_dir() and any((job / ".hydra" / "overrides.yaml").is_file() for job in path.iterdir())


def task_overrides(overrides: list[str]) -> list[str]:
    """A job's own overrides: Hydra's settings and `resume=` left out."""
    return [o for o in overrides if not override_key(o).startswith("hydra") and override_key(o) != "resume"]


def job_run_name(job_overrides: list[str], sweep_overrides: list[str]) -> str:
    """W&B run name of a sweep job: the overrides that set it apart from the sweep's fixed ones."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # Hydra hands a job its values re-rendered (`false` -> `False`): compare the same rendering
    parsed = OverridesParser.create().parse_overrides(task_overrides(sweep_overrides))
    fixed = {f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed if not o.is_sweep_override()}
    own = [o for o in task_overrides(job_overrides) if o not in fixed]
    return ",".join(o.lstrip("+") for o in own)


def read_sweep_record(sweep_dir: Path) -> DictConfig:
    if not is_sweep_dir(sweep_dir):
        raise UserError(
            f"{sweep_dir} is not a sweep dir (no {SWEEP_RECORD}); pass a multirun/<date>/<time> dir "
            "to resume a sweep, or a run dir to resume one run"
        )
    try:
        return OmegaConf.load(sweep_dir / SWEEP_RECORD)
    except Exception as exc:  # a truncated or hand-edited record
        raise UserError(f"{sweep_dir / SWEEP_RECORD} cannot be read ({exc}); it is the sweep's record") from None


def sweep_identity(sweep_dir: Path, job_overrides: list[str]) -> tuple[str, str]:
    """(W&B group, W&B run name) of a sweep job: the sweep dir, and the job's distinguishing overrides."""
    sweep_overrides: list[str] = []
    if is_sweep_dir(sweep_dir):
        record = OmegaConf.load(sweep_dir / SWEEP_RECORD)
        sweep_overrides = list(OmegaConf.select(record, "hydra.overrides.task", default=[]) or [])
    return str(sweep_dir), job_run_name(job_overrides, sweep_overrides)


def name_sweep_job(cfg: DictConfig, sweep_dir: Path, job_overrides: list[str]) -> DictConfig:
    """Record the job's W&B group (the sweep dir) and run name (its overrides), unless set by the user."""
    group, name = sweep_identity(sweep_dir, job_overrides)
    cfg = cfg.copy()
    if cfg.logger.group is None:
        cfg.logger.group = group
    if cfg.logger.name is None and name:
        cfg.logger.name = name
    return cfg


# -- the plan for resuming a sweep ---------------------------------------------------------------


@dataclass
class SweepJob:
    num: int
    overrides: list[str]  # the job's task overrides, as Hydra launched (or would launch) it
    run_dir: Path | None  # None: never started
    status: str  # completed | preempted | failed | interrupted | not started
    checkpoint_step: int | None  # newest checkpoint on disk (verified when the job resumes)

    @property
    def action(self) -> str:
        if self.status in ("completed", "diverged"):  # a diverged job would diverge again, bit for bit
            return "skip"
        if self.checkpoint_step is not None:
            return f"resume from step {self.checkpoint_step}"
        return "start" if self.run_dir is None else "start again (no checkpoint)"

    def launch_overrides(self, extra: list[str], stamp: str) -> list[str]:
        """What the launcher runs: the job's own overrides, today's allowed ones, and `resume=auto`.

        A job that already has a dir keeps its first `.hydra/` files; Hydra's files for this
        attempt go to `.hydra/resume-<stamp>/`, as for a single run's resume.
        """
        launch = [*self.overrides, *extra, "resume=auto"]
        if self.run_dir is not None:
            launch.append(f"hydra.output_subdir=.hydra/resume-{stamp}")
        return launch


def expected_jobs(record: DictConfig) -> list[list[str]] | None:
    """The grid of a basic sweeper's jobs, re-derived from its record; None for other sweepers."""
    if OmegaConf.select(record, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(record, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += list(OmegaConf.select(record, "hydra.overrides.task", default=[]) or [])
    parsed = OverridesParser.create().parse_overrides(arguments)
    return [task_overrides(job) for job in BasicSweeper.split_arguments(parsed, None)[0]]


def started_jobs(sweep_dir: Path) -> dict[int, tuple[Path, list[str]]]:
    """{job num: (job dir, its task overrides)} for every job Hydra launched under `sweep_dir`."""
    found = {}
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        hydra_file = overrides_file.parent / "hydra.yaml"
        num = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.num") if hydra_file.exists() else None
        if num is None:
            continue
        found[int(num)] = (job_dir, task_overrides(list(OmegaConf.load(overrides_file))))
    return found


def job_status(run_dir: Path | None) -> tuple[str, int | None]:
    from gpt2exp.checkpoint import newest_step

    if run_dir is None:
        return "not started", None
    check_unlocked(run_dir)  # a job still training there: refuse the whole resume
    status = run_status(run_dir) or "interrupted"  # no run.json: killed while it set up
    return status, newest_step(run_dir / CHECKPOINTS)


def plan_sweep(sweep_dir: Path) -> list[SweepJob]:
    record = read_sweep_record(sweep_dir)
    started = started_jobs(sweep_dir)
    grid = expected_jobs(record)
    if grid is None:
        grid_nums = sorted(started)
        grid = [started[n][1] for n in grid_nums]
    else:
        grid_nums = list(range(len(grid)))
    jobs = []
    for num, overrides in zip(grid_nums, grid, strict=True):
        run_dir = None
        if num in started:
            run_dir, recorded = started[num]
            if recorded != overrides:
                raise UserError(
                    f"job {num} in {run_dir} was launched with {' '.join(recorded)}, but the sweep's "
                    f"{SWEEP_RECORD} gives {' '.join(overrides)}; the sweep dir does not match its record"
                )
        status, step = job_status(run_dir)
        jobs.append(SweepJob(num, overrides, run_dir, status, step))
    if not jobs:
        raise UserError(f"sweep {sweep_dir} has no jobs to resume (none were started and its sweeper has no grid)")
    return jobs


def summary_lines(jobs: list[SweepJob], sweep_overrides: list[str]) -> list[str]:
    """One line per job: number, distinguishing overrides, status, what the resume does."""
    names = [job_run_name(job.overrides, sweep_overrides) or "(no overrides)" for job in jobs]
    width = max(len(n) for n in names)
    lines = []
    for job, name in zip(jobs, names, strict=True):
        state = job.status
        if job.checkpoint_step is not None and job.action != "skip":
            state += f" at step {job.checkpoint_step}"
        lines.append(f"  job {job.num:>3}  {name:<{width}}  {state:<24}  -> {job.action}")
    return lines


def contiguous_batches(jobs: list[SweepJob]) -> list[list[SweepJob]]:
    """Jobs to run, grouped into runs of consecutive numbers (a launcher numbers a batch from its first)."""
    batches: list[list[SweepJob]] = []
    for job in (j for j in jobs if j.action != "skip"):
        if batches and batches[-1][-1].num == job.num - 1:
            batches[-1].append(job)
        else:
            batches.append([job])
    return batches


def resume_stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def recorded_hydra_overrides(record: DictConfig) -> list[str]:
    """The sweep's own Hydra settings (launcher and its options) to apply again on resume."""
    dropped = ("hydra.mode", "hydra.sweep.dir", "hydra/sweeper", "hydra.sweeper")
    overrides: list[Any] = list(OmegaConf.select(record, "hydra.overrides.hydra", default=[]) or [])
    return [o for o in overrides if not override_key(o).startswith(dropped)]
