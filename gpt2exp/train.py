"""Train a GPT-2 under Hydra; every run can be resumed bit-for-bit.

    python -m gpt2exp.train                                   # tiny GPT-2 on Shakespeare, CPU minutes
    python -m gpt2exp.train +experiment=shakespeare_small     # a preset from conf/experiment/
    python -m gpt2exp.train -m optimizer.lr=1e-3,3e-4         # a sweep, one run dir per job
    python -m gpt2exp.train resume=outputs/<date>/<time>      # continue a run in its own dir
    python -m gpt2exp.train --cfg job                         # print the composed config

The command line is checked and the run planned before Hydra writes anything (launch.py,
resume.py); `train(cfg)` then trains in the run dir with the Trainer (trainer.py). Exit codes are
listed in errors.py: 0 completed (or stopped early), 2 bad input, 3 diverged, 74 a checkpoint could
not be saved, 75 preempted.

A signal (Ctrl-C, SIGTERM, SIGUSR1/2) never ends in a traceback: in the launcher, before anything is
written, it exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM); once the job runs it
exits 75: a run with its record (config.yaml, run.json) is saved if it trained since its last
checkpoint and marked `preempted`; a fresh run stopped before that takes back its run dir. Bad input
found in the job (exit 2) also takes back what this launch added to the run dir.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gpt2exp.config import CONF_DIR, register_schemas, validate
from gpt2exp.distributed import SilentUserError, exit_together
from gpt2exp.errors import EXIT_USAGE, Diverged, RunStopped, UserError, fail
from gpt2exp.preemption import EXIT_PREEMPTED, Interrupted, PreemptionFlag
from gpt2exp.resume import RunComplete, RunPlan

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


def hydra_context() -> tuple[Path | None, list[str], DictConfig | None, str | None]:
    """The Hydra run dir, this job's command-line overrides, in a sweep Hydra's config, and the
    subdir of the run dir Hydra wrote its files to."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, [], None, None
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    output_dir, subdir = Path(hydra_cfg.runtime.output_dir), hydra_cfg.output_subdir
    return output_dir, list(hydra_cfg.overrides.task), hydra_cfg if in_sweep else None, subdir


def train(cfg: DictConfig, run_dir: str | Path | None = None, plan: RunPlan | None = None) -> float:
    """Train (or resume) in `run_dir` under `plan`; returns the final validation loss.

    The launcher plans a single run before Hydra starts; without a plan (a sweep job, or a call
    from Python) the job plans itself from `cfg.resume` and its dir. A signal from the first line
    on ends the job as `Preempted`: a run that has its record says so in run.json; a fresh one
    stopped before it was recorded, like bad input (UserError), takes back what this launch added.
    """
    with PreemptionFlag() as preemption:  # until the config is final a signal waits; then it stops the start-up
        import torch

        from gpt2exp.distributed import init_process_group, rank0_decides, world_from_env
        from gpt2exp.resume import fix_values_of_record, plan_job
        from gpt2exp.rundir import Footprint, RunLock, is_run_dir
        from gpt2exp.state import process_state_restored
        from gpt2exp.sweep import name_sweep_job
        from gpt2exp.trainer import Preempted

        world = world_from_env()
        init_process_group(world)  # a SLURM step of several tasks: each task is one rank
        hydra_dir, overrides, sweep, hydra_subdir = hydra_context()
        run_dir = Path((plan and plan.run_dir) or run_dir or hydra_dir or ".").resolve()
        planned_before = plan is not None
        if plan is None:  # rank 0 plans (it may move a corrupt checkpoint aside); the others follow
            plan = rank0_decides(lambda: plan_job(cfg, run_dir, overrides, in_sweep=sweep is not None))
        also = (hydra_subdir,) if hydra_subdir and hydra_subdir.startswith(".hydra/resume-") else ()
        footprint = plan.footprint or Footprint.at_job_start(run_dir, Path.cwd(), also)
        if world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
        if plan.config is not None:
            cfg = plan.config
        else:
            cfg = fix_values_of_record(cfg, torch.get_num_threads())
            if sweep is not None:
                searched = list(OmegaConf.select(sweep, "sweeper.params", default=None) or {})
                cfg = name_sweep_job(cfg, Path(sweep.sweep.dir), overrides, sweep.runtime.cwd, searched)
        # rank 0 alone locks the run dir and takes back what a refused launch added to it
        lock = plan.lock or RunLock(run_dir) if world.main else contextlib.nullcontext()
        with process_state_restored(), lock:
            try:
                if not planned_before:
                    validate(cfg)  # the launcher validated what it planned
                check_same_config(cfg)
                with run_log_file(run_dir) if world.main else contextlib.nullcontext():
                    return start_and_run(cfg, run_dir, plan, preemption)
            except UserError:
                if world.main:
                    footprint.erase()  # exit 2 leaves nothing behind; the lock is ours, so is what is erased
                raise
            except Preempted:
                if world.main and not is_run_dir(run_dir):
                    footprint.erase()  # stopped before its record was written: the launch leaves no trace
                raise


