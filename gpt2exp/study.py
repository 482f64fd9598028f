"""An Optuna study over training runs: its database, its search space, its checks, the plan to resume it.

    python -m gpt2exp.train -m +hparams_search=lr_wd                      # a study in multirun/<date>/<time>
    python -m gpt2exp.train -m +hparams_search=lr_wd hydra/sweeper/pruner=hyperband hydra.sweeper.n_trials=40
    python -m gpt2exp.train resume=multirun/<date>/<time>                 # continue the study

The `gpt2exp_optuna` sweeper (hydra_plugins/gpt2exp_optuna) runs the study; this module holds what it
and the launcher need without Hydra's machinery:
- the study lives in `<sweep dir>/optuna.db` (SQLite, Optuna's RDB storage) unless
  hydra.sweeper.storage names another database; the sweep dir's multirun.yaml records the sweeper's
  settings, the study name among them, so `resume=<sweep dir>` finds and continues it;
- the search space is written as Hydra's Optuna sweeper writes it (`tag(log, interval(1e-4, 1e-2))`,
  `interval(0.0, 0.2)`, `tag(int, interval(1, 8))`, `range(1, 8)`, `choice(a, b)`), in
  hydra.sweeper.params or as sweep overrides;
- bad input (a space that does not parse, a parameter that is not a config key, a database that
  holds another study, a pruner without periodic evaluations) is one UserError, before anything is
  written;
- resuming: completed, pruned and failed trials stay as they are; a trial that was running continues
  in its own dir from its newest checkpoint (or starts again there); then the trials still missing
  from hydra.sweeper.n_trials are asked.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2exp.errors import UserError
from gpt2exp.overrides import key_of, parse, quoted
from gpt2exp.rundir import RunStatus, read_run_json

DB_NAME = "optuna.db"
SQLITE = "sqlite:///"
OPTUNA_SWEEPER = "hydra_plugins.gpt2exp_optuna.optuna_sweeper.OptunaSweeper"
RESULTS = "optimization_results.yaml"
SPACE_EXAMPLE = "write e.g. tag(log, interval(1e-4, 1e-2)), interval(0.0, 0.2), range(1, 8) or choice(a, b)"
# a run.json status that ends a trial: the sweeper tells the study (a pruned trial as pruned)
FINISHED = (RunStatus.completed, RunStatus.early_stopped, RunStatus.diverged, RunStatus.pruned)


# -- the database --------------------------------------------------------------------------------


def study_storage_url(sweep_dir: Path) -> str:
    """The default database: optuna.db in the sweep dir (found again from the dir, wherever it moved)."""
    return SQLITE + str((sweep_dir / DB_NAME).resolve())


def storage_url(setting: str | None, sweep_dir: Path) -> str:
    """hydra.sweeper.storage as a URL: null is the sweep dir's optuna.db; a relative SQLite path is made absolute."""
    if not setting:
        return study_storage_url(sweep_dir)
    if setting.startswith(SQLITE) and not setting.startswith(SQLITE + "/"):
        return SQLITE + str(Path(setting[len(SQLITE) :]).resolve())
    return setting


