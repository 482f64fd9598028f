"""Ctrl-C and SIGTERM at every moment of a run: in the launcher, while a run starts (data, model), at
W&B start, during the first evaluation and the final samples, and between sweep jobs.

Each CLI test runs the real command line (gpt2exp.train's main) in a subprocess whose named function
sends the signal to its own process when it is called, so the signal lands inside that phase, every
time. The outcome asserted: the exit code (128 + the signal in the launcher, 75 once the job runs),
the one line said, no traceback, run.json's status and the files on disk before and after.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gpt2exp.preemption import EXIT_PREEMPTED, Interrupted, PreemptionFlag
from tests.conftest import FAST
from tests.test_resume import snapshot

SHORT = [*FAST, "trainer.max_steps=4", "trainer.log_every=1", "trainer.eval_every=2", "scheduler.warmup_steps=2"]

# Runs `python -m gpt2exp.train ARGS` with TARGET (module:attr.path) wrapped so that its NTH call first
# sends SIGNAL to this very process.
SIGNAL_AT = """
import importlib, os, signal, sys
target, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
module_name, path = target.split(":")
owner = importlib.import_module(module_name)
*parents, attr = path.split(".")
for parent in parents:
    owner = getattr(owner, parent)
original, calls = getattr(owner, attr), [0]
def signalled(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), getattr(signal, name))
    return original(*args, **kwargs)
setattr(owner, attr, signalled)
sys.argv = ["gpt2exp.train", *sys.argv[4:]]
from gpt2exp.train import main
main()
"""


def signalled(cwd: Path, target: str, name: str, *args: str, nth: int = 1) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", SIGNAL_AT, target, name, str(nth), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=dict(os.environ))


def train_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gpt2exp.train", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=dict(os.environ))


def status(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["status"]


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def assert_clean(result: subprocess.CompletedProcess, code: int) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]


# -- the flag itself (unit) ----------------------------------------------------------------------


def test_interrupting_raises_once_and_a_nested_flag_takes_over_and_hands_over_past_its_outer():
    seen = []

    def handler(signum, frame):
        seen.append(signum)

    before = signal.signal(signal.SIGUSR1, handler)
    try:
        with PreemptionFlag() as outer:
            with pytest.raises(Interrupted), outer.interrupting():
                os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)  # a second signal, no longer interrupting: recorded only
            assert outer.signal_name == "SIGUSR1"
            with pytest.raises(Interrupted), outer.interrupting():  # a signal received before: raised at entry
                pass
            with PreemptionFlag() as inner:  # installed over a flag that was signalled: it knows
                assert inner.requested and inner.signal_name == "SIGUSR1"
        with PreemptionFlag() as outer, PreemptionFlag() as inner:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert inner.requested and not outer.requested
        assert seen == []
        inner.hand_over()  # to the handler from before any flag, not to the outer flag's
        assert seen == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is handler  # every flag restored what it found
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_a_signal_nothing_inside_acted_on_goes_to_the_outer_flag_when_the_inner_one_ends():
    """A sweep's job that got a signal after its last look (while it finished) stops the sweep."""
    with PreemptionFlag() as sweep:
        with pytest.raises(Interrupted) as stopped, sweep.interrupting():
            with PreemptionFlag() as job:
                os.kill(os.getpid(), signal.SIGUSR1)
                assert job.requested and not sweep.requested
        assert stopped.value.flag is sweep and sweep.signal_name == "SIGUSR1"
    with PreemptionFlag() as sweep:
        with pytest.raises(RuntimeError), PreemptionFlag():  # the job ended by an exception: the signal was its
            os.kill(os.getpid(), signal.SIGUSR1)
            raise RuntimeError("the job stopped")
        assert not sweep.requested


# -- in the launcher: nothing written, 128 + the signal ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_in_the_launcher_writes_nothing_and_exits_128_plus_the_signal(tmp_path, name, code):
    before = snapshot(tmp_path)
    result = signalled(tmp_path, "gpt2exp.launch:compose_with_hydra", name, *SHORT)
    assert_clean(result, code)
    assert result.stderr == f"error: interrupted by {name} before the run started; nothing was written\n"
    assert snapshot(tmp_path) == before


