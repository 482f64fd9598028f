"""The trial side of an Optuna study: report each evaluation's val/loss, ask the pruner whether to stop.

A trial of `hydra/sweeper=gpt2exp_optuna` is an ordinary run whose config of record names its study
(`trial.number`, `trial.study`, `trial.storage`); the Trainer builds one link in `__init__`:

    link = TrialLink.from_config(cfg.trial, run_dir, cfg.trainer.max_steps)
    if link.should_prune(step, val_loss):   # after each evaluation of the loop
        ...save, then raise TrialPruned         # run() records `pruned`, exit 0: the study goes on

The study's pruner is rebuilt from what the sweeper recorded in the study (a user attribute), so a
trial resumed on its own prunes as it would have in its sweep. Outside a study (trial.number null)
the link does nothing and Optuna is never imported. Reporting a step the study already holds (a
resumed trial repeats the steps since its checkpoint, bit for bit) is skipped. The final step is
reported but never pruned: the trial is complete, and the sweeper tells its value.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("gpt2exp")

PRUNER_ATTR = "gpt2exp_pruner"  # the study's user attribute holding the pruner's config (_target_ + kwargs)
SWEEP_DIR_ATTR = "gpt2exp_sweep_dir"


class TrialPruned(Exception):
    """The study's pruner stopped this trial at `step` (saved); the run ends as `pruned`, exit 0."""

    def __init__(self, number: int, step: int, value: float):
        super().__init__(f"trial {number} pruned at step {step} (val/loss {value:.4f})")
        self.step, self.value = step, value


class TrialLink:
    """One trial's line to its study; inactive (reports nothing, never prunes) outside a study.

    Under torchrun only rank 0 opens the study and reports; every rank gets its decision, so all
    stop at the same step (distributed.rank0_decides)."""

    def __init__(self, trial: Any = None, number: int | None = None, last_step: int = 0):
        self.trial, self.number, self.last_step = trial, number, last_step

    @classmethod
    def from_config(cls, trial_cfg: Any, run_dir: Path, last_step: int) -> TrialLink:
        """The link of the trial `trial_cfg` names (the config of record's `trial` section). Rank 0 opens
        the study; a failure there (no sweep dir, no database) ends every rank alike (rank0_decides)."""
        from gpt2exp.distributed import rank0_decides, world_from_env

        if trial_cfg is None or trial_cfg.number is None:
            return cls()
        opened: list[TrialLink] = []
        rank0_decides(lambda: opened.append(cls._open(trial_cfg, run_dir, last_step)))
        if not world_from_env().main:
            return cls(None, trial_cfg.number, last_step)  # follows rank 0's decisions
        return opened[0]

    @classmethod
    def _open(cls, trial_cfg: Any, run_dir: Path, last_step: int) -> TrialLink:
        import optuna

        from gpt2exp.study import open_storage, study_storage_url

        url = trial_cfg.storage or study_storage_url(find_sweep_dir(Path(run_dir)))
        storage = open_storage(url)
        study = optuna.load_study(
            study_name=trial_cfg.study, storage=storage, pruner=recorded_pruner(storage, trial_cfg)
        )
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, trial_cfg.number)
        if storage.get_trial(trial_id).state != optuna.trial.TrialState.RUNNING:
            log.warning(
                "trial %d of study %s is no longer running: nothing is reported", trial_cfg.number, study.study_name
            )
            return cls(None, trial_cfg.number, last_step)
        return cls(optuna.trial.Trial(study, trial_id), trial_cfg.number, last_step)

    @property
    def active(self) -> bool:
        return self.trial is not None

    def should_prune(self, step: int, val_loss: float) -> bool:
        """Report `val_loss` at `step` (once per step) and say whether the pruner stops the trial here."""
        if self.number is None:
            return False  # not a trial: nothing to agree on
        from gpt2exp.distributed import rank0_decides

        return rank0_decides(lambda: self._report_and_ask(step, val_loss))

    def _report_and_ask(self, step: int, val_loss: float) -> bool:
        if self.trial is None:
            return False
        if step not in self.trial.storage.get_trial(self.trial._trial_id).intermediate_values:
            self.trial.report(val_loss, step)
        return step < self.last_step and bool(self.trial.should_prune())

    def pruned(self, step: int, val_loss: float) -> TrialPruned:
        log.info("trial %d: the study's pruner stops it at step %d (val/loss %.4f)", self.number, step, val_loss)
        return TrialPruned(self.number or 0, step, val_loss)


def find_sweep_dir(run_dir: Path) -> Path:
    """The sweep dir around a trial's run dir: the nearest parent holding multirun.yaml."""
    from gpt2exp.errors import UserError
    from gpt2exp.sweep import is_sweep_dir

    for parent in run_dir.resolve().parents:
        if is_sweep_dir(parent):
            return parent
    raise UserError(
        f"{run_dir} is a trial of an Optuna study but lies in no sweep dir (multirun.yaml); "
        "keep trials in their sweep dir, or set trial.storage to the study's database URL"
    )


def recorded_pruner(storage: Any, trial_cfg: Any) -> Any:
    """The pruner the sweeper recorded in the study; only Optuna's own pruners are built."""
    import optuna

    from gpt2exp.study import build_pruner

    study_id = storage.get_study_id_from_name(trial_cfg.study)
    spec = storage.get_study_user_attrs(study_id).get(PRUNER_ATTR)
    return build_pruner(spec) if spec else optuna.pruners.NopPruner()