def open_storage(url: str) -> Any:
    """Optuna's RDB storage; SQLite waits for a lock up to a minute (trials in parallel processes share it)."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith(SQLITE) else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def studies_in(url: str) -> list[str]:
    """The study names a database holds, read without writing to it (a SQLite file read-only)."""
    if not url.startswith(SQLITE):
        import optuna

        return optuna.study.get_all_study_names(open_storage(url))
    path = Path(url[len(SQLITE) :])
    if not path.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return [row[0] for row in con.execute("SELECT study_name FROM studies ORDER BY study_id")]
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise UserError(
            f"{path} is not an Optuna study database ({exc}); move it away or choose another sweep dir"
        ) from None


def check_storage(url: str, study_name: str, resume: bool, sweep_dir: Path) -> None:
    """A new study needs a database without it (the sweep dir's own: without any study); a resume needs it there."""
    names = studies_in(url)
    where = url[len(SQLITE) :] if url.startswith(SQLITE) else url
    if resume:
        if study_name not in names:
            held = f"holds {', '.join(repr(n) for n in names)}" if names else "holds no study"
            raise UserError(f"{where} {held}, not the study {study_name!r} that {sweep_dir}/multirun.yaml records")
        return
    if study_name in names:
        raise UserError(
            f"{where} already holds the study {study_name!r}; continue it with resume={sweep_dir}, "
            "or start a new study in a new sweep dir"
        )
    if names and url == study_storage_url(sweep_dir):
        raise UserError(
            f"{where} was written by another study ({', '.join(repr(n) for n in names)}), not {study_name!r}; "
            "start the new study in a new sweep dir, or continue that one with resume=<its sweep dir>"
        )


# -- samplers and pruners ------------------------------------------------------------------------


def _build(module: Any, spec: dict[str, Any], what: str) -> Any:
    target = str(spec.get("_target_", ""))
    prefix = f"{module.__name__}."
    name = target[len(prefix) :] if target.startswith(prefix) else ""
    if not name or not hasattr(module, name):
        raise UserError(f"{what} {target!r} is not one of Optuna's ({prefix}*); choose hydra/sweeper/{what}=...")
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    try:
        return getattr(module, name)(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"hydra.sweeper.{what}: {name}({kwargs}) is refused by Optuna: {exc}") from None


def build_pruner(spec: dict[str, Any]) -> Any:
    import optuna

    return _build(optuna.pruners, spec, "pruner")


def build_sampler(spec: dict[str, Any]) -> Any:
    import optuna

    return _build(optuna.samplers, spec, "sampler")


def prunes(spec: dict[str, Any]) -> bool:
    return str(spec.get("_target_", "")) != "optuna.pruners.NopPruner"


def check_pruner_has_evaluations(pruner: dict[str, Any], cfg: Any) -> None:
    """A pruner judges trials on the val/loss of periodic evaluations: without them it cannot stop any."""
    if prunes(pruner) and not cfg.trainer.eval_every:
        name = pruner["_target_"].rsplit(".", 1)[-1]
        raise UserError(
            f"the pruner {name} stops trials on their periodic val/loss, but trainer.eval_every=0 evaluates only "
            "at the end; set trainer.eval_every (e.g. trainer.eval_every=50) or hydra/sweeper/pruner=none"
        )


# -- the search space ----------------------------------------------------------------------------


def distribution(key: str, text: str, prefix: str = "hydra.sweeper.params.") -> Any:
    """Optuna's distribution for one parameter written as Hydra's Optuna sweeper writes it; errors name
    it as written (`prefix`: where it was written, empty for a sweep override on the command line)."""
    import optuna.distributions as d
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException

    where = f"{prefix}{key}={text}"
    try:
        value = OverridesParser.create().parse_override(f"{key}={text}").value()
        if isinstance(value, ChoiceSweep):
            return d.CategoricalDistribution(list(value.list))
        if isinstance(value, RangeSweep):
            values = list(range_values(value))
            if not values:
                raise ValueError("the range is empty")
            if all(isinstance(v, int) for v in values):
                return d.IntDistribution(values[0], values[-1], step=int(value.step))
            return d.FloatDistribution(values[0], values[-1], step=float(value.step))
        if isinstance(value, IntervalSweep):
            log = "log" in value.tags
            low, high = value.start, value.end
            if "int" in value.tags:  # Hydra reads interval bounds as floats
                return d.IntDistribution(int(low), int(high), log=log)
            return d.FloatDistribution(float(low), float(high), log=log)
    except (HydraException, ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{where} is not a search space ({reason}); {SPACE_EXAMPLE}") from None
    raise UserError(f"{where} is not a search space (a single value); {SPACE_EXAMPLE}")


def range_values(sweep: Any) -> list[Any]:
    start, stop, step = sweep.start, sweep.stop, sweep.step
    if step == 0:
        raise ValueError("the range's step is 0")
    count = max(0, math.ceil((stop - start) / step))
    return [start + i * step for i in range(count)]


@dataclass
class SearchSpace:
    """The sweep's arguments split into what every trial gets and what each samples."""

    fixed: list[str]  # the arguments that are not searched (resume= left out)
    params: dict[str, Any] = field(default_factory=dict)  # key -> optuna distribution

    @classmethod
    def parse(cls, params: dict[str, str], arguments: list[str]) -> SearchSpace:
        space = cls(fixed=[])
        for key, text in params.items():
            space.params[str(key)] = distribution(str(key), str(text))
        for override in parse(arguments):
            key = key_of(override)
            if key == "resume":
                continue
            if override.is_sweep_override():
                text = override.input_line.split("=", 1)[1]
                space.params[key] = distribution(key, text, prefix="")
            else:
                space.fixed.append(override.input_line)
        return space

    def example(self) -> list[str]:
        """One value of each parameter (its lowest), to check that each is a key of the config."""
        values = []
        for key, dist in self.params.items():
            value = dist.choices[0] if hasattr(dist, "choices") else dist.low
            values.append(f"{key}={value}")
        return values


def check_params(space: SearchSpace, compose: Any) -> Any:
    """Each parameter must be a key of the composed job config; returns that config (with example values)."""
    from omegaconf import OmegaConf

    base = compose(space.fixed)
    for key in space.params:
        if OmegaConf.select(base, key, default="__absent__") == "__absent__":
            raise UserError(
                f"the searched parameter {key} is not a config key; search keys of the config "
                "(python -m gpt2exp.train --cfg job lists them), e.g. optimizer.lr"
            )
    try:
        return compose(space.fixed + space.example())
    except UserError as exc:
        raise UserError(f"hydra.sweeper.params: {exc}") from None


def trial_overrides(space: SearchSpace, params: dict[str, Any], number: int, study: str, storage: str | None) -> list:
    """A trial's job overrides: the fixed ones, its sampled values, and its place in the study (trial.*)."""
    sampled = [f"{key}={value}" for key, value in params.items()]
    place = [f"trial.number={number}", f"trial.study={quoted(study)}"]
    if storage:
        place.append(f"trial.storage={quoted(storage)}")
    return [*space.fixed, *sampled, *place]


# -- a trial's outcome, from its run dir ---------------------------------------------------------


def outcome(run_dir: Path | None, returned: float | None) -> tuple[str, float | None]:
    """(`complete` | `pruned` | `fail`, value) for a trial whose job ended: run.json says how."""
    from gpt2exp.tracking import recorded_val_loss

    status = read_run_json(run_dir).get("status") if run_dir is not None else None
    if status == RunStatus.pruned:
        return "pruned", None
    if status in FINISHED:
        value = returned if returned is not None else recorded_val_loss(run_dir)
        return "complete", value if not math.isnan(value) else float("inf")
    return "fail", None


def tell(study: Any, trial: Any, state: str, value: float | None) -> None:
    import optuna

    states = {"complete": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED}
    study.tell(trial, value if state == "complete" else None, state=states.get(state, optuna.trial.TrialState.FAIL))


# -- resuming a study ----------------------------------------------------------------------------


@dataclass
class TrialPlan:
    number: int
    state: str  # Optuna's trial state, lower case
    params: dict[str, Any]
    value: float | None
    job: Any = None  # a SweepJob for a trial that was running

    @property
    def action(self) -> str:
        if self.job is None:
            return "skip"
        if self.job.status in FINISHED:
            return "record its result"
        return self.job.action

    def line(self, width: int) -> str:
        name = ",".join(f"{k}={v}" for k, v in self.params.items()) or "(no params)"
        state = self.state
        if self.value is not None:
            state += f" {self.value:.4f}"
        elif self.job is not None and self.job.status != "not started":
            at = f" at step {self.job.checkpoint_step}" if self.job.checkpoint_step else ""
            state += f" ({self.job.status}{at})"
        return f"  trial {self.number:>3}  {name:<{width}}  {state:<28}  -> {self.action}"


@dataclass
class StudyPlan:
    sweep_dir: Path
    study_name: str
    n_trials: int
    trials: list[TrialPlan]

    @property
    def to_continue(self) -> list[TrialPlan]:
        return [t for t in self.trials if t.job is not None]

    @property
    def to_ask(self) -> int:
        return max(0, self.n_trials - len(self.trials))

    def summary_lines(self) -> list[str]:
        states = [t.state for t in self.trials]
        counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
        head = (
            f"study {self.study_name!r} in {self.sweep_dir}: {len(self.trials)} of {self.n_trials} trials"
            f"{' (' + counts + ')' if counts else ''}, {len(self.to_continue)} to continue, {self.to_ask} to ask"
        )
        width = max([len(",".join(f"{k}={v}" for k, v in t.params.items())) for t in self.trials] + [11])
        return [head, *(t.line(width) for t in self.trials)]


def plan_study(sweep_dir: Path, study: Any, n_trials: int, fixed: list[str], storage_setting: str | None) -> StudyPlan:
    """Every trial of `study` against its job dir under `sweep_dir` (job dir N holds trial N)."""
    import optuna

    from gpt2exp.sweep import JOB_NUM_SUBDIR, SweepJob, job_status, read_sweep_record, started_jobs

    started = started_jobs(sweep_dir)
    pinned = read_sweep_record(sweep_dir).subdir == JOB_NUM_SUBDIR
    space = SearchSpace(fixed=fixed)
    plans = []
    for trial in study.get_trials(deepcopy=False):
        state = trial.state.name.lower()
        value = trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None
        plan = TrialPlan(trial.number, state, dict(trial.params), value)
        if trial.state == optuna.trial.TrialState.RUNNING:
            run_dir, overrides = started.get(trial.number, (None, None))
            if overrides is None:  # asked, never launched: start it with its sampled values
                overrides = trial_overrides(space, trial.params, trial.number, study.study_name, storage_setting)
            status, step = job_status(run_dir)
            subdir = str(trial.number) if pinned else None
            if run_dir is not None:
                subdir = str(run_dir.relative_to(sweep_dir))
            plan.job = SweepJob(trial.number, overrides, run_dir, status, step, subdir)
        plans.append(plan)
    return StudyPlan(sweep_dir, study.study_name, n_trials, plans)


def resume_argv(program: str, flags: list[str], overrides: list, record: Any) -> list[str]:
    """The multirun command that continues the study of `record`'s sweep dir: its own command line
    again (sweeper settings included), `resume=<sweep dir>`, and today's allowed overrides."""
    from gpt2exp.overrides import is_hydra
    from gpt2exp.resume import allowed_keys_text, is_resumable_key

    sweep_dir = record.dir
    extra = [o.input_line for o in overrides if not is_hydra(o) and key_of(o) != "resume"]
    fixed = [o for o in extra if not is_resumable_key(key_of(parse([o])[0]))]
    if fixed:
        raise UserError(
            f"a study resume rebuilds each trial from its config of record and cannot change {', '.join(fixed)}; "
            f"allowed on resume: {allowed_keys_text()}"
        )
    allowed = ("hydra/launcher", "hydra.launcher", "hydra.sweeper.n_trials")
    hydra_args = [o.input_line for o in overrides if is_hydra(o)]
    refused = [o.input_line for o in overrides if is_hydra(o) and not key_of(o).startswith(allowed)]
    if refused:
        raise UserError(
            f"a study resume keeps the sweep's Hydra settings and cannot change {', '.join(refused)}; "
            "only hydra.sweeper.n_trials, hydra/launcher=... and hydra.launcher.* may be given"
        )
    dropped = ["hydra.mode", "hydra.sweep.dir"]
    if any(key_of(o) == "hydra/launcher" for o in overrides if is_hydra(o)):
        dropped += ["hydra/launcher", "hydra.launcher"]
    recorded = [o.input_line for o in parse(record.hydra_overrides) if not key_of(o).startswith(tuple(dropped))]
    return [
        program,
        *[f for f in flags if f not in ("-m", "--multirun")],
        "--multirun",
        *recorded,
        *hydra_args,
        f"hydra.sweep.dir={quoted(str(sweep_dir))}",
        *record.task_overrides,
        f"resume={quoted(str(sweep_dir))}",
        *extra,
    ]


def recorded_sweeper(sweep_dir: Path) -> dict[str, Any]:
    """The sweeper's settings as multirun.yaml records them (study_name, storage, n_trials, ...)."""
    import yaml

    from gpt2exp.sweep import SWEEP_RECORD

    try:
        return dict(yaml.safe_load((sweep_dir / SWEEP_RECORD).read_text())["hydra"]["sweeper"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{sweep_dir / SWEEP_RECORD} cannot be read ({exc}); it is the study's record") from None


def fixed_arguments(task_overrides: list[str]) -> list[str]:
    """The sweep command's overrides every trial gets: not searched, resume= left out."""
    return [o.input_line for o in parse(task_overrides) if not o.is_sweep_override() and key_of(o) != "resume"]


def load_recorded_study(record: Any) -> Any:
    """The study that `record` (the SweepRecord of its sweep dir) names, loaded from its database."""
    import optuna

    sweeper = recorded_sweeper(record.dir)
    name = str(sweeper.get("study_name"))
    url = storage_url(sweeper.get("storage"), record.dir)
    check_storage(url, name, resume=True, sweep_dir=record.dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=open_storage(url))


def load_study_plan(record: Any, n_trials: int | None = None) -> tuple[Any, StudyPlan]:
    """(study, plan to resume it) of the study `record` keeps; a trial still training refuses (UserError)."""
    sweeper = recorded_sweeper(record.dir)
    study = load_recorded_study(record)
    total = n_trials if n_trials is not None else int(sweeper.get("n_trials") or 0)
    fixed = fixed_arguments(record.task_overrides)
    return study, plan_study(record.dir, study, total, fixed, sweeper.get("storage"))


def announce_resume(record: Any, overrides: list) -> None:
    """Print the plan of a study resume; exit 0 when every trial is done and none is missing."""
    from gpt2exp.overrides import last_value

    asked = last_value(overrides, "hydra.sweeper.n_trials")
    try:
        n_trials = int(asked) if asked is not None else None
    except ValueError:
        raise UserError(f"hydra.sweeper.n_trials={asked} must be a whole number of trials") from None
    _, plan = load_study_plan(record, n_trials)
    print("\n".join(plan.summary_lines()), flush=True)
    if not plan.to_continue and not plan.to_ask:
        print(f"nothing to resume: the study has its {plan.n_trials} trials, none running", flush=True)
        raise SystemExit(0)