# -- while a run starts -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> None:
    """SHORT's token cache, built beforehand: a build would print its progress to stderr."""
    cwd = tmp_path_factory.mktemp("prepare")
    result = subprocess.run(
        [sys.executable, "-m", "gpt2exp.data", "prepare", *SHORT], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "name"), [("gpt2exp.data:prepare_data", "SIGINT"), ("gpt2exp.model:build_model", "SIGTERM")]
)
def test_a_signal_while_a_fresh_run_starts_takes_back_its_dir_and_exits_75(tmp_path, prepared, target, name):
    """Nothing trained, nothing recorded yet: the launch leaves no trace (no outputs/<date>/<time>)."""
    before = snapshot(tmp_path)
    result = signalled(tmp_path, target, name, *SHORT)
    assert_clean(result, EXIT_PREEMPTED)
    assert f"{name} received while the run started: nothing was trained or written (exit 75)" in result.stdout
    assert result.stderr == ""
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_signal_while_a_resume_starts_marks_it_preempted_and_changes_nothing_else(tmp_path):
    run = tmp_path / "run"
    assert train_cli(tmp_path, *SHORT, "scheduler.decay_steps=8", f"hydra.run.dir={run}").returncode == 0
    kept = {p: snapshot(run / p) for p in ("checkpoints", "tokenizer")}
    metrics, config = (run / "metrics.jsonl").read_bytes(), (run / "config.yaml").read_bytes()
    result = signalled(tmp_path, "gpt2exp.model:build_model", "SIGTERM", f"resume={run}", "trainer.max_steps=8")
    assert_clean(result, EXIT_PREEMPTED)
    assert f"SIGTERM received while the run started: nothing to save; continue with resume={run}" in result.stdout
    assert status(run) == "preempted"
    assert {p: snapshot(run / p) for p in kept} == kept
    assert (run / "metrics.jsonl").read_bytes() == metrics and (run / "config.yaml").read_bytes() == config
    again = train_cli(tmp_path, f"resume={run}", "trainer.max_steps=8")
    assert_clean(again, 0)
    assert status(run) == "completed" and steps(run) == list(range(0, 9))


# -- W&B start, the first evaluation: a run with its record but no checkpoint ------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The same run uninterrupted: what a restart from the config of record must equal."""
    cwd = tmp_path_factory.mktemp("straight")
    result = train_cli(cwd, *SHORT, f"hydra.run.dir={cwd / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run"


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "extra"),
    [
        ("gpt2exp.tracking:Tracker.start_wandb", ("logger=wandb", "logger.mode=offline")),
        ("gpt2exp.trainer:Trainer.evaluate", ()),  # its first call: the step-0 evaluation
    ],
)
def test_a_signal_before_the_first_step_is_recorded_and_resume_restarts_the_run(tmp_path, straight, target, extra):
    run = tmp_path / "run"
    result = signalled(tmp_path, target, "SIGINT", *SHORT, *extra, f"hydra.run.dir={run}")
    assert_clean(result, EXIT_PREEMPTED)
    assert "SIGINT received: nothing trained yet, nothing to save, stopping (exit 75)" in result.stdout
    assert status(run) == "preempted" and checkpoints(run) == []
    config = (run / "config.yaml").read_bytes()
    again = train_cli(tmp_path, f"resume={run}")
    assert_clean(again, 0)
    assert f"run {run} has no checkpoint: restarting it from step 0 with its config of record" in again.stdout
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and len(info["restarts"]) == 1 and info["resumes"] == []
    assert steps(run) == list(range(0, 5)) and (run / "config.yaml").read_bytes() == config
    assert losses(run) == losses(straight)
    ours, theirs = (load_file(r / "checkpoints" / "step_00000004" / "model.safetensors") for r in (run, straight))
    assert all((ours[k] == theirs[k]).all() for k in theirs)


# -- the final samples: the last checkpoint is saved -------------------------------------------------


@pytest.mark.slow
def test_a_signal_during_the_final_samples_is_preempted_and_a_resume_only_finishes(tmp_path):
    run = tmp_path / "run"
    result = signalled(tmp_path, "gpt2exp.trainer:Trainer.samples", "SIGTERM", *SHORT, f"hydra.run.dir={run}")
    assert_clean(result, EXIT_PREEMPTED)
    assert "SIGTERM received: saved step 4, stopping (exit 75)" in result.stdout
    assert status(run) == "preempted" and checkpoints(run) == ["step_00000004"]
    assert not (run / "samples.txt").exists()
    metrics, saved = (run / "metrics.jsonl").read_bytes(), snapshot(run / "checkpoints")
    again = train_cli(tmp_path, f"resume={run}")
    assert_clean(again, 0)
    assert (run / "samples.txt").read_text().startswith("=== sample 1 ===\n")
    assert status(run) == "completed" and (run / "metrics.jsonl").read_bytes() == metrics
    assert snapshot(run / "checkpoints") == saved


# -- sweeps -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_job_stopped_by_a_signal_is_preempted_not_failed(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *SHORT, f"hydra.sweep.dir={sweep_dir}", "optimizer.lr=1e-3,2e-3"]
    result = signalled(tmp_path, "gpt2exp.tracking:Tracker.start_wandb", "SIGTERM", *args, nth=2)  # job 1's
    assert_clean(result, EXIT_PREEMPTED)
    assert [status(sweep_dir / job) for job in "01"] == ["completed", "preempted"]
    again = train_cli(tmp_path, f"resume={sweep_dir}")
    assert_clean(again, 0)
    assert "  job   1  optimizer.lr=0.002  preempted                 -> start again (no checkpoint)" in again.stdout
    assert [status(sweep_dir / job) for job in "01"] == ["completed", "completed"]
