"""The `gpt2exp_optuna` Hydra sweeper: an Optuna study (4.x/5.x) over training runs, persistent and pruned.

    python -m gpt2exp.train -m +hparams_search=lr_wd                     # the preset selects this sweeper
    python -m gpt2exp.train -m hydra/sweeper=gpt2exp_optuna hydra.sweeper.n_trials=8 \\
        'optimizer.lr=tag(log, interval(1e-4, 1e-2))' hydra/sweeper/pruner=median
    python -m gpt2exp.train resume=multirun/<date>/<time>                # continue the study

Keys as in hydra-optuna-sweeper: n_trials (all trials of the study, a resume's included), n_jobs
(trials per launcher batch: run them in parallel with hydra/launcher=joblib), direction, study_name,
storage (null: <sweep dir>/optuna.db), params; the sampler and the pruner are config groups
(conf/hydra/sweeper/sampler, conf/hydra/sweeper/pruner). Trial N runs in job dir N with
`trial.number=N` (and the study's name) in its overrides and config of record; the trial reports its
val/loss to the study at each evaluation (gpt2exp/pruning.py) and ends `pruned` when the pruner says
so. Each trial's result is told from its run.json. The search, the checks and the resume plan are in
gpt2exp/study.py. Hydra only instantiates sweepers from the `hydra_plugins` namespace, hence this package.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module without
# registering it in sys.modules, where dataclasses would look string annotations up.
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger("gpt2exp")


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.gpt2exp_optuna.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds sampler and pruner itself: a bad setting is one line, exit 2
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    sampler: Any = MISSING  # hydra/sweeper/sampler=tpe|random|cmaes
    pruner: Any = MISSING  # hydra/sweeper/pruner=median|hyperband|successive_halving|none
    direction: str = "minimize"  # minimize|maximize the returned final val/loss
    study_name: str = "study"  # the study's name in its database
    storage: str | None = None  # a database URL; null: sqlite in <sweep dir>/optuna.db
    n_trials: int = 20  # trials of the whole study, a resume's included
    n_jobs: int = 1  # trials per launcher batch (in parallel with hydra/launcher=joblib)
    params: dict[str, str] | None = None  # key: search space, e.g. optimizer.lr: tag(log, interval(1e-4, 1e-2))


ConfigStore.instance().store(group="hydra/sweeper", name="gpt2exp_optuna", node=OptunaSweeperConf, provider="gpt2exp")


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: Any,
        pruner: Any,
        direction: str,
        study_name: str,
        storage: str | None,
        n_trials: int,
        n_jobs: int,
        params: dict[str, str] | None,
    ) -> None:
        # sampler and pruner are built in sweep(), after the checks; their configs are recorded in the study
        self.sampler_spec: dict[str, Any] = {}
        self.pruner_spec: dict[str, Any] = {}
        self.direction, self.study_name, self.storage = direction, study_name, storage
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.sampler_spec = OmegaConf.to_container(config.hydra.sweeper.sampler, resolve=True)
        self.pruner_spec = OmegaConf.to_container(config.hydra.sweeper.pruner, resolve=True)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # -- the study ---------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> list[list[JobReturn]]:
        from gpt2exp.errors import UserError, fail
        from gpt2exp.overrides import key_of, last_value, parse

        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        resume = last_value(parse(arguments), "resume") not in (None, "auto")
        returns: list[list[JobReturn]] = []
        try:
            study, space = self.open_study(sweep_dir, arguments, resume)
            if resume:
                from gpt2exp.study import fixed_arguments, plan_study, recorded_sweeper
                from gpt2exp.sweep import read_sweep_record

                recorded = read_sweep_record(sweep_dir).task_overrides
                today = [o.input_line for o in parse(arguments) if key_of(o) != "resume"][len(recorded) :]
                storage = recorded_sweeper(sweep_dir).get("storage")
                plan = plan_study(sweep_dir, study, self.n_trials, fixed_arguments(recorded), storage)
        except UserError as exc:
            fail(str(exc))  # one line, exit 2; nothing is written before the study is created
        if resume:
            returns += self.continue_trials(study, plan.to_continue, today)
        while len(study.trials) < self.n_trials:
            returns.append(self.run_batch(study, space, min(self.n_jobs, self.n_trials - len(study.trials))))
        self.write_results(study, sweep_dir)
        return returns

    def open_study(self, sweep_dir: Path, arguments: list[str], resume: bool) -> Any:
        """Check everything (search space, params, pruner, database), then create or load the study.

        A fresh study first writes the sweep dir's record (multirun.yaml, with the study's name) and
        records its pruner in the study, where each trial's process finds it."""
        import optuna

        from gpt2exp.errors import UserError
        from gpt2exp.pruning import PRUNER_ATTR, SWEEP_DIR_ATTR
        from gpt2exp.study import (
            SearchSpace,
            build_pruner,
            build_sampler,
            check_params,
            check_pruner_has_evaluations,
            check_storage,
            open_storage,
            storage_url,
        )

        if self.direction not in ("minimize", "maximize"):
            raise UserError(f"hydra.sweeper.direction={self.direction} must be minimize or maximize")
        if self.n_trials < 1 or self.n_jobs < 1:
            raise UserError("hydra.sweeper.n_trials and hydra.sweeper.n_jobs must be at least 1")
        space = SearchSpace.parse(self.params, arguments)
        if not space.params:
            raise UserError("the study searches no parameter; set hydra.sweeper.params or add +hparams_search=lr_wd")
        cfg = check_params(space, self.compose_job)
        check_pruner_has_evaluations(self.pruner_spec, cfg)
        sampler, pruner = build_sampler(self.sampler_spec), build_pruner(self.pruner_spec)
        url = storage_url(self.storage, sweep_dir)
        check_storage(url, self.study_name, resume, sweep_dir)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if not resume:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            assert self.config is not None
            with open(sweep_dir / "multirun.yaml", "w", encoding="utf-8") as f:
                f.write(OmegaConf.to_yaml(self.config))
        study = optuna.create_study(
            study_name=self.study_name,
            storage=open_storage(url),
            sampler=sampler,
            pruner=pruner,
            direction=self.direction,
            load_if_exists=resume,
        )
        seed = self.sampler_spec.get("seed")
        if resume and seed is not None:  # the same seed again would propose the first trials' values again
            study.sampler = build_sampler({**self.sampler_spec, "seed": int(seed) + len(study.trials)})
        study.set_user_attr(PRUNER_ATTR, self.pruner_spec)
        study.set_user_attr(SWEEP_DIR_ATTR, str(sweep_dir.resolve()))
        return study, space

    def compose_job(self, overrides: list[str]) -> DictConfig:
        """A trial's job config for `overrides`, composed as the launcher will, typed and validated."""
        from hydra.errors import HydraException
        from omegaconf import open_dict
        from omegaconf.errors import OmegaConfBaseException

        from gpt2exp.composing import one_line
        from gpt2exp.config import check_applicable, typed, validate
        from gpt2exp.errors import UserError

        assert self.hydra_context is not None and self.config is not None
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        except (HydraException, OmegaConfBaseException, ValueError) as exc:
            raise UserError(one_line(exc)) from None
        with open_dict(cfg):
            del cfg["hydra"]
        cfg = typed(OmegaConf.to_container(cfg))
        validate(cfg)
        check_applicable(cfg)
        return cfg

    def run_batch(self, study: Any, space: Any, size: int) -> list[JobReturn]:
        """Ask `size` trials, run them as jobs N, N+1, ... (their trial numbers), tell their results."""
        from gpt2exp.study import trial_overrides

        trials = [study.ask(space.params) for _ in range(size)]
        storage = self.storage or None
        overrides = [trial_overrides(space, t.params, t.number, study.study_name, storage) for t in trials]
        results = list(self.launcher.launch(overrides, initial_job_idx=trials[0].number))
        for trial, result in zip(trials, results, strict=True):
            self.tell(study, trial.number, result)
        return results

    def continue_trials(self, study: Any, plans: list[Any], today: list[str]) -> list[list[JobReturn]]:
        """Resume: each trial that was running continues in its own dir (or has its result recorded)."""
        from gpt2exp.rundir import timestamp
        from gpt2exp.study import outcome, tell

        returns = []
        stamp = timestamp(for_name=True)
        for plan in plans:
            job = plan.job
            if plan.action == "record its result":
                state, value = outcome(job.run_dir, None)
                tell(study, plan.number, state, value)
                continue
            results = list(self.launcher.launch([job.launch_overrides(today, stamp)], initial_job_idx=job.num))
            self.tell(study, plan.number, results[0])
            returns.append(results)
        return returns

    def tell(self, study: Any, number: int, result: JobReturn) -> None:
        """Tell the study how trial `number` ended: run.json's status, the returned final val/loss.

        A job that raised is told as failed, then its exception ends the sweep (as Hydra's basic
        sweeper does); a resume leaves it failed and asks the trials still missing."""
        from gpt2exp.study import outcome, tell

        run_dir = Path(str(result.hydra_cfg.hydra.runtime.output_dir)) if result.hydra_cfg is not None else None
        if result.status != JobStatus.COMPLETED:
            tell(study, number, "fail", None)
            _ = result.return_value  # re-raises the job's exception
        state, value = outcome(run_dir, float(result.return_value))
        if self.direction == "maximize" and state == "complete" and value == float("inf"):
            value = float("-inf")  # a diverged trial scores worst either way
        tell(study, number, state, value)

    def write_results(self, study: Any, sweep_dir: Path) -> None:
        """optimization_results.yaml, as hydra-optuna-sweeper writes it: the best parameters and value."""
        import optuna

        done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            log.warning("no trial of study %s completed: no best parameters", study.study_name)
            return
        best = study.best_trial
        results = {
            "name": "optuna",
            "study_name": study.study_name,
            "best_trial": best.number,
            "best_params": dict(best.params),
            "best_value": best.value,
        }
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        log.info("best trial %d: value %s, params %s", best.number, best.value, best.params)
