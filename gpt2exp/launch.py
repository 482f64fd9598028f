"""What happens to the command line before Hydra runs.

Hydra writes the run dir (and, on a reused dir, overwrites `.hydra/`) before the task function
starts, so every check that must reject a command without touching the disk happens here, on
`sys.argv`:
- the config must compose against the typed schema and pass `config.validate`;
- `resume=...` must name a resumable run, not be combined with `-m`, not be older than the run's
  newest checkpoint, and change only whitelisted keys of the config of record;
- a resume is pointed at its own run dir, with Hydra's files going to `.hydra/resume-<stamp>/`.
Each failure is one `error:` line and exit code 2.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gpt2exp.errors import UserError, fail
from gpt2exp.rundir import (
    RESUMABLE_KEYS,
    check_unlocked,
    forbidden_changes,
    is_resumable_key,
    leaves,
    override_key,
    read_config_of_record,
    refuse_existing_run,
    resume_target,
)
from gpt2exp.sweep import holds_job_dirs, is_sweep_dir, resume_stamp

# Hydra flags that only print something: no run, nothing to check.
INFO_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--version",
    "--shell-completion",
    "-sc",
}
MULTIRUN_FLAGS = {"--multirun", "-m"}

# Hydra plugins the configs name: (group, option) -> (module, pip package).
PLUGINS = {
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    ("hydra/launcher", "submitit_local"): ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("hydra/launcher", "submitit_slurm"): ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("hydra/launcher", "slurm"): ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
    ("hparams_search", "*"): ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
}


def compose(conf_dir: str, overrides: list[str]) -> DictConfig:
    """The job config for `overrides`, typed and validated; composition errors become UserError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from gpt2exp.config import register_schemas, typed, validate

    register_schemas()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name="train"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UserError(_one_line(exc)) from None
    typed(OmegaConf.to_container(cfg))  # catches keys added with `+group.key=...`, which slip past Hydra's own check
    validate(cfg)
    return cfg


