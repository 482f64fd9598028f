"""Early stopping (trainer.early_stop_patience, trainer.early_stop_min_delta): the run stops once
val/loss did not improve on its best by more than min_delta for `patience` evaluations in a row,
saves that step, says `early_stopped` in run.json and exits 0; the count is saved state, so an
interrupted and resumed run stops at the very step an uninterrupted one does; resuming an
early-stopped run changes nothing; a sweep resume skips it; report shows it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from gpt2exp.config import typed
from gpt2exp.errors import UserError
from gpt2exp.resume import ResumeTarget, config_digest, fix_values_of_record
from gpt2exp.rundir import RunStatus, read_config_of_record, update_run_json
from gpt2exp.state import TrainerCounters
from gpt2exp.sweep import SweepJob
from gpt2exp.trainer import Trainer
from tests.conftest import FAST, run_cli

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_v0_1"
# min_delta 10 makes every evaluation after the first one "no improvement": evaluations at 0, 2, 4
# with patience 2 stop the run at step 4 of 20.
STALLS = ["trainer.max_steps=20", "trainer.eval_every=2", "trainer.early_stop_patience=2"]
STALLS += ["trainer.early_stop_min_delta=10", "trainer.log_every=1", "scheduler.warmup_steps=2"]


def status(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["status"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


# -- the count (unit) ----------------------------------------------------------------------------


def test_an_improvement_is_a_finite_loss_below_the_best_by_more_than_min_delta():
    counters = TrainerCounters()
    seen = []
    for loss in (float("nan"), 5.0, 4.95, 4.9, 4.89, float("inf"), 3.0):
        counters.record_eval(loss, min_delta=0.1)
        seen.append((counters.best_val_loss, counters.evals_without_improvement))
    assert seen == [(None, 1), (5.0, 0), (5.0, 1), (5.0, 2), (4.89, 0), (4.89, 1), (3.0, 0)]
    counters.record_eval(3.0, min_delta=0.0)  # equal is no improvement
    assert (counters.best_val_loss, counters.evals_without_improvement) == (3.0, 1)


# -- the config (unit) ---------------------------------------------------------------------------


def test_early_stopping_is_off_by_default_and_its_keys_have_ranges(compose):
    cfg = compose()
    assert (cfg.trainer.early_stop_patience, cfg.trainer.early_stop_min_delta) == (0, 0.0)
    for override, message in (
        ("trainer.early_stop_patience=-1", "trainer.early_stop_patience=-1 must be at least 0"),
        ("trainer.early_stop_min_delta=-0.1", "trainer.early_stop_min_delta=-0.1 must be at least 0"),
    ):
        with pytest.raises(UserError, match=f"^{message}"):
            compose([override])


def test_a_record_from_before_early_stopping_reads_it_as_off_and_keeps_its_digest():
    """The v0.1 fixture's config.yaml has neither key; its checkpoint's config_sha256 still matches."""
    raw = OmegaConf.load(FIXTURE / "config.yaml")
    assert "early_stop_patience" not in raw.trainer and "early_stop_min_delta" not in raw.trainer
    record = read_config_of_record(FIXTURE)
    assert (record.trainer.early_stop_patience, record.trainer.early_stop_min_delta) == (0, 0.0)
    saved = json.loads((FIXTURE / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert config_digest(record) == saved["config_sha256"]
    counters = TrainerCounters()
    counters.load_state_dict(saved["trainer"])
    assert (counters.step, counters.best_val_loss, counters.evals_without_improvement) == (6, None, 0)
    with_patience = typed({**OmegaConf.to_container(raw), "trainer": {**raw.trainer, "early_stop_patience": 3}})
    assert config_digest(with_patience) != config_digest(record)  # a value other than the backfill is part of it


# -- the trainer (unit) --------------------------------------------------------------------------


@pytest.fixture
def make_trainer(compose, tmp_path):
    def make(*overrides: str) -> Trainer:
        return Trainer(fix_values_of_record(compose([*FAST, *STALLS, *overrides]), 1), tmp_path / "run")

    (tmp_path / "run").mkdir()
    return make


def test_a_run_stops_early_saves_that_step_and_still_finishes(make_trainer, caplog):
    trainer = make_trainer()
    with caplog.at_level(logging.INFO, logger="gpt2exp"):
        val_loss = trainer.run(None)
    run = trainer.run_dir
    assert [row["step"] for row in rows(run)] == [0, 1, 2, 3, 4]
    assert val_loss == rows(run)[-1]["val/loss"] and math.isfinite(val_loss)  # the final val loss, as sweeps score
    info = json.loads((run / "run.json").read_text())
    assert (info["status"], info["step"]) == ("early_stopped", 4)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"  # committed before the end
    state = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())["trainer"]
    assert (state["best_val_loss"], state["evals_without_improvement"]) == (rows(run)[0]["val/loss"], 2)
    assert (run / "samples.txt").read_text().startswith("=== sample 1 ===\n")
    said = [r.getMessage() for r in caplog.records if r.name == "gpt2exp"]
    assert (
        f"stopping early at step 4: val/loss did not improve on its best {rows(run)[0]['val/loss']:.4f} by more "
        "than trainer.early_stop_min_delta=10 in 2 evaluations (trainer.early_stop_patience=2)"
    ) in said
    assert said[-1] == f"finished at step 4 (stopped early): val/loss {val_loss:.4f}; run dir {run}"


def test_the_step_a_run_stops_early_at_logs_its_train_metrics_between_log_every_rows(make_trainer):
    """Its row is the run's last: the tokens trained and the last train/loss, as at max_steps."""
    trainer = make_trainer("trainer.log_every=3")
    trainer.run(None)
    logged = [(row["step"], "train/loss" in row, row.get("tokens")) for row in rows(trainer.run_dir)]
    assert logged == [(0, False, None), (2, False, None), (3, True, 3 * 128), (4, True, 4 * 128)]
    assert trainer.counters.tokens_seen == 4 * 128


