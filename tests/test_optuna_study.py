"""Optuna studies through the real CLI: pruning, a study resumed after SIGKILL, joblib workers sharing
one study, the report's study plots, and the bad inputs (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from gpt2exp.report import report
from tests.conftest import FAST, run_cli
from tests.test_resume import EXACT, assert_same_weights, final_weights, losses

pytestmark = pytest.mark.slow

STUDY = ["trainer.num_samples=0", "checkpoint.every_steps=4", "scheduler.warmup_steps=0"]
TRAIN_ROW = ["lr", "step", "tokens", "tokens_per_s", "train/loss"]  # a row's train metrics, sorted


def record(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def val_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}


def load(sweep_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir}/optuna.db")


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


def steps_of(sweep_dir: Path) -> list[str]:
    return sorted(p.name for p in (sweep_dir).iterdir() if p.is_dir())


def test_a_median_pruned_study_stops_the_trials_that_fall_behind_and_the_report_shows_them(tmp_path):
    """Random sampling (seed 0) over two learning rates: 1e-6 barely trains, 3e-3 does. Trial 0 draws 1e-6
    and is a start-up trial (never pruned); trial 1 draws 3e-3; trials 2 and 3 draw 1e-6 again and their
    val/loss at step 4 is worse than the median there, so the median pruner stops both at step 4."""
    sweep_dir = tmp_path / "study"
    args = [
        "-m",
        *FAST,
        *STUDY,
        f"hydra.sweep.dir={sweep_dir}",
        "hydra/sweeper=gpt2exp_optuna",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",
        "hydra/sweeper/pruner=median",
        "hydra.sweeper.pruner.n_startup_trials=1",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.study_name=lrs",
        "optimizer.lr=choice(3e-3,1e-6)",
        "trainer.max_steps=8",
        "trainer.eval_every=4",
    ]
    result = run_cli("gpt2exp.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [sweep_dir / str(n) for n in range(4)]
    assert [record(j)["optimizer"]["lr"] for j in jobs] == [1e-6, 3e-3, 1e-6, 1e-6]  # as drawn with seed 0
    assert [record(j)["trial"] for j in jobs] == [{"number": n, "study": "lrs", "storage": None} for n in range(4)]
    assert [run_json(j)["status"] for j in jobs] == ["completed", "completed", "pruned", "pruned"]
    assert [run_json(j)["step"] for j in jobs] == [8, 8, 4, 4]
    assert [sorted(p.name for p in (j / "checkpoints").glob("step_*")) for j in jobs[2:]] == [["step_00000004"]] * 2
    assert val_losses(jobs[2])[4] > val_losses(jobs[1])[4]
    for job in jobs[2:]:  # a pruned trial's last row is a whole end row, off the log_every=10 grid
        last = json.loads((job / "metrics.jsonl").read_text().splitlines()[-1])
        assert (last["step"], last["tokens"], sorted(last)) == (4, 4 * 4 * 32, [*TRAIN_ROW, "val/loss"])
    study = load(sweep_dir, "lrs")
    assert states(study) == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    assert [t.intermediate_values for t in study.trials] == [
        {4: val_losses(j)[4], 8: val_losses(j)[8]} for j in jobs[:2]
    ] + [{4: val_losses(j)[4]} for j in jobs[2:]]
    # the study's best value is the best trial's final val loss, as its metrics.jsonl logged it
    assert study.best_trial.number == 1
    assert study.best_value == val_losses(jobs[1])[8]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best = (results["best_trial"], results["best_value"], results["best_params"])
    assert best == (1, study.best_value, {"optimizer.lr": 3e-3})

    report([sweep_dir])
    md = (sweep_dir / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "trial.number" in line]
    assert [row.split("|")[8].strip() for row in rows] == ["completed", "completed", "pruned", "pruned"]
    assert [row.split("|")[2].strip() for row in rows] == [
        "optimizer.lr=1e-06, trial.number=0",
        "optimizer.lr=0.003, trial.number=1",
        "optimizer.lr=1e-06, trial.number=2",
        "optimizer.lr=1e-06, trial.number=3",
    ]
    assert "Study `lrs`: 4 trials (2 complete, 2 pruned). Best: trial 1, value " in md
    assert "![Optimisation history](optimization_history.png)" in md
    assert "![Parameter importance](param_importances.png)" in md
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (sweep_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_study_killed_during_trial_2_resumes_to_its_4_trials_continuing_trial_2_bit_exact(tmp_path):
    sweep_dir = tmp_path / "study"
    args = [a for a in EXACT if not a.startswith("optimizer.lr")] + ["trainer.max_steps=24", "trainer.num_samples=0"]
    search = ["+hparams_search=lr_wd", "hydra/sweeper/pruner=none", "hydra.sweeper.n_trials=4"]
    command = [sys.executable, "-m", "gpt2exp.train", "-m", f"hydra.sweep.dir={sweep_dir}", *search, *args]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (sweep_dir / "1" / "checkpoints" / "step_00000012").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "trial 2 never reached step 12"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert steps_of(sweep_dir) == ["0", "1"]
    assert states(load(sweep_dir, "lr_wd")) == ["COMPLETE", "RUNNING"]
    cut_at = max(int(p.name[5:]) for p in (sweep_dir / "1" / "checkpoints").glob("step_*"))
    assert 12 <= cut_at < 24

    result = run_cli("gpt2exp.train", f"resume={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"study 'lr_wd' in {sweep_dir}: 2 of 4 trials (1 complete, 1 running), 1 to continue, 2 to ask"
    first, params = (t.params for t in load(sweep_dir, "lr_wd").trials[:2])
    names = [",".join(f"{k}={v}" for k, v in p.items()) for p in (first, params)]
    width = max(map(len, names))
    complete = f"complete {load(sweep_dir, 'lr_wd').trials[0].value:.4f}"
    assert lines[1:3] == [
        f"  trial   0  {names[0]:<{width}}  {complete:<28}  -> skip",
        f"  trial   1  {names[1]:<{width}}  running (interrupted at step {cut_at})  -> resume from step {cut_at}",
    ]
    study = load(sweep_dir, "lr_wd")
    assert states(study) == ["COMPLETE"] * 4
    assert steps_of(sweep_dir) == ["0", "1", "2", "3"]
    assert [r["step"] for r in run_json(sweep_dir / "1")["resumes"]] == [cut_at]
    assert [record(sweep_dir / str(n))["trial"]["number"] for n in range(4)] == [0, 1, 2, 3]
    # the seeded sampler continues the search: the trials asked after the resume repeat none before it
    assert len({tuple(t.params.values()) for t in study.trials}) == 4
    assert study.trials[1].value == val_losses(sweep_dir / "1")[24]

    # trial 2 ends exactly where the same trial run alone ends
    alone = tmp_path / "alone"
    sampled = [f"optimizer.lr={params['optimizer.lr']}", f"optimizer.weight_decay={params['optimizer.weight_decay']}"]
    straight = run_cli("gpt2exp.train", *args, *sampled, f"hydra.run.dir={alone}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert losses(sweep_dir / "1") == losses(alone)
    assert val_losses(sweep_dir / "1") == val_losses(alone)
    assert_same_weights(final_weights(sweep_dir / "1", 24), final_weights(alone, 24))

    again = run_cli("gpt2exp.train", f"resume={sweep_dir}", "hydra.sweeper.n_trials=4", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]  # the study's sweeper setting, not the defaults' basic sweeper's
    assert again.stdout.splitlines()[-1] == "nothing to resume: the study has its 4 trials, none running"


def test_two_joblib_workers_share_one_study(tmp_path):
    sweep_dir = tmp_path / "study"
    args = [
        "-m",
        *FAST,
        *STUDY,
        f"hydra.sweep.dir={sweep_dir}",
        "+hparams_search=lr_wd",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=4",
        "trainer.max_steps=8",
        "trainer.eval_every=4",
    ]
    result = run_cli("gpt2exp.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(sweep_dir, "lr_wd")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert set(states(study)) <= {"COMPLETE", "PRUNED"}
    jobs = [sweep_dir / str(n) for n in range(4)]
    # every trial, trained in a worker process, reported its evaluations into the one database
    for trial, job in zip(study.trials, jobs, strict=True):
        assert record(job)["trial"]["number"] == trial.number
        assert record(job)["optimizer"]["lr"] == trial.params["optimizer.lr"]
        assert trial.intermediate_values == {s: v for s, v in val_losses(job).items() if s > 0}
        assert run_json(job)["status"] == trial.state.name.lower().replace("complete", "completed")
    workers = {yaml.safe_load((j / ".hydra" / "hydra.yaml").read_text())["hydra"]["launcher"]["n_jobs"] for j in jobs}
    assert workers == {2}
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr


# -- bad input -----------------------------------------------------------------------------------


def other_study(sweep_dir: Path) -> list[str]:
    sweep_dir.mkdir(parents=True)
    optuna.create_study(study_name="other", storage=f"sqlite:///{sweep_dir}/optuna.db")
    return []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["+hparams_search=lr_wd", 'hydra.sweeper.params={optimizer.lr:"interval(1e-4"}'],
            "error: hydra.sweeper.params.optimizer.lr=interval(1e-4 is not a search space (no viable alternative at "
            "input 'interval(1e-4'); write e.g. tag(log, interval(1e-4, 1e-2)), interval(0.0, 0.2), range(1, 8) or "
            "choice(a, b)",
        ),
        (
            ["+hparams_search=lr_wd", "optimizer.lrr=interval(1e-4,1e-2)"],
            "error: the searched parameter optimizer.lrr is not a config key; search keys of the config "
            "(python -m gpt2exp.train --cfg job lists them), e.g. optimizer.lr",
        ),
        (
            ["+hparams_search=lr_wd", "OTHER_STUDY"],
            "error: SWEEP/optuna.db was written by another study ('other'), not 'lr_wd'; start the new study in a new "
            "sweep dir, or continue that one with resume=<its sweep dir>",
        ),
        (
            ["+hparams_search=lr_wd", "trainer.eval_every=0"],
            "error: the pruner MedianPruner stops trials on their periodic val/loss, but trainer.eval_every=0 "
            "evaluates only at the end; set trainer.eval_every (e.g. trainer.eval_every=50) or "
            "hydra/sweeper/pruner=none",
        ),
    ],
    ids=["space does not parse", "not a config key", "another study's database", "pruner without evaluations"],
)
def test_bad_study_input_is_one_line_exit_2_and_nothing_written(tmp_path, args, message):
    sweep_dir = tmp_path / "study"
    if "OTHER_STUDY" in args:
        args = [a for a in args if a != "OTHER_STUDY"] + other_study(sweep_dir)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = run_cli("gpt2exp.train", "-m", f"hydra.sweep.dir={sweep_dir}", *FAST, *args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [message.replace("SWEEP", str(sweep_dir))]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
