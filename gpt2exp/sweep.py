"""Sweeps: the identity of a job inside its sweep, and the plan for resuming a sweep.

A sweep dir (`multirun/<date>/<time>/`) is defined by Hydra's own record, `multirun.yaml` (the
sweeper, the launcher and the command-line overrides), and each job dir holds the overrides it was
launched with in `.hydra/overrides.yaml` next to its config of record and run.json. For Hydra's
basic (grid) sweeper the full job list is re-derived from multirun.yaml with Hydra's own parser, so
jobs that never started are known; for other sweepers (Optuna) the jobs are those that started.

`resume=<sweep dir>` plans every job from that record: completed, early-stopped and diverged jobs
are skipped, preempted, failed or interrupted ones resume from their newest good checkpoint in their
own dirs (or start again when they never saved one), and jobs that never started are started. The plan is carried out
by the `gpt2exp_resume` sweeper (hydra_plugins/gpt2exp_sweep_resume), through the sweep's launcher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig

from gpt2exp.errors import UserError
from gpt2exp.overrides import is_hydra, key_of, parse, quoted
from gpt2exp.resume import is_resumable_key
from gpt2exp.rundir import RunStatus, check_unlocked, checkpoints_root, existing_checkpoints_root, run_status

SWEEP_RECORD = "multirun.yaml"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
RESUME_SWEEPER = "gpt2exp_resume"
JOB_NUM_SUBDIR = "${hydra.job.num}"
NOT_STARTED = "not started"  # a sweep job without a dir: no run, so no RunStatus


def is_sweep_dir(path: Path) -> bool:
    return (path / SWEEP_RECORD).is_file()


def holds_job_dirs(path: Path) -> bool:
    """True for a dir whose subdirs are Hydra sweep jobs (run dirs with .hydra/overrides.yaml)."""
    return path.is_dir() and any((job / ".hydra" / "overrides.yaml").is_file() for job in path.iterdir())


def task_overrides(overrides: list[str]) -> list[str]:
    """A job's own overrides: Hydra's settings and `resume=` left out."""
    return [o.input_line for o in parse(overrides) if not is_hydra(o) and key_of(o) != "resume"]


# -- the sweep's record --------------------------------------------------------------------------


@dataclass
class SweepRecord:
    """What Hydra wrote into multirun.yaml, read as plain YAML: no interpolation is resolved."""

    dir: Path
    sweeper: str | None
    task_overrides: list[str]  # the sweep command's overrides (`optimizer.lr=1e-3,3e-4`, ...)
    hydra_overrides: list[str]  # its Hydra settings (`hydra/launcher=joblib`, ...)
    sweeper_params: dict[str, str]
    subdir: str  # the job dir template, e.g. ${hydra.job.num}
    cwd: str | None  # where the sweep was launched

    @property
    def swept_keys(self) -> list[str]:
        """The keys that vary between jobs: sweep overrides and the sweeper's params."""
        return list(self.sweeper_params) + [key_of(o) for o in parse(self.task_overrides) if o.is_sweep_override()]


def read_sweep_record(sweep_dir: Path) -> SweepRecord:
    if not is_sweep_dir(sweep_dir):
        raise UserError(
            f"{sweep_dir} is not a sweep dir (no {SWEEP_RECORD}); pass a multirun/<date>/<time> dir "
            "to resume a sweep, or a run dir to resume one run"
        )
    try:
        hydra_cfg = yaml.safe_load((sweep_dir / SWEEP_RECORD).read_text())["hydra"]
        overrides = hydra_cfg.get("overrides") or {}
        sweeper = hydra_cfg.get("sweeper") or {}
        return SweepRecord(
            dir=sweep_dir,
            sweeper=sweeper.get("_target_"),
            task_overrides=[str(o) for o in overrides.get("task") or []],
            hydra_overrides=[str(o) for o in overrides.get("hydra") or []],
            sweeper_params={str(k): str(v) for k, v in (sweeper.get("params") or {}).items()},
            subdir=str((hydra_cfg.get("sweep") or {}).get("subdir", JOB_NUM_SUBDIR)),
            cwd=(hydra_cfg.get("runtime") or {}).get("cwd"),
        )
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:  # truncated or hand-edited
        raise UserError(f"{sweep_dir / SWEEP_RECORD} cannot be read ({exc}); it is the sweep's record") from None


