"""The `gpt2exp_resume` Hydra sweeper: carries out `gpt2exp.sweep.plan_sweep` for `resume=<sweep dir>`.

Hydra only instantiates sweepers that live in the `hydra_plugins` namespace, hence this package.
It runs no job itself: the sweep's own launcher (basic, joblib, submitit) runs every job that is
not completed, in its own dir (`SweepJob.launch_overrides` pins it), a started one with `resume=auto`.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module without
# registering it in sys.modules, where dataclasses would look string annotations up.
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class ResumeSweeperConf:
    _target_: str = "hydra_plugins.gpt2exp_sweep_resume.resume_sweeper.ResumeSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="gpt2exp_resume", node=ResumeSweeperConf, provider="gpt2exp")


class ResumeSweeper(Sweeper):
    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[list[JobReturn]]:
        from gpt2exp.overrides import key_of, parse
        from gpt2exp.rundir import timestamp
        from gpt2exp.sweep import take_plan

        assert self.config is not None and self.launcher is not None
        plan = take_plan(Path(str(self.config.hydra.sweep.dir)))
        extra = [o.input_line for o in parse(arguments) if key_of(o) != "resume"]  # today's whitelisted overrides
        stamp = timestamp(for_name=True)
        returns = []
        for batch in plan.batches():
            overrides = [job.launch_overrides(extra, stamp) for job in batch]
            results = self.launcher.launch(overrides, initial_job_idx=batch[0].num)
            for result in results:
                _ = result.return_value  # re-raises a job's exception, as Hydra's basic sweeper does
            returns.append(list(results))
        return returns
