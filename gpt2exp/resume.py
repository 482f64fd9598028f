"""The run plan: a fresh start or a resume, decided once, before Hydra writes anything.

`plan_run` reads the command line's `resume=` and `hydra.run.dir=` and the run dir on disk, and
returns a `RunPlan`: where the run trains, which checkpoint it continues from, and the config it
trains with (on resume: the config of record with this command's allowed overrides applied). The
launcher (launch.py) computes it for a single run before Hydra starts; the job receives it. A sweep
job, whose dir only Hydra knows, computes its own with `plan_job` at its start.

Only the keys in RESUMABLE_KEYS may differ from the record on resume; any other change is refused.
A run that already completed `trainer.max_steps`, or stopped early, is not resumed (`RunComplete`:
nothing changes), and a run that never saved a checkpoint is restarted from step 0 with its config of
record.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from gpt2exp.errors import UserError
from gpt2exp.overrides import key_of, parse
from gpt2exp.rundir import (
    RunStatus,
    check_unlocked,
    checkpoints_root,
    existing_checkpoints_root,
    is_run_dir,
    read_config_of_record,
    read_run_json,
)

if TYPE_CHECKING:
    from gpt2exp.rundir import Footprint, RunLock

# Keys a resume command may change: none of them alters the math of steps already planned.
# (trainer.num_threads and device change floating-point bits, not meaning: allowed, documented.)
RESUMABLE_KEYS = (
    "resume",
    "device",
    "trainer.max_steps",
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.sample_every",
    "trainer.num_samples",
    "trainer.sample_tokens",
    "trainer.progress",
    "trainer.num_threads",
    "data.cache_dir",
    "data.num_proc",  # how many processes tokenize: the shards are the same bytes for any number
    "checkpoint",
    "logger",
    "distributed",  # the same run continues on another number of processes or strategy (resharded)
)


# Keys of a resumable section that stay as recorded: the checkpoints stay where run.json says they
# are (checkpoint.dir is read once, at the first launch), so a resume never moves or orphans them.
FIXED_ON_RESUME = ("checkpoint.dir",)


def is_resumable_key(key: str) -> bool:
    if key in FIXED_ON_RESUME:
        return False
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_KEYS)


def allowed_keys_text() -> str:
    fixed = {key.split(".")[0]: key for key in FIXED_ON_RESUME}
    return ", ".join(f"{key} (not {fixed[key]})" if key in fixed else key for key in RESUMABLE_KEYS[1:])


class RunComplete(Exception):
    """The run to resume already completed the steps asked for, or stopped early: nothing to do, nothing
    changed (exit 0)."""

    def __init__(self, run_dir: Path, step: int, stopped_early: bool = False):
        if stopped_early:
            message = f"run {run_dir} stopped early at step {step}: val/loss stopped improving; it is complete"
        else:
            message = f"run {run_dir} is complete at step {step}; raise trainer.max_steps to continue"
        super().__init__(message)
        self.run_dir, self.step = run_dir, step


@dataclass(frozen=True)
class ResumeTarget:
    run_dir: Path
    checkpoint: Path | None  # a specific checkpoint dir, or None for the run's newest good one
    restart: bool = False  # the run never saved a checkpoint: it starts again at step 0 from its config of record


@dataclass(frozen=True)
class RunPlan:
    """What one run does. `resume_from` None is a fresh start; `run_dir` None is Hydra's new dir.

    For a run dir named on the command line the launcher locks it before Hydra writes there (`lock`,
    held) and notes what the launch adds to it (`footprint`), so a job refused later takes that back.
    """

    run_dir: Path | None
    resume_from: ResumeTarget | None
    config: DictConfig | None  # the config to train with; None: the one Hydra composes (fresh start)
    lock: RunLock | None = field(default=None, compare=False)
    footprint: Footprint | None = field(default=None, compare=False)

    @property
    def is_resume(self) -> bool:
        return self.resume_from is not None


# -- where `resume=` points ----------------------------------------------------------------------


def resume_target(resume: str, fixed_run_dir: Path | None) -> ResumeTarget | None:
    """Where `resume=<value>` points; None means `auto` found nothing to resume (start fresh).

    Raises UserError for a path that does not exist or is not a run dir, and for a run whose
    checkpoints dir outside the run dir (checkpoint.dir) is gone; a run dir without a checkpoint is a
    target to restart from step 0.
    """
    from gpt2exp.checkpoint import list_checkpoints
    from gpt2exp.targets import resolve_target

    if resume == "auto":
        if fixed_run_dir is None:
            raise UserError("resume=auto needs a fixed run dir: add hydra.run.dir=<dir> to the command")
        if is_run_dir(fixed_run_dir) and list_checkpoints(existing_checkpoints_root(fixed_run_dir.resolve())):
            return ResumeTarget(fixed_run_dir.resolve(), None)
        return None
    try:
        target = resolve_target(resume)
    except UserError as exc:
        if not Path(os.path.expanduser(resume)).exists():
            raise
        raise UserError(
            f"{exc}, nor a sweep dir (multirun.yaml); pass a run dir such as outputs/<date>/<time>, one of its "
            "checkpoints/step_* dirs, or a sweep dir such as multirun/<date>/<time>"
        ) from None
    if target.run_dir is None:
        raise UserError(f"{resume} is a checkpoint outside a run dir; resume needs the run dir around it")
    restart = target.checkpoint is None and not list_checkpoints(existing_checkpoints_root(target.run_dir))
    return ResumeTarget(target.run_dir, target.checkpoint, restart)


def completed_step(run_dir: Path) -> int | None:
    """The step a run marked `completed` or `early_stopped` ended at (run.json, else its newest
    checkpoint); None otherwise."""
    from gpt2exp.checkpoint import newest_step

    info = read_run_json(run_dir)
    if info.get("status") not in (RunStatus.completed, RunStatus.early_stopped):
        return None
    step = info.get("step")
    return step if isinstance(step, int) else newest_step(checkpoints_root(run_dir))


def refuse_complete(run_dir: Path, max_steps: int) -> None:
    """Resuming a run that already reached `max_steps`, or stopped early (whatever `max_steps` now
    says: its early-stopping state says stop), would only repeat its end (samples, W&B, report)."""
    step = completed_step(run_dir)
    if step is not None and read_run_json(run_dir).get("status") == RunStatus.early_stopped:
        raise RunComplete(run_dir, step, stopped_early=True)
    if step is not None and step >= max_steps:
        raise RunComplete(run_dir, step)


def refuse_max_steps_behind(target: ResumeTarget, max_steps: int) -> None:
    """An unfinished run resumed with trainer.max_steps below its checkpoint's step would end at once,
    recorded completed without training or evaluating (a typo, 5 for 500): refused."""
    from gpt2exp.checkpoint import newest_step, step_of

    if target.restart:
        return
    step = step_of(target.checkpoint) if target.checkpoint else newest_step(checkpoints_root(target.run_dir))
    if step is not None and max_steps < step:
        raise UserError(
            f"trainer.max_steps={max_steps} is below step {step}, where the run resumes; resume with "
            f"trainer.max_steps={step} or more"
        )


def refuse_existing_run(run_dir: Path) -> None:
    """A fresh start must not overwrite another run's record, metrics or checkpoints."""
    if is_run_dir(run_dir):
        raise UserError(
            f"{run_dir} already holds a run; continue it with resume={run_dir} (or resume=auto), "
            "or choose another hydra.run.dir"
        )


