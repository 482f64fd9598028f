"""Train a GPT-2 under Hydra; every run can be resumed bit-for-bit.

    python -m gpt2exp.train                                   # tiny GPT-2 on Shakespeare, CPU minutes
    python -m gpt2exp.train +experiment=shakespeare_small     # a preset from conf/experiment/
    python -m gpt2exp.train -m optimizer.lr=1e-3,3e-4         # a sweep, one run dir per job
    python -m gpt2exp.train resume=outputs/<date>/<time>      # continue a run in its own dir
    python -m gpt2exp.train --cfg job                         # print the composed config

The command line is checked and the run planned before Hydra writes anything (launch.py,
resume.py); `train(cfg)` then trains in the run dir with the Trainer (trainer.py). Exit codes are
listed in errors.py: 0 completed, 2 bad input, 3 diverged, 74 a checkpoint could not be saved,
75 preempted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gpt2exp.config import CONF_DIR, register_schemas, validate
from gpt2exp.errors import Diverged, RunStopped, UserError, fail
from gpt2exp.preemption import EXIT_PREEMPTED
from gpt2exp.resume import RunPlan

log = logging.getLogger("gpt2exp")

__all__ = ["CONF_DIR", "main", "train"]


@contextlib.contextmanager
def run_log_file(run_dir: Path):
    """train.log in the run dir, appended to; Hydra already writes it when it launched us."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        yield
        return
    handler = logging.FileHandler(run_dir / "train.log", mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def hydra_context() -> tuple[Path | None, list[str], DictConfig | None]:
    """The Hydra run dir, this job's command-line overrides and, in a sweep, Hydra's config."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, [], None
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    return Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task), hydra_cfg if in_sweep else None


def train(cfg: DictConfig, run_dir: str | Path | None = None, plan: RunPlan | None = None) -> float:
    """Train (or resume) in `run_dir` under `plan`; returns the final validation loss.

    The launcher plans a single run before Hydra starts; without a plan (a sweep job, or a call
    from Python) the job plans itself from `cfg.resume` and its dir.
    """
    import torch

    from gpt2exp.resume import fix_values_of_record, plan_job
    from gpt2exp.rundir import RunLock
    from gpt2exp.state import process_state_restored
    from gpt2exp.sweep import name_sweep_job
    from gpt2exp.trainer import Trainer

    hydra_dir, overrides, sweep = hydra_context()
    run_dir = Path((plan and plan.run_dir) or run_dir or hydra_dir or ".").resolve()
    planned_before = plan is not None
    if plan is None:
        plan = plan_job(cfg, run_dir, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.config is not None:
        cfg = plan.config
    else:
        cfg = fix_values_of_record(cfg, torch.get_num_threads())
        if sweep is not None:
            searched = list(OmegaConf.select(sweep, "sweeper.params", default=None) or {})
            cfg = name_sweep_job(cfg, Path(sweep.sweep.dir), overrides, sweep.runtime.cwd, searched)
    if not planned_before:
        validate(cfg)  # the launcher validated what it planned
    with process_state_restored(), RunLock(run_dir), run_log_file(run_dir):
        return Trainer(cfg, run_dir).run(plan.resume_from)


def run_job(cfg: DictConfig, plan: RunPlan | None = None) -> float:
    """The Hydra task: `train(cfg)`, each way of stopping as one line and its own exit code (errors.py).

    In a sweep, a diverged job returns +inf instead of ending the sweep.
    """
    from gpt2exp.trainer import Preempted

    in_sweep = hydra_context()[2] is not None
    try:
        val_loss = train(cfg, plan=plan)
    except UserError as exc:
        log.error("%s", exc)
        fail(str(exc))
    except Diverged as exc:
        log.error("%s", exc)
        if in_sweep:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return float("inf")  # the job ends, the sweep goes on; Optuna scores it worst (it refuses NaN)
        fail(str(exc), exc.exit_code)
    except RunStopped as exc:
        log.error("%s", exc)
        fail(str(exc), exc.exit_code)
    except Preempted as exc:
        exc.flag.hand_over()  # under submitit: its handler requeues the job (and exits)
        raise SystemExit(EXIT_PREEMPTED) from None
    if in_sweep and not math.isfinite(val_loss):
        return float("inf")  # no evaluation ran; Optuna refuses NaN, and +inf scores the trial worst
    return val_loss


def main() -> None:
    import hydra

    from gpt2exp.completion import module_install_script
    from gpt2exp.launch import prepare_argv

    completion = module_install_script(sys.argv, sys.orig_argv)
    if completion is not None:  # `python -m gpt2exp.train -sc install=bash`: Hydra's own script misses `-m`
        print(completion, end="")
        return
    register_schemas()
    sys.argv, plan = prepare_argv(sys.argv, CONF_DIR)

    def task(cfg: DictConfig) -> float:
        return run_job(cfg, plan)

    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(task)()


if __name__ == "__main__":
    main()
