"""TensorBoard as a logger backend: logger=tensorboard, logger=wandb_tensorboard; each step once after a resume.

The event files are read back with TensorBoard's own EventAccumulator (which applies the purge a
resumed writer asks for) and raw, file by file, to show what the purge hides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2exp.errors import UserError
from gpt2exp.resume import ResumeTarget, fix_values_of_record
from gpt2exp.tracking import TENSORBOARD_DIR, Tracker
from gpt2exp.trainer import Trainer
from tests.conftest import FAST

STEPS = [
    *FAST,
    "trainer.max_steps=8",
    "trainer.log_every=1",
    "trainer.eval_every=4",
    "checkpoint.every_steps=3",
    "checkpoint.async_save=false",
]


def accumulated(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows the run: purged steps left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def raw_steps(run_dir: Path, tag: str) -> list[int]:
    """The steps of `tag` in every event file, oldest file first, purges not applied."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def as_logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """metrics.jsonl's (step, value) of `key`, the value as TensorBoard stores it (float32)."""
    return [(row["step"], float(np.float32(row[key]))) for row in metrics_rows(run_dir) if key in row]


# -- config --------------------------------------------------------------------------------------


def test_the_tensorboard_options_compose(compose):
    assert compose(["logger=tensorboard"]).logger.backend == "tensorboard"
    both = compose(["logger=wandb_tensorboard", "logger.project=mine"]).logger
    assert (both.backend, both.mode, both.project) == ("wandb_tensorboard", "offline", "mine")


def test_a_wandb_key_under_logger_tensorboard_is_refused_naming_the_options(compose):
    with pytest.raises(UserError) as caught:
        compose(["logger=tensorboard", "logger.project=mine"])
    assert str(caught.value) == (
        "logger.project applies only to logger=wandb or logger=wandb_tensorboard, not to logger=tensorboard; "
        "did you mean logger=wandb or logger=wandb_tensorboard?"
    )


def test_no_event_files_without_tensorboard(tmp_path):
    class Logger:
        backend, mode = "none", None

    tracker = Tracker(Logger(), tmp_path)
    tracker.start_wandb("abc", {}, None)
    tracker.log(1, {"train/loss": 1.0})
    tracker.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# -- a resume, in process ------------------------------------------------------------------------


class Crash(Exception):
    pass


def test_after_a_crash_and_a_resume_tensorboard_holds_each_step_once(compose, tmp_path, monkeypatch):
    cfg = fix_values_of_record(compose([*STEPS, "logger=tensorboard"]), 1)
    run = tmp_path / "run"
    run.mkdir()
    first = Trainer(cfg, run)

    def crash_after_step_5() -> None:  # step 5 is logged; the newest checkpoint is step 3
        if first.counters.step == 5:
            raise Crash

    monkeypatch.setattr(first, "sample_if_due", crash_after_step_5)
    with pytest.raises(Crash):
        first.run(None)
    assert [row["step"] for row in metrics_rows(run)] == [0, 1, 2, 3, 4, 5]

    Trainer(cfg, run).run(ResumeTarget(run, None))

    assert raw_steps(run, "train/loss") == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]  # both files hold steps 4 and 5
    assert raw_steps(run, "val/loss") == [0, 4, 4, 8]
    shown = accumulated(run)
    assert sorted(shown) == ["lr", "tokens", "tokens_per_s", "train/loss", "val/loss"]
    assert [step for step, _ in shown["train/loss"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [step for step, _ in shown["val/loss"]] == [0, 4, 8]
    for key in ("train/loss", "val/loss", "lr", "tokens"):
        assert shown[key] == as_logged(run, key), key  # the values of the resumed run, as metrics.jsonl has them


def test_a_restart_from_step_0_purges_every_earlier_event(tmp_path):
    class Logger:
        backend = "tensorboard"

    first = Tracker(Logger(), tmp_path)
    first.start_wandb("abc", {"seed": 1}, None)
    for step in range(4):
        first.log(step, {"train/loss": 10.0 - step})
    first.finish()
    again = Tracker(Logger(), tmp_path)  # a run that never saved a checkpoint starts again at step 0
    again.start_wandb("def", {"seed": 1}, None)
    for step in range(2):
        again.log(step, {"train/loss": 5.0 - step})
    again.finish()
    assert accumulated(tmp_path)["train/loss"] == [(0, 5.0), (1, 4.0)]


# -- the real CLI --------------------------------------------------------------------------------

# `python -m gpt2exp.train ARGS` whose Tracker.log SIGKILLs the process at its NTH call, before logging.
KILL_AT_LOG = """
import os, signal, sys
from gpt2exp import tracking
nth, original, calls = int(sys.argv[1]), tracking.Tracker.log, [0]
def log(self, step, metrics):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, step, metrics)
tracking.Tracker.log = log
sys.argv = ["gpt2exp.train", *sys.argv[2:]]
from gpt2exp.train import main
main()
"""


def train(cwd: Path, *args: str, kill_at_log: int | None = None) -> subprocess.CompletedProcess:
    head = ["-c", KILL_AT_LOG, str(kill_at_log)] if kill_at_log else ["-m", "gpt2exp.train"]
    command = [sys.executable, *head, *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=dict(os.environ))


@pytest.mark.slow
def test_cli_sigkill_then_resume_tensorboard_shows_each_step_once(tmp_path):
    run = tmp_path / "run"
    killed = train(tmp_path, *STEPS, "logger=tensorboard", f"hydra.run.dir={run}", kill_at_log=7)  # at step 6's row
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [row["step"] for row in metrics_rows(run)] == [0, 1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000003"]

    resumed = train(tmp_path, f"resume={run}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    assert raw_steps(run, "train/loss") == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]
    shown = accumulated(run)
    assert [step for step, _ in shown["train/loss"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [step for step, _ in shown["val/loss"]] == [0, 4, 8]
    for key in ("train/loss", "val/loss", "lr", "tokens"):
        assert shown[key] == as_logged(run, key), key


@pytest.mark.slow
def test_cli_wandb_tensorboard_writes_both(tmp_path):
    run = tmp_path / "run"
    done = train(tmp_path, *STEPS, "trainer.max_steps=4", "logger=wandb_tensorboard", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    wandb_id = json.loads((run / "run.json").read_text())["wandb_id"]
    assert [p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")] == [wandb_id]
    shown = accumulated(run)
    assert [step for step, _ in shown["train/loss"]] == [1, 2, 3, 4]
    assert shown["val/loss"] == as_logged(run, "val/loss")