def sweep_group(sweep_dir: Path, launch_cwd: str | None) -> str:
    """The W&B group: the sweep dir as seen from where the sweep was launched, however a resume spells it."""
    absolute = sweep_dir.resolve()
    if launch_cwd:
        try:
            return str(absolute.relative_to(Path(launch_cwd).resolve()))
        except ValueError:
            pass
    return str(absolute)


def job_run_name(job_overrides: list[str], swept_keys: list[str]) -> str:
    """W&B run name of a sweep job: its values of the keys the sweep varies (`optimizer.lr=0.001,seed=2`)."""
    return ",".join(o.input_line.lstrip("+") for o in parse(task_overrides(job_overrides)) if key_of(o) in swept_keys)


def name_sweep_job(
    cfg: DictConfig, sweep_dir: Path, job_overrides: list[str], launch_cwd: str, searched_keys: list[str]
) -> DictConfig:
    """Record the job's W&B group (its sweep) and run name (its swept values), unless the user set them.

    `searched_keys` (the sweeper's params) name the varying keys when the sweeper keeps no record (Optuna).
    """
    record = read_sweep_record(sweep_dir) if is_sweep_dir(sweep_dir) else None
    swept = record.swept_keys if record else searched_keys
    cfg = cfg.copy()
    if cfg.logger.group is None:
        cfg.logger.group = sweep_group(sweep_dir, record.cwd if record else launch_cwd)
    name = job_run_name(job_overrides, swept)
    if cfg.logger.name is None and name:
        cfg.logger.name = name
    return cfg


# -- the plan for resuming a sweep ---------------------------------------------------------------


@dataclass
class SweepJob:
    num: int
    overrides: list[str]  # the job's task overrides, as Hydra launched (or would launch) it
    run_dir: Path | None  # None: never started
    status: RunStatus | str  # a RunStatus, or NOT_STARTED
    checkpoint_step: int | None  # newest checkpoint on disk (verified when the job resumes)
    subdir: str | None = None  # the job's dir under the sweep dir, when known before launching

    @property
    def action(self) -> str:
        # done: an early-stopped job is complete, a diverged one would diverge again, bit for bit, and a
        # pruned trial was stopped by its study's pruner
        if self.status in (RunStatus.completed, RunStatus.early_stopped, RunStatus.diverged, RunStatus.pruned):
            return "skip"
        if self.checkpoint_step is not None:
            return f"resume from step {self.checkpoint_step}"
        return "start" if self.run_dir is None else "start again (no checkpoint)"

    def launch_overrides(self, extra: list[str], stamp: str) -> list[str]:
        """What the launcher runs: the job's own overrides and today's allowed ones.

        A job that has a dir continues it (`resume=auto`) in that very dir (its subdir pinned, so a
        template such as ${hydra.job.override_dirname} cannot move it), keeping its first `.hydra/`
        files: Hydra's files for this attempt go to `.hydra/resume-<stamp>/`.
        """
        launch = [*self.overrides, *extra]
        if self.run_dir is not None:
            launch += ["resume=auto", f"hydra.output_subdir=.hydra/resume-{stamp}"]
        if self.subdir is not None:
            launch.append(f"hydra.sweep.subdir={quoted(self.subdir)}")
        return launch


@dataclass
class SweepPlan:
    record: SweepRecord
    jobs: list[SweepJob]

    @property
    def to_run(self) -> list[SweepJob]:
        return [job for job in self.jobs if job.action != "skip"]

    def batches(self) -> list[list[SweepJob]]:
        """Jobs to run in launcher batches: one batch when every job's dir is pinned, else runs of
        consecutive numbers (a launcher numbers a batch from its first job, and the dir may follow)."""
        if all(job.subdir is not None for job in self.to_run):
            return [self.to_run] if self.to_run else []
        batches: list[list[SweepJob]] = []
        for job in self.to_run:
            if batches and batches[-1][-1].num == job.num - 1:
                batches[-1].append(job)
            else:
                batches.append([job])
        return batches

    def summary_lines(self) -> list[str]:
        """One line per job: number, swept values, status, what the resume does."""
        swept = self.record.swept_keys
        names = [job_run_name(job.overrides, swept) or "(no overrides)" for job in self.jobs]
        width = max(len(n) for n in names)
        lines = []
        for job, name in zip(self.jobs, names, strict=True):
            state = job.status
            if job.checkpoint_step is not None and job.action != "skip":
                state += f" at step {job.checkpoint_step}"
            lines.append(f"  job {job.num:>3}  {name:<{width}}  {state:<24}  -> {job.action}")
        return lines