def refuse_older_checkpoint(checkpoint: Path, run_dir: Path) -> None:
    from gpt2exp.checkpoint import newest_step, step_dir_name, step_of

    newest = newest_step(checkpoint.parent)
    if newest is not None and newest > step_of(checkpoint):
        inside = run_dir in checkpoint.parents  # a copy of the run dir copies them (not with checkpoint.dir)
        raise UserError(
            f"{checkpoint.name} is older than this run's newest checkpoint {step_dir_name(newest)}; resuming it "
            f"would overwrite newer state. Resume the run dir ({run_dir}) instead"
            + (", or copy the run dir and resume the copy" if inside else "")
        )


def refuse_moved_checkpoints(run_dir: Path, record: DictConfig, current: DictConfig, without: DictConfig) -> None:
    """A resume that names another checkpoint.dir than the record's is refused, naming where the
    checkpoints are: they are never moved, so none is orphaned (FIXED_ON_RESUME)."""
    asked = current.checkpoint.dir
    if asked == without.checkpoint.dir or asked == record.checkpoint.dir:  # not on the command line, or as recorded
        return
    raise UserError(
        f"resume cannot change checkpoint.dir (recorded {record.checkpoint.dir!r}): the checkpoints of {run_dir} "
        f"are in {checkpoints_root(run_dir)} and stay there; resume without checkpoint.dir"
    )