def _one_line(exc: BaseException) -> str:
    """Hydra's composition errors as one line: what failed, the key, and the choices if any."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    message = lines[0] if lines else type(exc).__name__
    if "Available options" in str(exc):
        start = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        choices = [ln for ln in lines[start + 1 :] if not ln.startswith(("Config search path", "provider="))]
        return f"{message}; available: {', '.join(choices)}"
    detail = lines[1:]
    if exc.__cause__ is not None:
        detail = [ln.strip() for ln in str(exc.__cause__).splitlines() if ln.strip()] + detail
    key = next((ln.split(":", 1)[1].strip() for ln in detail if ln.startswith("full_key:")), None)
    noise = ("reference_type", "object_type")
    reason = next((ln for ln in detail if ":" not in ln[:12] and not ln.startswith(noise)), None)
    if reason:
        message = f"{message.rstrip(':')}: {reason}"
    return message + (f" (key {key})" if key else "")


def _overrides(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith("-") and "=" in a]


def _value(overrides: list[str], key: str) -> str | None:
    found = [o.split("=", 1)[1] for o in overrides if override_key(o) == key]
    return found[-1] if found else None


def prepare_argv(argv: list[str], conf_dir: str) -> list[str]:
    """Check the command line and return the argv Hydra should see; exits 2 on bad input."""
    try:
        return _prepare(argv, conf_dir)
    except UserError as exc:
        fail(str(exc))
        raise  # unreachable: fail() exits


def check_plugins(overrides: list[str]) -> None:
    """A launcher or sweeper that is not installed: say which pip package provides it."""
    from importlib.util import find_spec

    for override in overrides:
        group, _, option = override.partition("=")
        group = group.lstrip("+~")
        plugin = PLUGINS.get((group, option)) or PLUGINS.get((group, "*"))
        if plugin and find_spec(plugin[0]) is None:
            raise UserError(
                f"{group}={option} needs the Hydra plugin {plugin[1]}, which is not installed: "
                f"pip install {plugin[1]}  (or pip install -e '.[sweeps]' for all of them)"
            )


def _prepare(argv: list[str], conf_dir: str) -> list[str]:
    args = argv[1:]
    if any(a in INFO_FLAGS for a in args):
        return argv
    multirun = any(a in MULTIRUN_FLAGS for a in args)
    overrides = _overrides(args)
    check_plugins(overrides)
    job_overrides = [o for o in overrides if not override_key(o).startswith("hydra")]
    resume = _value(overrides, "resume")
    if resume not in (None, "null", "auto"):
        resume_dir = Path(os.path.expanduser(resume))
        if is_sweep_dir(resume_dir):
            return _resume_sweep(argv[0], args, resume, job_overrides, conf_dir)
        if holds_job_dirs(resume_dir):
            raise UserError(
                f"{resume} holds sweep jobs but no multirun.yaml (an Optuna study keeps none), so its job list "
                "is unknown; resume each unfinished job with resume=<job dir>"
            )
    if multirun and resume in (None, "null", "auto"):
        # resume=auto: each job resumes its own dir when it holds a checkpoint (a requeued SLURM job)
        check_sweep_values(conf_dir, job_overrides)
        return argv
    if resume in (None, "null"):
        if not multirun:
            fixed_dir = _value(overrides, "hydra.run.dir")
            if fixed_dir:
                refuse_existing_run(Path(fixed_dir))
            compose(conf_dir, job_overrides)
        return argv
    if multirun:
        raise UserError(
            "-m cannot be combined with resume=<run dir>; resume a sweep with resume=<multirun/<date>/<time>>, "
            "or use -m ... resume=auto to let each job continue its own dir"
        )
    fixed_dir = _value(overrides, "hydra.run.dir")
    target = resume_target(resume, Path(fixed_dir) if fixed_dir else None)
    if target is None:  # resume=auto and nothing to resume yet: a fresh start in the fixed dir
        compose(conf_dir, job_overrides)
        return argv
    check_unlocked(target.run_dir)
    if target.checkpoint is not None:
        _refuse_older_checkpoint(target.checkpoint)
    record = read_config_of_record(target.run_dir)
    without = [o for o in job_overrides if override_key(o) == "resume"]
    changed = forbidden_changes(record, compose(conf_dir, job_overrides), compose(conf_dir, without))
    if changed:
        recorded = leaves(record)
        details = ", ".join(f"{k} (recorded {recorded.get(k)!r})" for k in changed)
        raise UserError(
            f"resume cannot change {details}: the run is rebuilt from its config of record; "
            f"allowed on resume: {', '.join(RESUMABLE_KEYS[1:])}"
        )
    stamp = resume_stamp()
    kept = [a for a in args if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return [
        argv[0],
        *kept,
        f"hydra.run.dir={target.run_dir}",
        f"hydra.output_subdir=.hydra/resume-{stamp}",
    ]


def check_sweep_values(conf_dir: str, job_overrides: list[str]) -> None:
    """Compose a sweep's jobs so that every swept value is tried once, before any job starts.

    Each swept key's values are tried with the other keys at their first value: as many
    compositions as values in all, not the product. Ranges and intervals (Optuna's) are left to
    the sweeper.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(job_overrides)
        choices = []
        for override in parsed:
            if not override.is_sweep_override():
                choices.append([override.input_line])
            elif override.is_discrete_sweep():
                key = override.get_key_element()
                choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    except HydraException as exc:
        raise UserError(_one_line(exc)) from None
    tried: set[tuple[str, ...]] = set()
    for i, values in enumerate(choices):
        for value in values:
            job = tuple(value if k == i else other[0] for k, other in enumerate(choices))
            if job not in tried:
                tried.add(job)
                compose(conf_dir, list(job))


def _resume_sweep(program: str, args: list[str], resume: str, job_overrides: list[str], conf_dir: str) -> list[str]:
    """Print the plan for every job of the sweep, then run the unfinished ones as a multirun."""
    from gpt2exp.sweep import RESUME_SWEEPER, plan_sweep, recorded_hydra_overrides

    sweep_dir = Path(os.path.normpath(os.path.expanduser(resume)))
    extra = [o for o in job_overrides if override_key(o) != "resume"]
    fixed = [o for o in extra if not is_resumable_key(override_key(o))]
    if fixed:
        raise UserError(
            f"a sweep resume rebuilds each job from its config of record and cannot change {', '.join(fixed)}; "
            f"allowed on resume: {', '.join(RESUMABLE_KEYS[1:])}"
        )
    hydra_args = [o for o in _overrides(args) if override_key(o).startswith("hydra")]
    not_launcher = [o for o in hydra_args if not override_key(o).startswith(("hydra/launcher", "hydra.launcher"))]
    if not_launcher:
        raise UserError(
            f"a sweep resume keeps the sweep's Hydra settings and cannot change {', '.join(not_launcher)}; "
            "only hydra/launcher=... and hydra.launcher.* may be given"
        )
    flags = [a for a in args if a not in MULTIRUN_FLAGS and not (not a.startswith("-") and "=" in a)]
    if extra and not flags:  # bad values of allowed keys fail here, before any job dir is written to
        compose(conf_dir, extra)
    plan = plan_sweep(sweep_dir)
    jobs, todo = plan.jobs, plan.to_run
    completed, diverged = (sum(job.status == s for job in jobs) for s in ("completed", "diverged"))
    counts = [f"{len(jobs)} jobs", f"{completed} completed", *([f"{diverged} diverged"] if diverged else [])]
    print(f"sweep {sweep_dir}: {', '.join(counts)}, {len(todo)} to run", flush=True)
    print("\n".join(plan.summary_lines()), flush=True)
    if not todo:
        print(f"nothing to resume: every job is completed{' or diverged' if diverged else ''}", flush=True)
        raise SystemExit(0)
    return [
        program,
        *flags,
        "--multirun",
        *recorded_hydra_overrides(plan.record, hydra_args),
        *hydra_args,
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra/sweeper={RESUME_SWEEPER}",
        f"resume={sweep_dir}",
        *extra,
    ]


def _refuse_older_checkpoint(checkpoint: Path) -> None:
    from gpt2exp.checkpoint import newest_step, step_dir_name, step_of

    newest = newest_step(checkpoint.parent)
    if newest is not None and newest > step_of(checkpoint):
        raise UserError(
            f"{checkpoint.name} is older than this run's newest checkpoint {step_dir_name(newest)}; resuming it "
            f"would overwrite newer state. Resume the run dir ({checkpoint.parent.parent}) instead, "
            f"or copy the run dir and resume the copy"
        )
