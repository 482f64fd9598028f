"""What happens to the command line before Hydra runs.

Hydra writes the run dir (and, on a reused dir, overwrites `.hydra/`) before the task function
starts, so every check that must reject a command without touching the disk happens here, on
`sys.argv`, and the run is planned here once (resume.plan_run) and handed to the job:
- the config must compose against the typed schema and pass `config.validate`, and what it names
  must be there: the data files, the device (every swept value of a sweep is checked too), a run or
  sweep dir this process can make;
- a sweep dir where a sweep already started jobs is not reused;
- `resume=...` must name a resumable run, not be combined with `-m`, not be older than the run's
  newest checkpoint, and change only whitelisted keys of the config of record; a run that already
  completed its steps is left as it is (one line, exit 0);
- a resume is pointed at its own run dir, with Hydra's files going to `.hydra/resume-<stamp>/`;
- a run dir named on the command line (a resume, `hydra.run.dir=`) is locked here, before Hydra
  writes into it, and what this launch adds to it is noted (rundir.Footprint).
Each failure is one `error:` line and exit code 2. Overrides are read with Hydra's own parser.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from gpt2exp.composing import (
    add_config_dir,
    compose,
    compose_with_hydra,
    group_options,
    hydra_value,
    one_line,
    with_added_config_dir,
)
from gpt2exp.distributed import check_world, world_from_env
from gpt2exp.errors import UserError, fail
from gpt2exp.overrides import (
    INFO_FLAGS,
    MULTIRUN_FLAGS,
    is_hydra,
    key_of,
    last_value,
    parse,
    quoted,
    split_argv,
)
from gpt2exp.resume import RunComplete, RunPlan, allowed_keys_text, is_resumable_key, plan_run
from gpt2exp.rundir import Footprint, RunLock, RunStatus, check_checkpoints_dir, check_writable_dir, timestamp
from gpt2exp.sweep import holds_job_dirs, is_sweep_dir

# Hydra plugins the configs name: (group, option) -> (module, pip package).
PLUGINS = {
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    ("hydra/launcher", "submitit_local"): ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("hydra/launcher", "submitit_slurm"): ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("hydra/launcher", "slurm"): ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("hydra/sweeper", "gpt2exp_optuna"): ("optuna", "optuna"),  # the sweeper itself ships in hydra_plugins
    ("hparams_search", "*"): ("optuna", "optuna"),
}


def check_available(cfg: DictConfig) -> None:
    """What a job would otherwise find missing only after Hydra wrote its run dir: data files, the device,
    a checkpoint.dir it cannot write in."""
    if cfg.data.source == "text_files":
        found = False
        for pattern in cfg.data.files:
            matched = glob.glob(os.path.expanduser(pattern), recursive=True)
            if not matched:
                raise UserError(f"data file not found: {pattern}; check the path in data.files=[...]")
            found = found or any(os.path.isfile(p) for p in matched)
        if not found:
            raise UserError("data.files names no files; set data.files=[path/to/text.txt]")
    if cfg.device == "cuda" and not cuda_may_be_available():
        raise UserError("device=cuda but no CUDA GPU is available; use device=auto or device=cpu")
    if cfg.device == "mps" and sys.platform != "darwin":
        raise UserError("device=mps but MPS is not available; use device=auto or device=cpu")
    check_checkpoints_dir(cfg.checkpoint.dir)
    # a cache this user may only read can hold prepared entries: one it lacks is refused by the job, in one line
    check_writable_dir("data.cache_dir", cfg.data.cache_dir, "the token cache", readable=True)
    check_world(cfg.distributed, cfg.trainer, str(cfg.device), cuda_may_be_available(), world_from_env())


def check_new_run(cfg: DictConfig) -> None:
    """`check_available`, and what only a new run is refused for (a run of record is resumed as it was)."""
    if cfg.model.init != "scratch":
        if cfg.data.tokenizer.name == "bpe":
            raise UserError(
                f"model.init={cfg.model.init} reads its own tokenizer's token ids, not those of a BPE trained here; "
                f"add data.tokenizer.name={cfg.model.init} (as +experiment=finetune_gpt2 does)"
            )
        from gpt2exp.model import check_init

        check_init(cfg.model.init)
    check_available(cfg)


def cuda_may_be_available() -> bool:
    """False only where CUDA surely is not, found without importing torch (a second): GPUs hidden by
    CUDA_VISIBLE_DEVICES, a torch build without CUDA or ROCm, or on Linux no NVIDIA driver. Anything
    else is left to torch.cuda.is_available() in the job."""
    from importlib.util import find_spec

    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    spec = find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return True
    try:
        version = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except OSError:
        return True
    built = dict(re.findall(r"^(cuda|hip)\b[^=\n]*=\s*(.+?)\s*$", version, re.MULTILINE))
    if built.get("cuda") == "None" and built.get("hip") == "None":
        return False
    if built.get("cuda", "None") != "None" and sys.platform == "linux":
        return any(Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg"))
    return True


def prepare_argv(argv: list[str], conf_dir: str) -> tuple[list[str], RunPlan | None]:
    """Check the command line; returns the argv Hydra should see and the plan of a single run.

    The plan is None where each job plans itself (a sweep) or nothing runs (--help, --cfg).
    Exits 2 on bad input.
    """
    try:
        use_config_dir_flags(argv)
        return _prepare(argv, conf_dir)
    except UserError as exc:
        fail(str(exc))
        raise  # unreachable: fail() exits
    except RunComplete as done:
        print(done, flush=True)
        raise SystemExit(0) from None


def prepare_argv_on_ranks(argv: list[str], conf_dir: str) -> tuple[list[str], RunPlan | None]:
    """`prepare_argv` for a run of several processes (torchrun): rank 0 checks and plans once, and every
    rank gets its argv and plan. All ranks share one run dir, fixed by rank 0 (Hydra's `${now:}` is
    each process's own clock). Rank 0 alone holds the run lock and writes Hydra's files and train.log.
    """
    from gpt2exp.distributed import active, rank0_decides, world_from_env

    if not active():
        return prepare_argv(argv, conf_dir)
    mine: dict[str, RunPlan | None] = {}

    def decide() -> tuple[list[str], RunPlan | None]:
        try:
            use_config_dir_flags(argv)  # before _with_shared_run_dir composes
        except UserError as exc:
            fail(str(exc))
        shared = _with_shared_run_dir(argv, conf_dir)
        new_argv, plan = prepare_argv(shared, conf_dir)
        mine["plan"] = plan
        return new_argv, replace(plan, lock=None, footprint=None) if plan is not None else None

    new_argv, plan = rank0_decides(decide)
    if world_from_env().main:
        return new_argv, mine["plan"]
    quiet = [a for a in new_argv[1:] if not a.startswith("hydra.output_subdir=")]
    # rank 0 logs for the run (the others would repeat it line for line); another rank shows its errors only
    quiet += ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job_logging.root.level=ERROR"]
    return [new_argv[0], *quiet], plan


def use_config_dir_flags(argv: list[str]) -> None:
    """`--config-dir DIR` (`-cd`) adds the user's own groups and experiments to every composition the
    launcher makes, as Hydra adds it to the job's search path (after gpt2exp's conf/, whose
    config.yaml is the primary config)."""
    add_config_dir(None)  # this command line's alone
    flags, override_args = split_argv(argv[1:])
    named = dict(zip(flags, [*flags[1:], None], strict=False))  # each flag and the arg after it
    named |= {f.split("=", 1)[0]: f.split("=", 1)[1] for f in flags if f.startswith("--") and "=" in f}
    if any(named.get(f) is not None for f in ("--config-name", "-cn", "--config-path", "-cp")):
        raise UserError(
            "gpt2exp composes its own conf/config.yaml: --config-name and --config-path do not apply; add your "
            "own groups and experiments with --config-dir DIR (e.g. DIR/experiment/mine.yaml, +experiment=mine)"
        )
    config_dir = named.get("--config-dir") or named.get("-cd")
    if config_dir is None:
        return
    if not os.path.isdir(os.path.expanduser(config_dir)):
        raise UserError(f"--config-dir {config_dir} is not a directory; name the dir holding your config groups")
    if any(key_of(o) == "hydra.searchpath" for o in parse(override_args)):
        raise UserError("pass your config dir either with --config-dir or in hydra.searchpath=[...], not both")
    add_config_dir(config_dir)


def _with_shared_run_dir(argv: list[str], conf_dir: str) -> list[str]:
    """The argv with the run dir every rank will use (rank 0's `hydra.run.dir`, resolved now)."""
    flags, override_args = split_argv(argv[1:])
    if any(a in MULTIRUN_FLAGS for a in flags):
        raise UserError(
            "a sweep (-m) does not run under torchrun: launch one training run per torchrun, or sweep with "
            "-m hydra/launcher=slurm hydra.launcher.tasks_per_node=N, which starts each job on N processes"
        )
    if any(a in INFO_FLAGS for a in flags):
        return argv
    overrides = parse(override_args)
    resume = last_value(overrides, "resume")
    if last_value(overrides, "hydra.run.dir") is not None or resume not in (None, "auto"):
        return argv  # named on the command line, or the resumed run's own dir
    run_dir = hydra_setting(conf_dir, override_args, "hydra.run.dir")
    return argv if run_dir is None else [*argv, f"hydra.run.dir={quoted(run_dir)}"]


def hydra_setting(conf_dir: str, override_args: list[str], key: str) -> str | None:
    """A `hydra.*` setting as Hydra will resolve it for these overrides (its `${now:}` read now); None
    where they do not compose: the same command then fails with its one line in prepare_argv."""
    try:
        return hydra_value(compose_hydra(conf_dir, override_args), key)
    except UserError:
        return None


def compose_hydra(conf_dir: str, override_args: list[str]) -> DictConfig:
    """The config with Hydra's own settings (`hydra.*`: launcher, sweeper, dirs) for these overrides;
    an override Hydra cannot apply is a UserError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from gpt2exp.config import register_schemas

    register_schemas()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name="train"):
            overrides = with_added_config_dir(override_args)
            return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception as exc:  # noqa: BLE001 - Hydra's and OmegaConf's many kinds, each one line
        raise UserError(one_line(exc)) from None


def check_plugins(overrides: list) -> None:
    """A launcher or sweeper that is not installed: say which pip package provides it. The SLURM launcher
    where SLURM cannot be reached (gpt2exp.slurm.check_reachable)."""
    from importlib.util import find_spec

    for override in overrides:
        group = key_of(override)
        option = "" if override.is_sweep_override() else override.get_value_element_as_str()
        plugin = PLUGINS.get((group, option)) or PLUGINS.get((group, "*"))
        if plugin and find_spec(plugin[0]) is None:
            raise UserError(
                f"{group}={option} needs the Hydra plugin {plugin[1]}, which is not installed: "
                f"pip install {plugin[1]}  (or pip install -e '.[sweeps]' for all of them)"
            )
        if group == "hydra/launcher" and option in ("slurm", "submitit_slurm"):
            from gpt2exp.slurm import check_reachable

            check_reachable(option)  # no sbatch, or no controller: one line now, not a traceback after the sweep dir


PRINT_FLAGS = ("--cfg", "-c", "--info", "-i")  # print a composed config: checked as a run's would be


def _prepare(argv: list[str], conf_dir: str) -> tuple[list[str], RunPlan | None]:
    args = argv[1:]
    if any(a in PRINT_FLAGS for a in args):
        flags, override_args = split_argv(args)
        if any(a in MULTIRUN_FLAGS for a in flags):
            raise UserError("--cfg and --info print one composition and take no -m; drop -m (and the sweep's lists)")
        overrides = [o.input_line for o in parse(override_args) if key_of(o) != "resume"]
        compose(conf_dir, overrides)  # a bad override (Hydra's own too): its one line, as in a run
        return argv, None
    if any(a in INFO_FLAGS for a in args):
        return argv, None
    flags, override_args = split_argv(args)
    multirun = any(a in MULTIRUN_FLAGS for a in flags)
    overrides = parse(override_args)
    check_plugins(overrides)
    job_overrides = [o.input_line for o in overrides if not is_hydra(o)]
    resume = last_value(overrides, "resume")
    if resume is not None and not resume.strip():
        raise UserError("resume= names nothing; pass resume=<run dir>, a checkpoint dir, a sweep dir or resume=auto")
    if resume not in (None, "auto"):
        resume_dir = Path(os.path.expanduser(resume))
        if is_sweep_dir(resume_dir):
            return _resume_sweep(argv[0], flags, overrides, conf_dir), None
        if holds_job_dirs(resume_dir):
            raise UserError(
                f"{resume} holds sweep jobs but no multirun.yaml, so its job list "
                "is unknown; resume each unfinished job with resume=<job dir>"
            )
    if multirun:
        if resume not in (None, "auto"):
            raise UserError(
                "-m cannot be combined with resume=<run dir>; resume a sweep with resume=<multirun/<date>/<time>>, "
                "or use -m ... resume=auto to let each job continue its own dir"
            )
        # resume=auto: each job resumes its own dir when it holds a checkpoint (a requeued SLURM job)
        sweep_dir = first_job_sweep_dir(conf_dir, overrides)
        if sweep_dir is not None:  # None: resolved only once Hydra runs (`${hydra:...}`)
            check_writable_dir("hydra.sweep.dir", sweep_dir, "the sweep")
            refuse_existing_sweep(Path(sweep_dir), overrides)
        check_sweep_values(conf_dir, overrides)
        return argv, None
    plan = plan_run(resume, last_value(overrides, "hydra.run.dir"), job_overrides, lambda o: compose(conf_dir, o))
    if not plan.is_resume:
        # one composition: the job config, Hydra's own overrides applied (a bad one is a UserError), its run dir
        cfg, run_dir = compose_with_hydra(conf_dir, [o.input_line for o in overrides], "hydra.run.dir")
        check_new_run(cfg)
        if plan.run_dir is None and run_dir is not None:  # Hydra's own dir (outputs/<date>/<time>)
            check_writable_dir("hydra.run.dir", run_dir, "the run")  # Hydra would fail to make it with a traceback
        return argv, claim_run_dir(plan)
    if any(is_hydra(o) and key_of(o) not in RESUME_SETS for o in overrides):
        compose_hydra(conf_dir, override_args)  # Hydra's own overrides of a resume: a bad one is one line
    check_available(plan.config)
    kept = [a for a in args if a not in override_args]
    kept += [o.input_line for o in overrides if key_of(o) not in RESUME_SETS]
    subdir = f".hydra/resume-{timestamp(for_name=True)}"
    hydra_args = [f"hydra.run.dir={quoted(str(plan.run_dir))}", f"hydra.output_subdir={subdir}"]
    return [argv[0], *kept, *hydra_args], claim_run_dir(plan, subdir)


RESUME_SETS = ("hydra.run.dir", "hydra.output_subdir")  # a resume sets these itself: the run's dir and .hydra/resume-*


def claim_run_dir(plan: RunPlan, hydra_subdir: str | None = None) -> RunPlan:
    """Lock a run dir named on the command line before Hydra writes into it, noting what is there.

    The last step of the launcher: every check has passed. A dir Hydra names itself (a timestamp) is
    locked by the job. A dir in use by another process is refused (UserError) with nothing written.
    """
    if plan.run_dir is None or not world_from_env().main:
        return plan  # Hydra's own new dir, locked by the job; or a rank other than 0, which never locks
    footprint = Footprint.before_launch(plan.run_dir, (hydra_subdir,) if hydra_subdir else ())
    lock = RunLock(plan.run_dir)
    try:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        return replace(plan, lock=lock, footprint=footprint)
    except BaseException as exc:  # in use, unwritable, or a signal: leave the disk as it was
        if lock.held:
            footprint.erase()
            lock.release()
        else:
            footprint.prune()
        if isinstance(exc, OSError):
            raise UserError(f"cannot create the run dir {plan.run_dir}: {exc.strerror or exc}") from None
        raise


def first_job_sweep_dir(conf_dir: str, overrides: list) -> str | None:
    """The sweep dir as the sweep's first job resolves it (each swept key at its first value), from a
    composition with Hydra's own settings that makes a bad `hydra.*` override (a misspelled launcher
    key, a pruner option without a pruner) one line here: Hydra gives it exit 1 and several lines after
    writing the sweep dir. None where the dir resolves only once Hydra runs (`${hydra:...}`)."""
    from hydra.errors import HydraException

    try:
        first_job = [values[0] for values in job_values(conf_dir, overrides, with_hydra=True)]
    except HydraException as exc:
        raise UserError(one_line(exc)) from None
    return hydra_value(compose_hydra(conf_dir, first_job), "hydra.sweep.dir")


def refuse_existing_sweep(sweep_dir: Path, overrides: list) -> None:
    """A sweep started in a sweep dir where one already started jobs would overwrite its record
    (multirun.yaml, each job's .hydra/ files) before any job could refuse: refused here, before Hydra
    writes. That is a dir named with hydra.sweep.dir, or Hydra's own multirun/<date>/<time> when two
    sweeps start in the same second. The same command again with resume=auto (a whole in-process
    sweep requeued) goes on: each job then resumes its own dir, held to its config of record."""
    from gpt2exp.sweep import read_sweep_record, task_overrides

    if not holds_job_dirs(sweep_dir):
        return  # new, or a record whose jobs never started (a submission SLURM refused): nothing to lose
    if last_value(overrides, "resume") == "auto" and is_sweep_dir(sweep_dir):
        recorded = task_overrides(read_sweep_record(sweep_dir).task_overrides)
        if recorded == task_overrides([o.input_line for o in overrides]):
            return
    raise UserError(
        f"{sweep_dir} already holds a sweep; continue it with resume={sweep_dir}, or start this one in "
        "another hydra.sweep.dir"
    )


def job_values(conf_dir: str, overrides: list, with_hydra: bool = False) -> list[list[str]]:
    """Each override as the jobs of a sweep get it: a plain one as it is, a discrete sweep as each of its
    values (`key=value`; a group's `glob(...)` as the options it matches); ranges and intervals (Optuna's)
    are left to the sweeper, Hydra's own settings unless `with_hydra`. Raises HydraException for a sweep
    Hydra cannot expand."""
    from hydra.core.override_parser.types import Glob

    values = []
    for override in overrides:
        if is_hydra(override) and not with_hydra:
            continue
        key = override.get_key_element()
        if not override.is_sweep_override():
            values.append([override.input_line])
        elif isinstance(override.value(), Glob):  # Hydra expands it with the config loader its sweeper has
            matched = override.value().filter(group_options(conf_dir, key_of(override)))
            if not matched:
                raise UserError(f"{override.input_line} matches no option of {key_of(override)}")
            values.append([f"{key}={value}" for value in matched])
        elif override.is_discrete_sweep():
            values.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    return values


def check_sweep_values(conf_dir: str, overrides: list) -> None:
    """Compose a sweep's jobs so that every swept value is tried once, before any job starts, and
    check that what each names is there (data files, the device) and fits a new run (check_new_run).

    Each swept key's values are tried with the other keys at their first value: as many
    compositions as values in all, not the product. Ranges and intervals (Optuna's) are left to
    the sweeper.
    """
    from hydra.errors import HydraException

    try:
        choices = job_values(conf_dir, overrides)
    except HydraException as exc:
        raise UserError(one_line(exc)) from None
    tried: set[tuple[str, ...]] = set()
    for i, values in enumerate(choices):
        for value in values:
            job = tuple(value if k == i else other[0] for k, other in enumerate(choices))
            if job not in tried:
                tried.add(job)
                check_new_run(compose(conf_dir, list(job)))


def study_record(sweep_dir: Path):
    """The SweepRecord of a sweep dir whose sweeper was the Optuna one, else None."""
    from gpt2exp.study import OPTUNA_SWEEPER
    from gpt2exp.sweep import read_sweep_record

    record = read_sweep_record(sweep_dir)
    return record if record.sweeper == OPTUNA_SWEEPER else None


def _resume_sweep(program: str, flags: list[str], overrides: list, conf_dir: str) -> list[str]:
    """Print the plan for every job of the sweep, then run the unfinished ones as a multirun."""
    from gpt2exp.sweep import RESUME_SWEEPER, hand_over, plan_sweep, recorded_hydra_overrides

    sweep_dir = Path(os.path.normpath(os.path.expanduser(last_value(overrides, "resume"))))
    if study_record(sweep_dir) is not None:  # an Optuna study: its database knows the trials (study.py)
        from gpt2exp.study import announce_resume, resume_argv

        argv = resume_argv(program, flags, overrides, study_record(sweep_dir))
        announce_resume(study_record(sweep_dir), overrides)
        return argv
    extra = [o.input_line for o in overrides if not is_hydra(o) and key_of(o) != "resume"]
    fixed = [o.input_line for o in overrides if not is_hydra(o) and not is_resumable_key(key_of(o))]
    if fixed:
        raise UserError(
            f"a sweep resume rebuilds each job from its config of record and cannot change {', '.join(fixed)}; "
            f"allowed on resume: {allowed_keys_text()}"
        )
    hydra_args = [o.input_line for o in overrides if is_hydra(o)]
    launcher = ("hydra/launcher", "hydra.launcher")
    not_launcher = [o.input_line for o in overrides if is_hydra(o) and not key_of(o).startswith(launcher)]
    if not_launcher:
        raise UserError(
            f"a sweep resume keeps the sweep's Hydra settings and cannot change {', '.join(not_launcher)}; "
            "only hydra/launcher=... and hydra.launcher.* may be given"
        )
    flags = [a for a in flags if a not in MULTIRUN_FLAGS]
    if extra and not flags:  # bad values of allowed keys fail here, before any job dir is written to
        check_available(compose(conf_dir, extra))
    plan = plan_sweep(sweep_dir)
    jobs, todo = plan.jobs, plan.to_run
    statuses = [job.status for job in jobs]
    done = [RunStatus.completed, *(s for s in (RunStatus.early_stopped, RunStatus.diverged) if s in statuses)]
    counts = [f"{len(jobs)} jobs", *(f"{statuses.count(s)} {s}" for s in done)]
    print(f"sweep {sweep_dir}: {', '.join(counts)}, {len(todo)} to run", flush=True)
    print("\n".join(plan.summary_lines()), flush=True)
    if not todo:
        ends = ", ".join(done[:-1]) + " or " + done[-1] if len(done) > 1 else done[0]
        print(f"nothing to resume: every job is {ends}", flush=True)
        raise SystemExit(0)
    hand_over(plan)
    return [
        program,
        *flags,
        "--multirun",
        *recorded_hydra_overrides(plan.record, hydra_args),
        *hydra_args,
        f"hydra.sweep.dir={quoted(str(sweep_dir))}",
        f"hydra/sweeper={RESUME_SWEEPER}",
        f"resume={quoted(str(sweep_dir))}",
        *extra,
    ]