def check_same_config(cfg: DictConfig) -> None:
    """Every rank composed and validated its config; they must be one config (a mismatch is refused)."""
    from gpt2exp.distributed import gather_to_all
    from gpt2exp.resume import config_digest

    digests = gather_to_all(config_digest(cfg))
    differ = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    if differ:
        raise UserError(
            f"rank {differ[0]} composed another config than rank 0 (config sha256 {digests[differ[0]][:12]} vs "
            f"{digests[0][:12]}); start every rank with the same command, code and config files"
        )


def start_and_run(cfg: DictConfig, run_dir: Path, plan: RunPlan, preemption: PreemptionFlag) -> float:
    """Build the Trainer, which a signal stops at once (nothing is trained yet), then run it."""
    from gpt2exp.rundir import RunStatus, timestamp, update_run_json
    from gpt2exp.trainer import Preempted, Trainer

    try:
        with preemption.interrupting():
            resumed = plan.resume_from if plan.resume_from and not plan.resume_from.restart else None
            trainer = Trainer(cfg, run_dir, resumed and resumed.run_dir / "tokenizer")
    except Interrupted:
        if plan.resume_from is None:
            outcome = "nothing was trained or written"
        else:
            update_run_json(run_dir, status=RunStatus.preempted, ended_at=timestamp())
            outcome = f"nothing to save; continue with resume={run_dir}"
        name = preemption.signal_name
        log.warning("%s received while the run started: %s (exit %d)", name, outcome, EXIT_PREEMPTED)
        raise Preempted(preemption) from None
    return trainer.run(plan.resume_from)


def run_job(cfg: DictConfig, plan: RunPlan | None = None) -> float:
    """The Hydra task: `train(cfg)`, each way of stopping as one line and its own exit code (errors.py).

    In a sweep, a diverged job returns +inf instead of ending the sweep.
    """
    from gpt2exp.trainer import Preempted

    in_sweep = hydra_context()[2] is not None
    try:
        val_loss = train(cfg, plan=plan)
    except SilentUserError:
        raise SystemExit(EXIT_USAGE) from None  # rank 0 printed the line
    except UserError as exc:
        fail(str(exc))  # one line; nothing is logged to the run dir, which keeps no trace of this launch
    except RunComplete as done:  # a job of `-m ... resume=auto` that completed before: left as it is
        from gpt2exp.tracking import recorded_val_loss

        print(done, flush=True)
        return recorded_val_loss(done.run_dir) if in_sweep else float("nan")
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
        exit_together()
        raise SystemExit(EXIT_PREEMPTED) from None
    if in_sweep and not math.isfinite(val_loss):
        return float("inf")  # no evaluation ran; Optuna refuses NaN, and +inf scores the trial worst
    return val_loss


def main() -> None:
    """The launcher: check and plan (launch.py), then Hydra runs the job(s).

    Before a job runs, a signal stops the process at once with one line and exit 128 + its number
    (nothing of a run is written yet); a single run's job takes a signal that comes once Hydra
    started, and inside a job its own flag does (recorded, saved if needed, exit 75).
    """
    import hydra

    from gpt2exp.completion import module_install_script
    from gpt2exp.distributed import end_refused_launch, init_process_group, own_exit_code, world_from_env
    from gpt2exp.launch import prepare_argv_on_ranks

    completion = module_install_script(sys.argv, sys.orig_argv)
    if completion is not None:  # `python -m gpt2exp.train -sc install=bash`: Hydra's own script misses `-m`
        print(completion, end="")
        return
    register_schemas()
    plan: RunPlan | None = None
    prepared = started = False

    def task(cfg: DictConfig) -> float:
        nonlocal started
        started = True
        return run_job(cfg, plan)

    with own_exit_code(), PreemptionFlag() as interrupts:
        try:
            with interrupts.interrupting():
                init_process_group(world_from_env())  # under torchrun: rank 0 plans for all ranks
                try:
                    sys.argv, plan = prepare_argv_on_ranks(sys.argv, CONF_DIR)
                except SystemExit as refused:
                    end_refused_launch(refused)
                    raise
                prepared = True
            # a single run: a signal from here on waits for its job, which records it (preempted, exit 75)
            with interrupts.interrupting() if plan is None else contextlib.nullcontext():
                hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(task)()
        except Interrupted:
            name, code = interrupts.signal_name, 128 + (interrupts.signum or 0)
            if not prepared:
                fail(f"interrupted by {name} before the run started; nothing was written", code)
            if "--multirun" in sys.argv or "-m" in sys.argv:
                fail(f"interrupted by {name}: the sweep stopped; resume it with resume=<sweep dir>", code)
            fail(f"interrupted by {name}", code)
        finally:
            if plan is not None and plan.footprint is not None and not started:
                plan.footprint.erase()  # Hydra stopped before the job: take back the dir the launcher claimed


if __name__ == "__main__":
    main()