# -- the plan ------------------------------------------------------------------------------------


def plan_run(resume: str | None, fixed_dir: str | None, job_overrides: list[str], compose: Any) -> RunPlan:
    """The plan of a single run from its command line; `compose(overrides)` gives the typed job config."""
    fixed = Path(os.path.expanduser(fixed_dir)) if fixed_dir else None
    from gpt2exp.checkpoint import check_loadable
    from gpt2exp.config import check_applicable

    target = resume_target(resume, fixed) if resume not in (None, "null") else None
    if target is None:  # a fresh start (resume=auto with nothing to resume is one too)
        if fixed is not None and resume != "auto":
            refuse_existing_run(fixed)  # resume=auto found no checkpoint: its earlier attempt is void
        return RunPlan(fixed.resolve() if fixed else None, None, None)
    check_unlocked(target.run_dir)
    if target.checkpoint is not None:
        refuse_older_checkpoint(target.checkpoint, target.run_dir)
    record = read_config_of_record(target.run_dir)
    current = compose(job_overrides)
    without = compose([o.input_line for o in parse(job_overrides) if key_of(o) == "resume"])
    refuse_moved_checkpoints(target.run_dir, record, current, without)
    refuse_forbidden_changes(target.run_dir, record, current, without, job_overrides)
    cfg = config_for_resume(record, current, job_overrides)
    check_applicable(cfg, {key_of(o) for o in parse(job_overrides)})  # logger.project on a run without W&B
    refuse_complete(target.run_dir, cfg.trainer.max_steps)
    refuse_max_steps_behind(target, cfg.trainer.max_steps)
    if not target.restart:
        check_loadable(checkpoints_root(target.run_dir), target.checkpoint, cfg.model, cfg.checkpoint.verify)
    return RunPlan(target.run_dir, target, cfg)


def plan_job(cfg: DictConfig, run_dir: Path, job_overrides: list[str], in_sweep: bool = False) -> RunPlan:
    """The plan of a job whose dir is known only once Hydra made it: a sweep's job, or a call from Python.

    A sweep job resumes its dir when that holds a checkpoint, as `resume=auto` does: a job requeued
    after a signal (SLURM, submitit), a trial among them, reruns its first attempt's command in the
    dir that attempt made. A dir of another sweep is not taken: the launcher refuses a sweep dir that
    holds one, and a job whose config differs from the record is refused here.
    Raises RunComplete for a job that already completed its steps.
    """
    from gpt2exp.composing import compose
    from gpt2exp.config import CONF_DIR, check_applicable

    auto = in_sweep or cfg.resume == "auto"
    target = resume_target("auto", run_dir) if auto else None
    if target is None:
        if not auto:
            refuse_existing_run(run_dir)
        return RunPlan(run_dir, None, None)
    record = read_config_of_record(run_dir)
    refuse_forbidden_changes(run_dir, record, cfg, compose(CONF_DIR, ["resume=auto"]), job_overrides)
    resumed = config_for_resume(record, cfg, job_overrides)
    check_applicable(resumed, {key_of(o) for o in parse(job_overrides)})
    refuse_complete(run_dir, resumed.trainer.max_steps)  # past max_steps (a sweep's grid value): it ends there
    return RunPlan(run_dir, target, resumed)