def test_patience_0_is_off(make_trainer):
    trainer = make_trainer("trainer.early_stop_patience=0")
    trainer.run(None)
    assert status(trainer.run_dir) == "completed" and rows(trainer.run_dir)[-1]["step"] == 20
    assert trainer.counters.evals_without_improvement == 10  # counted, never acted on


def test_a_run_whose_patience_runs_out_at_its_last_step_is_completed(make_trainer):
    trainer = make_trainer("trainer.max_steps=4")
    trainer.run(None)
    assert status(trainer.run_dir) == "completed" and trainer.counters.evals_without_improvement == 2


def test_a_resume_that_should_stop_early_trains_no_step(make_trainer):
    """As after a signal during the final samples of an early-stopped run: the resume only finishes."""
    first = make_trainer()
    first.run(None)
    update_run_json(first.run_dir, status=RunStatus.preempted)
    (first.run_dir / "samples.txt").unlink()
    metrics, saved = (first.run_dir / "metrics.jsonl").read_bytes(), checkpoints(first.run_dir)
    again = make_trainer()
    val_loss = again.run(ResumeTarget(first.run_dir, None))
    assert again.counters.step == 4 and val_loss == rows(first.run_dir)[-1]["val/loss"]
    assert status(first.run_dir) == "early_stopped" and (first.run_dir / "samples.txt").is_file()
    assert (first.run_dir / "metrics.jsonl").read_bytes() == metrics and checkpoints(first.run_dir) == saved


def test_early_stopping_without_periodic_evaluations_is_said(make_trainer, caplog):
    with caplog.at_level(logging.WARNING, logger="gpt2exp"):
        make_trainer("trainer.eval_every=0")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "trainer.early_stop_patience=2 counts evaluations, but trainer.eval_every=0 evaluates only at the end: "
        "early stopping cannot stop this run; set trainer.eval_every"
    ]


def test_a_sweep_resume_skips_an_early_stopped_job():
    job = SweepJob(0, ["seed=1"], Path("multirun/x/0"), RunStatus.early_stopped, 4)
    assert job.action == "skip"


def test_report_shows_the_status_and_an_early_stopped_run_can_be_best(tmp_path, capsys):
    from gpt2exp.report import main
    from tests.test_report import curve, parse_table, write_run

    write_run(tmp_path / "sweep" / "0", curve([6.0, 5.0, 4.0]))
    write_run(tmp_path / "sweep" / "1", curve([6.0, 3.0, 3.1]), status="early_stopped")
    main([str(tmp_path / "sweep")])
    table = parse_table(capsys.readouterr().out)
    assert [table[j]["status"] for j in "01"] == ["completed", "early_stopped"]
    assert table["1"]["best"] == "**best**"


# -- the command line (slow) ---------------------------------------------------------------------


