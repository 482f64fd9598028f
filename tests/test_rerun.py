"""Resuming a run with nothing left to do (it completed) changes nothing; resuming a run that was
stopped before its first checkpoint restarts it from step 0 with its config of record."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_resume import EXACT, assert_same_weights, final_weights, losses, rows, snapshot, spawn, wait_for_step

pytestmark = pytest.mark.slow


def complete_line(run: Path, step: int) -> str:
    return f"run {run} is complete at step {step}; raise trainer.max_steps to continue\n"


def test_resuming_a_completed_run_says_so_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    wandb = ["logger=wandb", "logger.mode=offline"]  # a resume would add a W&B offline dir: not this one
    first = run_cli("gpt2exp.train", *EXACT, *wandb, "trainer.max_steps=4", f"hydra.run.dir={run}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(tmp_path)  # the run dir and everything beside it
    for args in (
        [f"resume={run}"],
        [f"resume={run / 'checkpoints' / 'step_00000004'}"],
        [f"resume={run}", "trainer.max_steps=4"],
        [*EXACT, *wandb, "trainer.max_steps=4", f"hydra.run.dir={run}", "resume=auto"],  # a requeued job
    ):
        result = run_cli("gpt2exp.train", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (result.stdout, result.stderr) == (complete_line(run, 4), ""), args
        assert snapshot(tmp_path) == before, args
    more = run_cli("gpt2exp.train", f"resume={run}", "trainer.max_steps=6", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert [r["step"] for r in rows(run)] == list(range(0, 7))
    again = run_cli("gpt2exp.train", f"resume={run}", cwd=tmp_path)
    assert (again.returncode, again.stdout) == (0, complete_line(run, 6))


def test_a_run_killed_before_its_first_checkpoint_restarts_from_step_0(tmp_path):
    """`resume=<dir>` restarts it; the fresh start in that dir keeps pointing there."""
    args = ["trainer.max_steps=40", "checkpoint.every_steps=0"]
    straight = tmp_path / "straight"
    reference = run_cli("gpt2exp.train", *EXACT, *args, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "run"
    proc = spawn(tmp_path, run, *args)
    wait_for_step(run, proc, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not list((run / "checkpoints").glob("step_*"))
    void_rows = len(rows(run))
    fresh = run_cli("gpt2exp.train", *EXACT, *args, f"hydra.run.dir={run}", cwd=tmp_path)
    assert fresh.returncode == 2 and f"continue it with resume={run}" in fresh.stderr
    config, hydra_files = (run / "config.yaml").read_bytes(), snapshot(run / ".hydra")
    result = run_cli("gpt2exp.train", f"resume={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    restarted = [line for line in result.stdout.splitlines() if "restarting" in line]
    assert len(restarted) == 1 and restarted[0].endswith(
        f"run {run} has no checkpoint: restarting it from step 0 with its config of record; "
        f"dropped the {void_rows} metrics rows of the attempt before"
    )
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and len(info["restarts"]) == 1 and info["resumes"] == []
    assert info["restarts"][0]["wandb_id"] != info["wandb_id"]  # the attempt's W&B run is not continued
    assert [r["step"] for r in rows(run)] == list(range(0, 41))
    assert losses(run) == losses(straight)
    assert_same_weights(final_weights(run, 40), final_weights(straight, 40))
    assert (run / "config.yaml").read_bytes() == config
    assert {k: v for k, v in snapshot(run / ".hydra").items() if k in hydra_files} == hydra_files
    assert len(list((run / ".hydra").glob("resume-*"))) == 1