def refuse_forbidden_changes(
    run_dir: Path, record: DictConfig, current: DictConfig, without: DictConfig, job_overrides: list[str]
) -> None:
    """A resume is rebuilt from its config of record: a command line that changes a value outside the
    whitelist is refused (`current` is composed with its overrides, `without` without them)."""
    named = [key_of(o) for o in parse(job_overrides)]
    changed = forbidden_changes(record, current, without, first_launch(run_dir), named)
    if changed:
        recorded = leaves(record)
        details = ", ".join(f"{k} (recorded {_shown(recorded.get(k))!r})" for k in changed)
        raise UserError(
            f"resume cannot change {details}: the run is rebuilt from its config of record; "
            f"allowed on resume: {allowed_keys_text()}"
        )


# -- configs -------------------------------------------------------------------------------------


def leaves(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config to {dotted key: value}."""
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for key, value in cfg.items():
            out.update(leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: cfg}


def forbidden_changes(
    record: DictConfig,
    with_overrides: DictConfig,
    without_overrides: DictConfig,
    first: dict[str, Any] | None = None,
    named: Sequence[str] = (),
) -> list[str]:
    """Keys the command line's overrides touch, outside the whitelist, whose value differs from the record.

    Touched: a key whose value the overrides change, and every key they name (`named`: `optimizer.lr`,
    or a group such as `model`, its keys), even set to the default (the record may hold another value).
    Not a change:
    - a key FIXED_ON_RESUME, kept from the record whatever a group gives it (it has its own check);
    - a key the Trainer rewrites to what ran (config.RECORDED_AS_RUN) that equals `first`, the first
      launch's composed values: the original command, requeued, asks for what it asked then;
    - null for a value derived at the first launch (RESOLVED_AT_FIRST_LAUNCH), a local path that names
      the recorded one from here (LOCAL_PATH_KEYS);
    - a key added after the record was written (config.ADDED_KEYS) that a group gives its default today,
      where the record holds the value a run from before it had.
    """
    from gpt2exp.config import ADDED_KEYS, RECORDED_AS_RUN

    record_leaves, new, old = leaves(record), leaves(with_overrides), leaves(without_overrides)
    first = first or {}
    changed = {k for k in new.keys() | old.keys() if new.get(k) != old.get(k)}
    grouped = {k for k in new for name in named if k == name or k.startswith(f"{name}.")} - changed
    grouped -= {k for k in grouped if k in ADDED_KEYS and _same(record_leaves.get(k), ADDED_KEYS[k])}
    return sorted(
        key
        for key in (changed | grouped) - set(FIXED_ON_RESUME)
        if not is_resumable_key(key)
        and not _same(new.get(key), record_leaves.get(key))
        and not (key in RECORDED_AS_RUN and key in first and _same(new.get(key), first[key]))
        and not (key in RESOLVED_AT_FIRST_LAUNCH and new.get(key) is None)  # "derive it": the record did
        and not (key in LOCAL_PATH_KEYS and _same(_as_recorded(key, new), record_leaves.get(key)))
    )


def _shown(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _same(a: Any, b: Any) -> bool:
    """Config values alike, an enum member and its value too (a record read back holds the value)."""
    return _shown(a) == _shown(b)


def _as_recorded(key: str, values: dict[str, Any]) -> Any:
    """The value of LOCAL_PATH_KEYS `key` in the config `values` ({dotted key: value}) as
    fix_values_of_record records it, taken from the current dir."""
    from gpt2exp.sources import names_data_files

    value = values.get(key)
    if key == "data.val_split":  # validation files beside local data files; else a split's name
        local = value and values.get("data.source") == "hf_dataset" and names_data_files(values["data.dataset"])
        return absolute_if_local(value, pattern=True) if local else value
    if isinstance(value, str):
        return value if value in NOT_PATHS else absolute_if_local(value)
    if isinstance(value, list | ListConfig):  # data.files: paths and globs
        return [absolute_if_local(str(v), pattern=True) for v in value]
    return value


def first_launch(run_dir: Path) -> dict[str, Any]:
    """{dotted key: value} the run's first launch asked of the keys recorded as what ran: run.json's
    `requested`; for a run from before it, the config Hydra composed then (.hydra/config.yaml, which
    Hydra rewrites in a sweep job requeued), or {}."""
    import yaml

    requested = read_run_json(run_dir).get("requested")
    if isinstance(requested, dict):
        return requested
    try:
        return leaves(yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        return {}


def config_for_resume(record: DictConfig, current: DictConfig, job_overrides: list[str]) -> DictConfig:
    """The config of record with the whitelisted keys this command overrides taken from `current`."""
    cfg = record.copy()
    for override in parse(job_overrides):
        key = key_of(override)
        if key != "resume" and is_resumable_key(key):
            OmegaConf.update(cfg, key, OmegaConf.select(current, key), merge=False)
    for key in FIXED_ON_RESUME:  # `checkpoint=<option>` replaced the whole section
        OmegaConf.update(cfg, key, OmegaConf.select(record, key), merge=False)
    for key in ("logger.group", "logger.name"):  # a sweep job keeps its W&B group and name under a new logger
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, OmegaConf.select(record, key), merge=False)
    cfg.resume = current.resume
    return cfg


def config_digest(cfg: DictConfig) -> str:
    """sha256 of the values of record that a resume may not change (whitelisted keys left out).

    A key added later (config.ADDED_KEYS) is left out while it holds the value a record without it is
    read with, so a checkpoint saved before the key existed still matches its run's config.
    """
    import hashlib
    import json

    from gpt2exp.config import ADDED_KEYS

    fixed = {
        k: v
        for k, v in sorted(leaves(cfg).items())
        if not is_resumable_key(k) and not (k in ADDED_KEYS and v == ADDED_KEYS[k])
    }
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()


RESOLVED_AT_FIRST_LAUNCH = ("scheduler.decay_steps", "trainer.num_threads")  # null: derived, then recorded


def fix_values_of_record(cfg: DictConfig, num_threads: int) -> DictConfig:
    """Resolve what a resume must not re-derive: the schedule's horizon, the CPU thread count, and the
    local paths the config names, made absolute (a resume, evaluate or generate run from another
    directory finds the same files)."""
    cfg = cfg.copy()
    if cfg.scheduler.decay_steps is None:
        cfg.scheduler.decay_steps = cfg.trainer.max_steps
    if cfg.trainer.num_threads is None:
        cfg.trainer.num_threads = num_threads
    values = leaves(cfg)
    for key in LOCAL_PATH_KEYS:
        if values.get(key) is not None:
            OmegaConf.update(cfg, key, _as_recorded(key, values), merge=False)
    return cfg


# keys that may name a local file or dir (or, but data.files, a hub name where none exists);
# data.val_split is a path only beside a data.dataset of local data files (else a split's name)
LOCAL_PATH_KEYS = ("data.files", "data.dataset", "data.val_split", "data.tokenizer.name", "model.init")
NOT_PATHS = ("scratch", "bpe")  # model.init=scratch, data.tokenizer.name=bpe: gpt2exp's own, whatever lies in the dir


def absolute_if_local(value: str, pattern: bool = False) -> str:
    """`value` as an absolute path where it names a local path (a glob matching one), else as it is: a
    hub name or a split name. A `pattern` (data.files) is always a local path or glob."""
    import glob

    path = os.path.expanduser(value)
    if os.path.isabs(path) or not (pattern or os.path.exists(path) or glob.glob(path, recursive=True)):
        return value
    return os.path.abspath(path)