@pytest.mark.slow
def test_an_early_stopped_run_exits_0_and_a_resume_says_so_and_changes_nothing(tmp_path):
    from tests.test_resume import snapshot

    run = tmp_path / "run"
    result = run_cli("gpt2exp.train", *FAST, *STALLS, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert status(run) == "early_stopped" and checkpoints(run) == ["step_00000004"]
    assert "finished at step 4 (stopped early)" in result.stdout
    before = snapshot(tmp_path)
    line = f"run {run} stopped early at step 4: val/loss stopped improving; it is complete\n"
    for args in (
        [f"resume={run}"],
        [f"resume={run}", "trainer.max_steps=40"],
        [*FAST, *STALLS, f"hydra.run.dir={run}", "resume=auto"],  # a requeued job
    ):
        again = run_cli("gpt2exp.train", *args, cwd=tmp_path)
        assert (again.returncode, again.stdout, again.stderr) == (0, line, ""), args
        assert snapshot(tmp_path) == before, args


@pytest.mark.slow
def test_an_interrupted_and_resumed_run_stops_at_the_same_step_with_the_same_checkpoint(tmp_path):
    """A natural stop (min_delta 0.02); SIGTERM during the evaluation before the stopping one saves a
    checkpoint whose count is already running; the resume stops where the straight run stopped."""
    from tests.test_resume import EXACT, losses
    from tests.test_signals import signalled

    args = [*EXACT, "trainer.max_steps=100", "trainer.early_stop_patience=3", "trainer.early_stop_min_delta=0.02"]
    straight = tmp_path / "straight"
    result = run_cli("gpt2exp.train", *args, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((straight / "run.json").read_text())
    stop = info["step"]
    assert info["status"] == "early_stopped" and 8 < stop < 100

    run = tmp_path / "run"  # evaluations every 4 steps from step 0: the (stop/4)-th call is at step stop - 4
    cut = signalled(
        tmp_path, "gpt2exp.trainer:Trainer.evaluate", "SIGTERM", *args, f"hydra.run.dir={run}", nth=stop // 4
    )
    assert cut.returncode == 75, cut.stderr[-3000:]
    assert status(run) == "preempted" and checkpoints(run)[-1] == f"step_{stop - 4:08d}"
    saved = json.loads((run / "checkpoints" / f"step_{stop - 4:08d}" / "trainer_state.json").read_text())
    assert saved["trainer"]["evals_without_improvement"] == 2  # one more and it stops

    resumed = run_cli("gpt2exp.train", f"resume={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert (info["status"], info["step"]) == ("early_stopped", stop)
    assert checkpoints(run) == checkpoints(straight) and losses(run) == losses(straight)
    assert rows(run)[-1]["step"] == stop and [r.get("val/loss") for r in rows(run)] == [
        r.get("val/loss") for r in rows(straight)
    ]
    last = f"step_{stop:08d}"
    a, b = (load_file(r / "checkpoints" / last / "model.safetensors") for r in (run, straight))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    ours, theirs = (json.loads((r / "checkpoints" / last / "trainer_state.json").read_text()) for r in (run, straight))
    assert ours["trainer"].pop("wandb_id") != theirs["trainer"].pop("wandb_id")  # two runs; all else equal
    assert ours["trainer"] == theirs["trainer"] and ours["trainer"]["evals_without_improvement"] == 3
    assert ours["rng"] == theirs["rng"] and ours["sampler"] == theirs["sampler"]


@pytest.mark.slow
def test_a_sweep_resume_skips_early_stopped_jobs_and_the_task_returns_the_final_val_loss(tmp_path):
    from tests.test_sweeps import final_val_loss

    sweep_dir = tmp_path / "sweep"
    args = [*FAST, *STALLS, "trainer.max_steps=6", "trainer.early_stop_min_delta=10,0"]
    result = run_cli("gpt2exp.train", "-m", f"hydra.sweep.dir={sweep_dir}", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [status(sweep_dir / j) for j in "01"] == ["early_stopped", "completed"]
    assert rows(sweep_dir / "0")[-1]["step"] == 4 and math.isfinite(final_val_loss(sweep_dir / "0"))
    again = run_cli("gpt2exp.train", f"resume={sweep_dir}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines() == [
        f"sweep {sweep_dir}: 2 jobs, 1 completed, 1 early_stopped, 0 to run",
        "  job   0  trainer.early_stop_min_delta=10  early_stopped             -> skip",
        "  job   1  trainer.early_stop_min_delta=0   completed                 -> skip",
        "nothing to resume: every job is completed or early_stopped",
    ]
    report = run_cli("gpt2exp.report", str(sweep_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "early_stopped" in (sweep_dir / "report.md").read_text()
