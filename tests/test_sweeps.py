"""Sweeps through the real CLI: the basic, joblib and submitit launchers, Optuna, W&B grouping,
job isolation inside one process, SLURM-style preemption and requeue, and resuming a sweep."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAST, run_cli
from tests.test_resume import EXACT, assert_same_weights, final_weights, losses

pytestmark = pytest.mark.slow

SHORT = [*FAST, "trainer.max_steps=6", "trainer.log_every=2", "trainer.eval_every=3"]


def sweep(cwd: Path, sweep_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = run_cli("gpt2exp.train", "-m", f"hydra.sweep.dir={sweep_dir}", *args, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def record(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def status(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["status"]


def final_val_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val/loss"] for r in rows if "val/loss" in r][-1]


def job_dirs(sweep_dir: Path) -> list[str]:
    return sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def tree_digest(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def usage_error(*args: str, cwd: Path, env: dict | None = None) -> str:
    """Run the CLI expecting bad input: exit 2, no traceback, one line on stderr, returned."""
    result = run_cli("gpt2exp.train", *args, cwd=cwd, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_a_2x2_multirun_gives_four_run_dirs_with_the_swept_values(tmp_path):
    """The issue's own example: learning rate x model preset (the models' shapes left to their presets)."""
    sweep_dir = tmp_path / "multirun" / "2026-01-01" / "10-00-00"
    unshaped = [o for o in SHORT if not o.startswith("model.")]
    sweep(tmp_path, sweep_dir, *unshaped, "trainer.max_steps=2", "optimizer.lr=1e-3,3e-4", "model=gpt2_tiny,gpt2_mini")
    assert job_dirs(sweep_dir) == ["0", "1", "2", "3"]
    swept = [(record(sweep_dir / d)["optimizer"]["lr"], record(sweep_dir / d)["model"]["n_embd"]) for d in "0123"]
    assert swept == [(1e-3, 128), (1e-3, 384), (3e-4, 128), (3e-4, 384)]
    for job in "0123":
        assert status(sweep_dir / job) == "completed"
        assert (sweep_dir / job / "checkpoints" / "step_00000002" / "manifest.json").is_file()
        logger = record(sweep_dir / job)["logger"]
        assert logger["group"] == "multirun/2026-01-01/10-00-00"  # W&B groups a sweep's runs by its dir
    names = [record(sweep_dir / d)["logger"]["name"] for d in "0123"]
    assert names == [
        "optimizer.lr=0.001,model=gpt2_tiny",
        "optimizer.lr=0.001,model=gpt2_mini",
        "optimizer.lr=0.0003,model=gpt2_tiny",
        "optimizer.lr=0.0003,model=gpt2_mini",
    ]


def test_a_glob_over_a_group_sweeps_the_options_it_matches(tmp_path):
    """Hydra expands glob() with its sweeper's config loader; the launcher's check of each swept value has
    none, and refused the sweep with "ConfigLoader is not set"."""
    sweep_dir = tmp_path / "sweep"
    unshaped = [o for o in SHORT if not o.startswith("model.")]
    sweep(tmp_path, sweep_dir, *unshaped, "trainer.max_steps=2", "model=glob(gpt2_*i*)")
    assert [record(sweep_dir / d)["model"]["n_embd"] for d in job_dirs(sweep_dir)] == [384, 128]  # mini, tiny


def test_each_sweep_job_gets_its_own_wandb_run_named_by_its_overrides(tmp_path):
    sweep_dir = tmp_path / "multirun" / "2026-01-01" / "10-00-00"
    sweep(tmp_path, sweep_dir, *SHORT, "logger=wandb", "logger.mode=offline", "optimizer.lr=1e-3,3e-3")
    runs = [sorted((sweep_dir / job / "wandb").glob("offline-run-*/run-*.wandb")) for job in "01"]
    assert [len(r) for r in runs] == [1, 1]
    ids = [json.loads((sweep_dir / job / "run.json").read_text())["wandb_id"] for job in "01"]
    assert ids[0] != ids[1] and all(runs[i][0].name == f"run-{ids[i]}.wandb" for i in range(2))
    first, second = (r[0].read_bytes() for r in runs)
    assert b"optimizer.lr=0.001" in first and b"optimizer.lr=0.003" not in first
    assert b"optimizer.lr=0.003" in second and b"optimizer.lr=0.001" not in second
    assert b"multirun/2026-01-01/10-00-00" in first and b"multirun/2026-01-01/10-00-00" in second


def test_a_job_run_after_another_in_one_process_equals_the_job_run_alone(tmp_path):
    """Job 1 runs in the process job 0 used (basic launcher) with a different thread count and seed."""
    base = [a for a in EXACT if not a.startswith("trainer.num_threads")] + ["trainer.max_steps=12"]
    sweep_dir = tmp_path / "sweep"
    sweep(tmp_path, sweep_dir, *base, "trainer.num_threads=1,null", "seed=7,8")
    after = sweep_dir / "3"  # num_threads=null, seed=8: the last of four jobs in one process
    alone = tmp_path / "alone"
    result = run_cli("gpt2exp.train", *base, "seed=8", f"hydra.run.dir={alone}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # a thread count left behind by jobs 0 and 2 (num_threads=1) would be recorded here
    assert record(after)["trainer"]["num_threads"] == record(alone)["trainer"]["num_threads"]
    assert losses(after) == losses(alone)
    assert_same_weights(final_weights(after, 12), final_weights(alone, 12))


def test_the_joblib_launcher_runs_two_jobs_in_parallel_worker_processes(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep(tmp_path, sweep_dir, *SHORT, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optimizer.lr=1e-3,3e-3")
    assert job_dirs(sweep_dir) == ["0", "1"]
    assert [status(sweep_dir / j) for j in "01"] == ["completed", "completed"]
    assert [record(sweep_dir / j)["optimizer"]["lr"] for j in "01"] == [1e-3, 3e-3]
    pids = {(sweep_dir / j / ".lock").read_text() for j in "01"}  # the pid that trained there
    assert len(pids) == 2
    # a sweep resume may set its recorded launcher's options, which the defaults' basic launcher lacks
    again = run_cli("gpt2exp.train", f"resume={sweep_dir}", "hydra.launcher.n_jobs=1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[-1] == "nothing to resume: every job is completed"


def test_the_submitit_local_launcher_runs_each_job_as_a_submitted_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep(tmp_path, sweep_dir, *SHORT, "hydra/launcher=submitit_local", "optimizer.lr=1e-3,3e-3")
    assert job_dirs(sweep_dir) == ["0", "1"]
    assert [status(sweep_dir / j) for j in "01"] == ["completed", "completed"]
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 2


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGUSR1])
def test_slurm_signal_under_submitit_saves_then_requeues_and_resume_auto_continues_bit_exact(tmp_path, signum):
    """SLURM's pre-timeout signal: checkpoint at the step boundary, submitit requeues, the job resumes.

    submitit listens for SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL names another (USR1 here). A sweep's job
    resumes its dir with or without resume=auto on the command line (USR1 runs without it)."""
    name = signal.Signals(signum).name
    auto = ["resume=auto"] if signum == signal.SIGUSR2 else []
    args = [*EXACT, "trainer.max_steps=120"]
    sweep_dir = tmp_path / "sweep"
    job = sweep_dir / "0"
    command = [sys.executable, "-m", "gpt2exp.train", "-m", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen(
        [*command, "hydra/launcher=submitit_local", *auto, *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SUBMITIT_PREEMPT_SIGNAL": name.removeprefix("SIG")},
    )
    deadline = time.monotonic() + 240
    while not (job / "checkpoints" / "step_00000012").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "the job never reached step 12"
        time.sleep(0.05)
    os.kill(int((job / ".lock").read_text()), signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    info = json.loads((job / "run.json").read_text())
    assert info["status"] == "completed"
    [resume] = info["resumes"]
    assert 12 <= resume["step"] < 120
    log = (job / "train.log").read_text()
    assert f"{name} received: saved step {resume['step']}, stopping (exit 75)" in log
    assert "Requeued job" in log and f"resumed from step {resume['step']} of run" in log
    straight = tmp_path / "straight"
    result = run_cli("gpt2exp.train", *args, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(job) == losses(straight)
    assert_same_weights(final_weights(job, 120), final_weights(straight, 120))


def test_an_optuna_study_minimises_the_returned_val_loss(tmp_path):
    sweep_dir = tmp_path / "study"
    sweep(tmp_path, sweep_dir, *SHORT, "+hparams_search=lr_wd", "hydra.sweeper.n_trials=3")
    assert job_dirs(sweep_dir) == ["0", "1", "2"]
    trials = [record(sweep_dir / j)["optimizer"] for j in "012"]
    assert len({(t["lr"], t["weight_decay"]) for t in trials}) == 3
    assert all(1e-4 <= t["lr"] <= 1e-2 and 0.0 <= t["weight_decay"] <= 0.2 for t in trials)
    names = [record(sweep_dir / j)["logger"]["name"] for j in "012"]  # named by the searched parameters only
    assert names == [f"optimizer.lr={t['lr']},optimizer.weight_decay={t['weight_decay']}" for t in trials]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    finals = [final_val_loss(sweep_dir / j) for j in "012"]
    best = min(range(3), key=finals.__getitem__)
    assert results["best_value"] == pytest.approx(finals[best], rel=1e-12)
    assert results["best_params"]["optimizer.lr"] == pytest.approx(trials[best]["lr"], rel=1e-12)


# -- resuming a sweep ----------------------------------------------------------------------------


def test_an_interrupted_sweep_resumes_skipping_done_jobs_and_continuing_the_cut_one(tmp_path):
    """4 jobs; SIGKILL while job 2 (dir 1) trains, after job 1 (dir 0) finished; then resume=<sweep dir>."""
    args = [*EXACT, "trainer.max_steps=40"]
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "gpt2exp.train", "-m", f"hydra.sweep.dir={sweep_dir}", *args]
    proc = subprocess.Popen(
        [*command, "optimizer.weight_decay=0.1,0.0", "seed=1,2"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (sweep_dir / "1" / "checkpoints" / "step_00000012").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "job 2 never reached step 12"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert job_dirs(sweep_dir) == ["0", "1"] and status(sweep_dir / "0") == "completed"
    assert status(sweep_dir / "1") == "running"  # killed: nobody could mark it
    done_before = tree_digest(sweep_dir / "0")
    cut_at = max(int(p.name[5:]) for p in (sweep_dir / "1" / "checkpoints").glob("step_*"))

    result = run_cli("gpt2exp.train", f"resume={sweep_dir}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("  job ")]
    assert summary == [
        "  job   0  optimizer.weight_decay=0.1,seed=1  completed                 -> skip",
        f"  job   1  optimizer.weight_decay=0.1,seed=2  interrupted at step {cut_at}    -> resume from step {cut_at}",
        "  job   2  optimizer.weight_decay=0.0,seed=1  not started               -> start",
        "  job   3  optimizer.weight_decay=0.0,seed=2  not started               -> start",
    ]
    assert f"sweep {sweep_dir}: 4 jobs, 1 completed, 3 to run" in result.stdout

    assert tree_digest(sweep_dir / "0") == done_before  # untouched, byte for byte
    assert job_dirs(sweep_dir) == ["0", "1", "2", "3"]
    assert [status(sweep_dir / j) for j in "0123"] == ["completed"] * 4
    assert [r["step"] for r in json.loads((sweep_dir / "1" / "run.json").read_text())["resumes"]] == [cut_at]
    assert [(record(sweep_dir / j)["optimizer"]["weight_decay"], record(sweep_dir / j)["seed"]) for j in "23"] == [
        (0.0, 1),
        (0.0, 2),
    ]
    # the cut job ends exactly where it would have without the kill
    alone = tmp_path / "alone"
    straight = run_cli(
        "gpt2exp.train", *args, "optimizer.weight_decay=0.1", "seed=2", f"hydra.run.dir={alone}", cwd=tmp_path
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert losses(sweep_dir / "1") == losses(alone)
    assert_same_weights(final_weights(sweep_dir / "1", 40), final_weights(alone, 40))

    again = run_cli("gpt2exp.train", f"resume={sweep_dir}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[-1] == "nothing to resume: every job is completed"


def test_resuming_a_sweep_cannot_change_a_value_of_record(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep(tmp_path, sweep_dir, *SHORT, "optimizer.lr=1e-3,3e-3")
    assert usage_error(f"resume={sweep_dir}", "optimizer.lr=1e-2", cwd=tmp_path).startswith(
        "error: a sweep resume rebuilds each job from its config of record and cannot change optimizer.lr=1e-2;"
    )


def test_a_sweep_started_again_in_its_sweep_dir_is_refused_before_hydra_writes(tmp_path):
    """Another sweep, or other values with resume=auto, would rewrite the record before any job refused; the
    same command again with resume=auto (a whole in-process sweep requeued) lets each job resume its dir."""
    sweep_dir = tmp_path / "sweep"
    sweep(tmp_path, sweep_dir, *SHORT, "optimizer.lr=1e-3,3e-3")
    before = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()}
    for extra in ([], ["resume=auto"]):
        assert usage_error("-m", f"hydra.sweep.dir={sweep_dir}", *SHORT, "optimizer.lr=1e-2", *extra, cwd=tmp_path) == (
            f"error: {sweep_dir} already holds a sweep; continue it with resume={sweep_dir}, or start this one in "
            "another hydra.sweep.dir"
        )
    assert {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()} == before  # multirun.yaml, .hydra/
    again = sweep(tmp_path, sweep_dir, *SHORT, "optimizer.lr=1e-3,3e-3", "resume=auto")
    assert again.stdout.count("is complete at step 6") == 2


def test_a_sweep_started_in_the_same_second_as_another_is_refused_before_hydra_writes(tmp_path):
    """Hydra's own sweep dir is multirun/<date>/<time>: a second sweep started in the same second (a
    script launching several) gets the first one's dir and would rewrite its record."""
    from datetime import datetime, timedelta

    start = datetime.now()
    for second in range(60):  # the first sweep's dir, whichever second the launch below reads
        job = tmp_path / "multirun" / (start + timedelta(seconds=second)).strftime("%Y-%m-%d/%H-%M-%S") / "0"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=1e-3\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    line = usage_error("-m", *SHORT, "optimizer.lr=1e-3,3e-3", cwd=tmp_path)
    match = re.fullmatch(
        r"error: (multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d) already holds a sweep; continue it with resume=\1, "
        r"or start this one in another hydra.sweep.dir",
        line,
    )
    assert match, line
    assert datetime.strptime(match[1], "multirun/%Y-%m-%d/%H-%M-%S") >= start.replace(microsecond=0)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# -- bad input -----------------------------------------------------------------------------------