def expected_jobs(record: SweepRecord) -> list[list[str]] | None:
    """The grid of a basic sweeper's jobs, re-derived from its record with Hydra's own code; None otherwise."""
    if record.sweeper != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = [f"{k}={v}" for k, v in record.sweeper_params.items()] + record.task_overrides
    parsed = OverridesParser.create().parse_overrides(arguments)
    return [task_overrides(job) for job in BasicSweeper.split_arguments(parsed, None)[0]]


def started_jobs(sweep_dir: Path) -> dict[int, tuple[Path, list[str]]]:
    """{job num: (job dir, its task overrides)} for every job Hydra launched under `sweep_dir`."""
    found: dict[int, tuple[Path, list[str]]] = {}
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        hydra_file = overrides_file.parent / "hydra.yaml"
        if not hydra_file.exists():
            continue
        num = ((yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("job") or {}).get("num")
        if num is None:
            continue
        if int(num) in found:
            raise UserError(f"{found[int(num)][0]} and {job_dir} both claim job {num}; the sweep dir is inconsistent")
        found[int(num)] = (job_dir, task_overrides([str(o) for o in yaml.safe_load(overrides_file.read_text()) or []]))
    return found


def same_job(recorded: list[str], expected: list[str]) -> bool:
    """A job dir's overrides are the expected ones, plus any a resume was allowed to add."""
    head, tail = recorded[: len(expected)], recorded[len(expected) :]
    return head == expected and all(is_resumable_key(key_of(o)) for o in parse(tail))


def job_status(run_dir: Path | None) -> tuple[RunStatus | str, int | None]:
    from gpt2exp.checkpoint import newest_step

    if run_dir is None:
        return NOT_STARTED, None
    check_unlocked(run_dir)  # a job still training there: refuse the whole resume
    status = run_status(run_dir) or RunStatus.interrupted  # no run.json: killed while it set up
    to_resume = status in (RunStatus.failed, RunStatus.preempted, RunStatus.interrupted)
    # a job to resume whose checkpoint.dir is gone refuses the whole resume, rather than start it again
    return status, newest_step(existing_checkpoints_root(run_dir) if to_resume else checkpoints_root(run_dir))


def plan_sweep(sweep_dir: Path) -> SweepPlan:
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
        run_dir, subdir = None, str(num) if record.subdir == JOB_NUM_SUBDIR else None
        if num in started:
            run_dir, recorded = started[num]
            subdir = str(run_dir.relative_to(sweep_dir))
            if not same_job(recorded, overrides):
                raise UserError(
                    f"job {num} in {run_dir} was launched with {' '.join(recorded)}, but the sweep's "
                    f"{SWEEP_RECORD} gives {' '.join(overrides)}; the sweep dir does not match its record"
                )
        status, step = job_status(run_dir)
        jobs.append(SweepJob(num, overrides, run_dir, status, step, subdir))
    if not jobs:
        raise UserError(f"sweep {sweep_dir} has no jobs to resume (none were started and its sweeper has no grid)")
    return SweepPlan(record, jobs)


_planned: dict[Path, SweepPlan] = {}  # plans made before Hydra started, for the sweeper of this process


def hand_over(plan: SweepPlan) -> None:
    """Keep `plan` for the `gpt2exp_resume` sweeper, which runs in this process once Hydra starts."""
    _planned[plan.record.dir.resolve()] = plan


def take_plan(sweep_dir: Path) -> SweepPlan:
    """The plan handed over for `sweep_dir`; planned now only when the sweeper was named by hand."""
    return _planned.pop(sweep_dir.resolve(), None) or plan_sweep(sweep_dir)


def recorded_hydra_overrides(record: SweepRecord, today: list[str]) -> list[str]:
    """The sweep's own Hydra settings (launcher and its options) to apply again on resume.

    A launcher named on today's command line replaces the recorded one and its options.
    """
    dropped = ["hydra.mode", "hydra.sweep.dir", "hydra/sweeper", "hydra.sweeper"]
    if any(key_of(o) == "hydra/launcher" for o in parse(today)):
        dropped += ["hydra/launcher", "hydra.launcher"]
    return [o.input_line for o in parse(record.hydra_overrides) if not key_of(o).startswith(tuple(dropped))]