def test_a_sweep_resume_on_a_dir_that_is_not_a_sweep_is_one_line(tmp_path):
    (tmp_path / "multirun" / "2026-01-01").mkdir(parents=True)
    assert usage_error("resume=multirun/2026-01-01", cwd=tmp_path) == (
        "error: multirun/2026-01-01 is neither a gpt2exp run dir (config.yaml and run.json) nor a checkpoint dir "
        "(checkpoints/step_*), nor a sweep dir (multirun.yaml); pass a run dir such as outputs/<date>/<time>, "
        "one of its checkpoints/step_* dirs, or a sweep dir such as multirun/<date>/<time>"
    )


@pytest.mark.parametrize(
    ("override", "package", "module"),
    [
        ("hydra/launcher=joblib", "hydra-joblib-launcher", "hydra_plugins.hydra_joblib_launcher"),
        ("hydra/launcher=submitit_slurm", "hydra-submitit-launcher", "hydra_plugins.hydra_submitit_launcher"),
        ("+hparams_search=lr_wd", "optuna", "optuna"),
    ],
)
def test_a_launcher_plugin_that_is_not_installed_names_its_pip_package(tmp_path, override, package, module):
    hide = tmp_path / "hide"
    hide.mkdir()
    # as if the plugin were not installed: a None entry in sys.modules makes it unimportable
    (hide / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    env = {"PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])}
    error = usage_error("-m", override, *SHORT, cwd=tmp_path, env=env)
    group, option = override.lstrip("+").split("=")
    assert error == (
        f"error: {group}={option} needs the Hydra plugin {package}, which is not installed: "
        f"pip install {package}  (or pip install -e '.[sweeps]' for all of them)"
    )
    assert not (tmp_path / "multirun").exists()


def test_a_diverged_job_ends_itself_not_the_sweep_and_is_not_rerun(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep(tmp_path, sweep_dir, *SHORT, "trainer.max_steps=30", "optimizer.lr=1e3,1e-3")
    assert "error: training diverged at step" in result.stderr
    assert [status(sweep_dir / j) for j in "01"] == ["diverged", "completed"]
    again = run_cli("gpt2exp.train", f"resume={sweep_dir}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines() == [
        f"sweep {sweep_dir}: 2 jobs, 1 completed, 1 diverged, 0 to run",
        "  job   0  optimizer.lr=1000.0  diverged                  -> skip",
        "  job   1  optimizer.lr=0.001   completed                 -> skip",
        "nothing to resume: every job is completed or diverged",
    ]


def test_a_sweep_resume_refuses_while_a_job_still_trains(tmp_path):
    from gpt2exp.rundir import RunLock

    sweep_dir = tmp_path / "sweep"
    sweep(tmp_path, sweep_dir, *SHORT, "optimizer.lr=1e-3,3e-3")
    with RunLock(sweep_dir / "1"):  # as if job 1 were training in this process
        error = usage_error(f"resume={sweep_dir}", cwd=tmp_path)
    assert error == (
        f"error: run dir {sweep_dir / '1'} is in use by another process (pid {os.getpid()}); "
        "wait for it to finish or stop it first"
    )


def test_resuming_job_dirs_without_multirun_yaml_says_how_to_resume_its_jobs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0" / ".hydra").mkdir(parents=True)
    (sweep_dir / "0" / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=0.001\n")
    assert usage_error(f"resume={sweep_dir}", cwd=tmp_path) == (
        f"error: {sweep_dir} holds sweep jobs but no multirun.yaml, so its job list "
        "is unknown; resume each unfinished job with resume=<job dir>"
    )


def test_a_sweep_with_dirs_named_by_overrides_resumes_each_job_in_its_own_dir(tmp_path):
    """Job dirs from ${hydra.job.override_dirname}, an interpolated override, and an allowed change on resume."""
    sweep_dir = tmp_path / "sweep"
    fixed = [*SHORT, "trainer.eval_every=${trainer.max_steps}"]
    exclude = ",".join(o.split("=")[0] for o in fixed)
    sweep(
        tmp_path,
        sweep_dir,
        "hydra.sweep.subdir=${hydra.job.override_dirname}",
        f"hydra.job.config.override_dirname.exclude_keys=[{exclude}]",
        *fixed,
        "optimizer.lr=1e-3,2e-3",
    )
    first, second = sweep_dir / "optimizer.lr=0.001", sweep_dir / "optimizer.lr=0.002"
    assert job_dirs(sweep_dir) == [first.name, second.name]
    info = json.loads((first / "run.json").read_text())
    (first / "run.json").write_text(json.dumps({**info, "status": "preempted"}))
    shutil.rmtree(second)

    result = run_cli("gpt2exp.train", f"resume={sweep_dir}", "trainer.max_steps=9", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert job_dirs(sweep_dir) == [first.name, second.name]
    assert [r["step"] for r in json.loads((first / "run.json").read_text())["resumes"]] == [6]
    assert [status(d) for d in (first, second)] == ["completed", "completed"]
    last_steps = [json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])["step"] for d in (first, second)]
    assert last_steps == [9, 9]
    assert [record(d)["trainer"]["max_steps"] for d in (first, second)] == [6, 9]  # a record is written once
    assert [record(d)["logger"]["name"] for d in (first, second)] == ["optimizer.lr=0.001", "optimizer.lr=0.002"]

    second_info = json.loads((second / "run.json").read_text())
    (second / "run.json").write_text(json.dumps({**second_info, "status": "failed"}))
    again = run_cli("gpt2exp.train", f"resume={sweep_dir}", cwd=tmp_path)  # its overrides now hold max_steps=9
    assert again.returncode == 0, again.stderr[-3000:]
    assert "  job   1  optimizer.lr=0.002  failed at step 9          -> resume from step 9" in again.stdout


def test_a_job_leaves_no_global_state_behind_in_its_process(tmp_path, compose):
    """What the next job in the same process would inherit: handlers, threads, RNGs, a W&B run."""
    import random

    import numpy as np
    import torch
    import wandb

    from gpt2exp.preemption import SIGNALS
    from gpt2exp.train import train

    cfg = compose([*SHORT, "logger=wandb", "logger.mode=offline", "trainer.num_threads=1", "model.dropout=0.1"])

    def seed_all() -> None:
        random.seed(99)
        np.random.seed(99)
        torch.manual_seed(99)

    torch.set_num_threads(2)
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    seed_all()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_all()

    loss = train(cfg, run_dir=tmp_path / "job")  # seeds everything itself, runs on 1 thread, traps signals

    assert math.isfinite(loss)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert torch.get_num_threads() == 2
    assert {sig: signal.getsignal(sig) for sig in SIGNALS} == handlers
    assert wandb.run is None


@pytest.mark.parametrize(
    ("swept", "error"),
    [
        ("optimizer.lrr=1e-3,2e-3", "error: Could not override 'optimizer.lrr': Key 'lrr' not in 'OptimizerConfig'"),
        ("trainer.log_every=1,0", "error: trainer.log_every=0 must be at least 1; set e.g. trainer.log_every=1"),
        ("model=gpt2_tiny,gpt2_huge", "error: In 'config': Could not find 'model/gpt2_huge'; available: gpt2_124m,"),
        ("model=glob(gpt2_huge*)", "error: model=glob(gpt2_huge*) matches no option of model"),
    ],
)
def test_a_bad_swept_value_fails_in_one_line_before_any_job_starts(tmp_path, swept, error):
    assert usage_error("-m", *SHORT, swept, cwd=tmp_path).startswith(error)
    assert not (tmp_path / "multirun").exists()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["hydra/launcher=joblib", "hydra.launcher.n_jobz=2"], "error: Could not override 'hydra.launcher.n_jobz': "
         "Key 'n_jobz' not in 'JobLibLauncherConf' (key hydra.launcher.n_jobz)"),
        (["hydra/launcher=joblibx"], "error: In 'hydra/config': Could not find 'hydra/launcher/joblibx'; available: "
         "basic, joblib, slurm, submitit_local, submitit_slurm"),
        (["hydra/sweeper=gpt2exp_optuna", "hydra.sweeper.pruner.n_startup_trials=1"], "error: Could not override "
         "'hydra.sweeper.pruner.n_startup_trials': Key 'n_startup_trials' is not in struct "
         "(key hydra.sweeper.pruner.n_startup_trials)"),
    ],
)  # fmt: skip
def test_a_bad_override_of_hydras_own_settings_is_one_line_before_any_job(tmp_path, args, error):
    """Hydra itself reports these with exit 1 and several lines, after writing the sweep dir."""
    assert usage_error("-m", *SHORT, "optimizer.lr=1e-3,3e-3", *args, cwd=tmp_path) == error
    assert not (tmp_path / "multirun").exists()


def test_the_task_returns_the_final_val_loss_even_with_zero_steps(tmp_path, compose):
    """What sweepers optimise: the last evaluation, which with max_steps=0 is the one at step 0."""
    from gpt2exp.train import train

    for steps in (0, 6):
        run_dir = tmp_path / f"steps{steps}"
        loss = train(compose([*SHORT, f"trainer.max_steps={steps}"]), run_dir=run_dir)
        assert loss == final_val_loss(run_dir) and math.isfinite(loss)


def test_by_default_a_sweep_lands_in_multirun_date_time_with_that_as_its_group(tmp_path):
    result = run_cli("gpt2exp.train", "-m", *SHORT, "optimizer.lr=1e-3,3e-3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [sweep_dir] = list((tmp_path / "multirun").glob("*/*"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", sweep_dir.relative_to(tmp_path / "multirun").as_posix())
    assert job_dirs(sweep_dir) == ["0", "1"] and (sweep_dir / "multirun.yaml").is_file()
    groups = {record(sweep_dir / j)["logger"]["group"] for j in "01"}
    assert groups == {sweep_dir.relative_to(tmp_path).as_posix()}
